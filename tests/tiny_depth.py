"""Tiny real depth and normal models, saved the way the published ones are, for loading by path.

`save_tiny_dpt` writes a `DPTForDepthEstimation` (ViT backbone, 32 px) with `save_pretrained` and a
`DPTImageProcessor` config beside it; `save_tiny_normal` writes an NNET state dict under "model",
as NNET's `scannet.pt`, around timm's `test_efficientnet` (pass `encoder=TINY_NORMAL_ENCODER`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

TINY_NORMAL_ENCODER = "test_efficientnet"  # timm's 0.1M-parameter EfficientNet, 256-channel head


def save_tiny_dpt(directory: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A random-init DPT whose inverse depth varies over the image (not the flat map a ReLU head can give)."""
    torch.manual_seed(seed)
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        image_size=image_size, patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 16, 16],
        reassemble_factors=[2, 1, 0.5, 0.25], fusion_hidden_size=16, use_auxiliary_head=False,
        initializer_range=0.1,  # larger than 0.02 so the random map varies visibly
    )
    model = DPTForDepthEstimation(config)
    with torch.no_grad():
        model.head.head[-2].bias.fill_(1.0)  # keep the final ReLU's input positive: a non-constant map
    directory = Path(directory)
    model.save_pretrained(directory)
    DPTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(directory)
    return directory


def save_tiny_normal(directory: Path, seed: int = 0) -> Path:
    """NNET around timm's test_efficientnet, random init, written as {"model": state_dict} to scannet.pt."""
    from precompute.experts.normal import NNET

    torch.manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "scannet.pt"
    torch.save({"model": NNET(TINY_NORMAL_ENCODER).state_dict()}, path)
    return path
