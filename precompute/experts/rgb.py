"""`rgb`: the image itself, resized to the label frame, so the Prismer trainer needs only the cache.

Prismer's trainer reads the picture and every expert label of it with the same random crop; with
the picture stored here at the labels' resolution and alignment, the cache is self-sufficient
(no raw images at training time) and RGB and labels line up pixel for pixel by construction.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cache_schema import ArraySpec, FeatureSpec, config_hash
from precompute.experts.base import PIXELS, uint8_tensor
from precompute.experts.labels import LabelExpert, frame_tensor
from precompute.sources import Sample, Source


class RgbExpert(LabelExpert):
    name = "rgb"
    description = "the image resized to the label frame (bicubic), uint8 [N, 3, R, R] (Prismer's RGB input)"
    default_model = "none"

    def load(self) -> None:
        """No model: the 'expert' is the resize that every label expert also applies."""

    def spec(self, feature: str) -> FeatureSpec:
        r = self.resolution
        return FeatureSpec(
            name=feature,
            expert=self.name,
            model_id="none",
            revision="resize-bicubic-v1",
            preprocess_hash=config_hash({"resolution": r, "resample": "bicubic", "pixels": PIXELS}),
            arrays=(ArraySpec("rgb", "uint8", (3, r, r)),),
            params={"resolution": r},
        )

    def read_input(self, source: Source, sample: Sample) -> torch.Tensor:
        return source.load_image_tensor(sample)

    def preprocess(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        return frame_tensor(uint8_tensor(image), self.resolution)

    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {"rgb": batch.numpy()}
