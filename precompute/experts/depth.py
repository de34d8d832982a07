"""`depth`: Prismer's depth label, the relative inverse depth of a monocular depth estimator.

Prismer labels depth with DPT-Hybrid MiDaS (`Intel/dpt-hybrid-midas`, mean/std 0.5): its output
is inverse depth (large = near) up to an unknown scale and shift, so Prismer min-max normalises it
per image and stores it as uint8. This expert writes exactly that label, `depth` uint8 [1, R, R]
over the shared frame, from any `AutoModelForDepthEstimation` checkpoint, by hub id or local
directory: DPT / DPT-Hybrid, or Depth Anything V2 (`depth-anything/Depth-Anything-V2-Small-hf`),
whose relative models also predict inverse depth. (A *metric* depth model predicts depth, not its
inverse, and would store the label upside down; use the relative ones.)

The network sees the frame as its own image processor would prepare it (`preprocessor_config.json`
beside the weights; DPT-Hybrid's 384 x 384, mean/std 0.5 when the checkpoint has none), re-done
here as plain tensor ops so the decode threads do it deterministically without the processor's
per-call overhead. The prediction is resized bilinearly to the frame before the min-max, so the
label aligns pixel for pixel with `rgb` whatever input size the model wants.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForDepthEstimation, DPTImageProcessor, PreTrainedModel
from transformers.image_processing_base import ImageProcessingMixin
from transformers.models.dpt.image_processing_dpt import get_resize_output_image_size

from cache_schema import ArraySpec, FeatureSpec, config_hash, model_revision
from precompute.experts import ExpertError
from precompute.experts.base import PROCESSOR_CONFIG, has_processor_config, pretrained_source
from precompute.experts.labels import LabelExpert, minmax_uint8, resize_maps

# PIL resampling codes, as image processor configs store them, -> torch interpolation modes.
RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class DepthPreprocessing:
    """A depth model's image processor (DPT-style fields) as a pure tensor op on the frame.

    `size` None means the processor does not resize; `keep_aspect_ratio` and `ensure_multiple_of`
    are DPT's rules (Depth Anything V2: keep the ratio, a multiple of its 14 px patch).
    """

    size: tuple[int, int] | None
    resample: str
    keep_aspect_ratio: bool
    ensure_multiple_of: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, processor: ImageProcessingMixin) -> DepthPreprocessing:
        resample = int(getattr(processor, "resample", 3))
        if resample not in RESAMPLE_MODES:
            raise ExpertError(f"depth: the image processor's resample={resample} is not supported "
                              f"(PIL codes {sorted(RESAMPLE_MODES)}: nearest, bilinear, bicubic)")
        size = getattr(processor, "size", None)
        if getattr(processor, "do_resize", True) and size is not None:
            if not (size.get("height") and size.get("width")):
                raise ExpertError(f"depth: the image processor's size {dict(size)} has no height and width")
            target: tuple[int, int] | None = (int(size["height"]), int(size["width"]))
        else:
            target = None
        normalize = getattr(processor, "do_normalize", True)
        rescale = getattr(processor, "rescale_factor", 1 / 255) if getattr(processor, "do_rescale", True) else 1.0
        return cls(
            size=target,
            resample=RESAMPLE_MODES[resample],
            keep_aspect_ratio=bool(getattr(processor, "keep_aspect_ratio", False)),
            ensure_multiple_of=int(getattr(processor, "ensure_multiple_of", 1) or 1),
            rescale_factor=float(rescale),
            mean=tuple(float(m) for m in processor.image_mean) if normalize else (0.0, 0.0, 0.0),
            std=tuple(float(s) for s in processor.image_std) if normalize else (1.0, 1.0, 1.0),
        )

    def input_size(self, resolution: int) -> tuple[int, int]:
        """(height, width) the network sees for a `resolution` square frame."""
        if self.size is None:
            return resolution, resolution
        out = get_resize_output_image_size(torch.empty(0, resolution, resolution), self.size,
                                           self.keep_aspect_ratio, self.ensure_multiple_of)
        return int(out.height), int(out.width)

    def __call__(self, frame: Image.Image) -> torch.Tensor:
        """RGB frame -> float32 [3, h, w]: resize in 0..255 (clamped, as on uint8), rescale, normalise."""
        pixels = torch.from_numpy(np.asarray(frame.convert("RGB"), dtype=np.float32).transpose(2, 0, 1).copy())
        size = self.input_size(frame.height)
        if size != tuple(pixels.shape[-2:]):
            smooth = self.resample != "nearest"
            pixels = F.interpolate(pixels[None], size=size, mode=self.resample, antialias=smooth,
                                   **({"align_corners": False} if smooth else {}))[0].clamp(0, 255)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels * self.rescale_factor - mean) / std


def load_depth_model(model_ref: str) -> PreTrainedModel:
    """Any `AutoModelForDepthEstimation` by hub id or local `save_pretrained` directory."""
    source = pretrained_source("depth", model_ref)
    try:
        return AutoModelForDepthEstimation.from_pretrained(source)
    except (OSError, ValueError) as e:
        hint = "" if Path(source).is_dir() else " (offline? pass --model DIR holding a save_pretrained copy)"
        raise ExpertError(f"depth: could not load a depth-estimation model from {model_ref!r}{hint}: {e}") from e


def load_depth_processor(model_ref: str) -> ImageProcessingMixin:
    """The checkpoint's own image processor; DPT-Hybrid MiDaS's (384 x 384, mean/std 0.5) if it has none."""
    source = pretrained_source("depth", model_ref)
    if not has_processor_config(source):
        return DPTImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ExpertError(f"depth: {model_ref}: unreadable {PROCESSOR_CONFIG}: {e}") from e


class DepthExpert(LabelExpert):
    name = "depth"
    description = ("relative inverse depth (DPT, Depth Anything V2), per-image min-max, uint8 [N, 1, R, R] "
                   "(Prismer's DPT-Hybrid MiDaS)")
    default_model = "Intel/dpt-hybrid-midas"

    def load(self) -> None:
        self.model = load_depth_model(self.model_ref).eval().requires_grad_(False).to(self.device, self.dtype)
        self.preprocessing = DepthPreprocessing.from_processor(load_depth_processor(self.model_ref))
        self.model_id, self.revision = model_revision(self.model_ref)

    def spec(self, feature: str) -> FeatureSpec:
        r = self.resolution
        input_size = list(self.preprocessing.input_size(r))
        return FeatureSpec(
            name=feature,
            expert=self.name,
            model_id=self.model_id,
            revision=self.revision,
            preprocess_hash=config_hash({
                "frame": "bicubic", "resolution": r, "input_size": input_size,
                "preprocessing": asdict(self.preprocessing),
                "output": "predicted_depth -> bilinear to frame -> per-image min-max -> uint8",
            }),
            arrays=(ArraySpec("depth", "uint8", (1, r, r)),),
            params={"resolution": r, "input_size": input_size},
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.preprocessing(self.frame(image))

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
        inverse_depth = self.model(pixel_values=batch.to(self.device, self.dtype)).predicted_depth
        return {"depth": minmax_uint8(resize_maps(inverse_depth[:, None].float(), self.resolution))}
