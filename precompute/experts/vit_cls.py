"""`vit-cls`: eP-ALM's image side, the [CLS] token of each of the last K blocks of a frozen ViT.

eP-ALM feeds the [CLS] of encoder levels 7-12 of ViT-B into a frozen OPT. Each token is taken
after the encoder's final LayerNorm (as the authors do), so every level lives in the same
normalised space as the encoder's own output. Stored float16 as [N, K, D]; with `views=V`, also V
augmented views per image as `views` [N, V, K, D] (eP-ALM's training recipe; precompute/experts/views.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cache_schema import ArraySpec, FeatureSpec, config_hash
from precompute.experts import ExpertError
from precompute.experts.base import Expert
from precompute.experts.views import VIEW_SEED_HELP, VIEWS_HELP, TimmImageViews, predict_views, views_spec
from precompute.sources import Sample, Source


class ClsLevelsExpert(Expert):
    """What every eP-ALM encoder expert (image, video, audio) shares: which levels it keeps and the
    spec it writes, so the trainer reads any of them the same way."""

    options = {"levels": 6}
    option_help = {"levels": "how many of the encoder's last layers give a [CLS] token (eP-ALM: 6)"}

    def select_levels(self, depth: int) -> None:
        """Keep the last `levels` of the encoder's `depth` layers (`self.layers`, 0-based)."""
        levels = self.config["levels"]
        if not 1 <= levels <= depth:
            raise ExpertError(f"{self.name}: levels={levels} but {self.model_ref} has {depth} layers")
        self.num_blocks = depth
        self.layers = list(range(depth - levels, depth))

    def cls_spec(self, feature: str, preprocessing: dict[str, Any], width: int, **params: Any) -> FeatureSpec:
        return FeatureSpec(
            name=feature,
            expert=self.name,
            model_id=self.model_id,
            revision=self.revision,
            preprocess_hash=config_hash(preprocessing),
            arrays=(ArraySpec("cls", "float16", (len(self.layers), width)),),
            params={"layers": self.layers, "width": width, "num_blocks": self.num_blocks, **params},
        )


class VitClsExpert(TimmImageViews, ClsLevelsExpert):
    name = "vit-cls"
    description = "per-layer [CLS] of a frozen timm ViT after its final LayerNorm, float16 [N, K, D] (eP-ALM)"
    default_model = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    options = {"levels": 6, "views": 0, "seed": 0}
    option_help = {**ClsLevelsExpert.option_help, "views": VIEWS_HELP, "seed": VIEW_SEED_HELP}

    def load(self) -> None:
        self.model = self.load_frozen_timm()
        self.select_levels(len(self.model.blocks))
        self.load_transforms(self.model)

    def spec(self, feature: str) -> FeatureSpec:
        return views_spec(self.cls_spec(feature, self.preprocessing(), self.model.embed_dim), self.views)

    def read_input(self, source: Source, sample: Sample) -> torch.Tensor:
        return source.load_image_tensor(sample)

    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return predict_views(self.cls_levels, batch, "cls", self.views)

    @torch.inference_mode()
    def cls_levels(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        model = self.model
        hidden_states = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(batch.to(self.device, self.dtype)))))
        cls_per_level = []
        for index, block in enumerate(model.blocks):
            hidden_states = block(hidden_states)
            if index in self.layers:
                cls_per_level.append(model.norm(hidden_states[:, 0]))
        return {"cls": torch.stack(cls_per_level, dim=1).to(torch.float16).cpu().numpy()}
