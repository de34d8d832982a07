"""ViTs the benchmarks load by path, the way a user's published checkpoint would be loaded."""

from __future__ import annotations

from pathlib import Path

import timm
import torch


def save_vit_base(path: Path) -> str:
    """ViT-B/16 at its published size with random weights: the same compute, no hub download."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    timm.models.save_for_hf(model, str(path), safe_serialization=True)
    return str(path)
