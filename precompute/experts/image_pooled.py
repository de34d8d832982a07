"""`image-pooled`: the global embedding of a frozen timm image encoder, for conditional prompt tuning (MoPE).

When MoPE prompts the text encoder, the image is the complementary modality and enters as one
vector. That vector is whatever the encoder's own classifier reads:
`forward_head(forward_features(x), pre_logits=True)`, so each architecture pools the way it was
trained to (ViT: [CLS] or token mean per its `global_pool`; Swin: final LayerNorm + average pool
over all tokens, the output MoPE uses). Stored float16 as [N, D]; with `views=V`, also V augmented
views per image as `views` [N, V, D] (eP-ALM's image recipe, precompute/experts/views.py).
"""

from __future__ import annotations

import numpy as np
import torch

from cache_schema import ArraySpec, FeatureSpec, config_hash
from precompute.experts import ExpertError
from precompute.experts.base import Expert
from precompute.experts.views import VIEW_SEED_HELP, VIEWS_HELP, TimmImageViews, predict_views, views_spec
from precompute.sources import Sample, Source


class ImagePooledExpert(TimmImageViews, Expert):
    name = "image-pooled"
    description = ("pooled global embedding of a frozen timm image encoder, what its classifier reads (ViT [CLS] or "
                   "mean per global_pool, Swin LayerNorm + average pool), float16 [N, D] (MoPE's complementary image)")
    default_model = "swin_base_patch4_window7_224"
    options = {"views": 0, "seed": 0}
    option_help = {"views": VIEWS_HELP, "seed": VIEW_SEED_HELP}

    def load(self) -> None:
        self.model = self.load_frozen_timm()
        self.load_transforms(self.model)
        probe = self.pool(torch.zeros(1, *self.data_config["input_size"]))
        if probe.dim() != 2:
            raise ExpertError(f"image-pooled: {self.model_ref} pools to shape {tuple(probe.shape[1:])}, not one vector "
                              "per image (a timm model built with global_pool='' keeps its tokens)")
        self.width = probe.shape[1]

    def spec(self, feature: str) -> FeatureSpec:
        return views_spec(FeatureSpec(
            name=feature,
            expert=self.name,
            model_id=self.model_id,
            revision=self.revision,
            preprocess_hash=config_hash(self.preprocessing()),
            arrays=(ArraySpec("pooled", "float16", (self.width,)),),
            params={"width": self.width, "architecture": type(self.model).__name__},
        ), self.views)

    def read_input(self, source: Source, sample: Sample) -> torch.Tensor:
        return source.load_image_tensor(sample)

    @torch.inference_mode()
    def pool(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(batch.to(self.device, self.dtype)), pre_logits=True)

    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return predict_views(lambda pixels: {"pooled": self.pool(pixels).to(torch.float16).cpu().numpy()}, batch,
                             "pooled", self.views)
