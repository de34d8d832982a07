"""How a frozen model's reference resolves, the same way in both stages.

A precompute expert and a trainer backbone name their models alike: a timm name with hub weights
(`vit_base_patch16_clip_224.openai`) or a local directory written by `timm.models.save_for_hf`.
The cache records that reference and `model_revision` of it, so both stages must read it the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # reading a cache (status, validate) must not pay for importing torch
    import torch


def load_timm_model(model: str) -> torch.nn.Module:
    """A timm model by name (hub weights) or from a local directory written by `save_for_hf`.

    Raises FileNotFoundError for a path that is not there or is not a timm model directory.
    """
    import timm  # here, not at module level: reading a cache must not pay for importing timm

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: not a timm model directory (no config.json; write it with timm.models.save_for_hf)")
        return timm.create_model(f"local-dir:{path.resolve()}", pretrained=True)
    if model.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"{model}: no such model directory")
    return timm.create_model(model, pretrained=True)
