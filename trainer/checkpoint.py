"""Checkpoints hold only what was trained, plus the names of what stayed frozen.

    OUT/checkpoint/model.safetensors   trainable tensors only (a few MB)
    OUT/checkpoint/checkpoint.json     method, step, frozen backbones (id + revision), cache specs
    OUT/checkpoint/config.yaml         the resolved training config
    OUT/checkpoint/training_state.pt   optimizer, schedule, data position, RNG: for resuming only

A new checkpoint is written beside the old one and swapped in by rename, so a kill at any
instant leaves one complete checkpoint to resume from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trainer.config import TrainConfig, save_config
from trainer.methods.base import MethodError

CHECKPOINT_DIR = "checkpoint"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if name in names}


def save_checkpoint(out: Path, model: torch.nn.Module, config: TrainConfig, info: dict[str, Any],
                    training_state: dict[str, Any]) -> Path:
    final = out / CHECKPOINT_DIR
    staging, previous = out / f"{CHECKPOINT_DIR}.tmp", out / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(trainable_state(model), staging / "model.safetensors", metadata={"method": config.method})
    (staging / "checkpoint.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    save_config(config, staging / "config.yaml")
    torch.save(training_state, staging / "training_state.pt")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def find_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint under `out`, including one left mid-swap by a kill."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        if (out / name / "training_state.pt").exists():
            return out / name
    return None


def load_trainable(model: torch.nn.Module, checkpoint: Path) -> None:
    state = load_file(checkpoint / "model.safetensors")
    expected = set(trainable_state(model))
    if set(state) != expected:
        raise MethodError(f"{checkpoint}: trained tensors do not fit this model (missing "
                         f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]})")
    model.load_state_dict(state, strict=False)


def read_info(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "checkpoint.json"
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint (no checkpoint.json)")
    return json.loads(path.read_text())
