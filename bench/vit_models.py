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


def save_tiny_vit(path: Path, depth: int = 6, img_size: int = 32, patch_size: int = 8) -> str:
    """A toy timm ViT (as in the tests): the forward costs next to nothing, so overheads show."""
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=32, depth=depth, num_heads=2,
                                          num_classes=4)
    model.pretrained_cfg = {
        "input_size": (3, img_size, img_size), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "num_classes": 4,
        "architecture": "vit_tiny_patch16_224",
    }
    timm.models.save_for_hf(model, str(path), safe_serialization=True,
                            model_args={"img_size": img_size, "patch_size": patch_size, "embed_dim": 32, "depth": depth,
                                        "num_heads": 2})
    return str(path)
