"""Checkpoints hold only what was trained, plus the names of what stayed frozen.

    OUT/checkpoint/model.safetensors   trainable tensors only (a few MB)
    OUT/checkpoint/checkpoint.json     method, step, frozen backbones (id + revision), cache specs,
                                       config_changes (see below)
    OUT/checkpoint/config.yaml         the resolved training config (the one in force at `step`)
    OUT/checkpoint/training_state.pt   optimizer, schedule, data position, RNG: for resuming only

A new checkpoint is written beside the old one and swapped in by rename, so a kill at any
instant leaves one complete checkpoint to resume from.

A run resumed with a different config would leave a false record of how the checkpoint was
made, so `trainer fit` refuses one (`check_resume`) unless the user accepts it
(`--allow-config-change`); an accepted change is appended to checkpoint.json's `config_changes`,
`{"step": S, "changes": {key: {"from": old, "to": new}}}` with S the step it resumed from, and
config.yaml holds the new values. Only keys that cannot change what is trained
(`COSMETIC_KEYS`) may change freely; they are recorded all the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cache_schema import CacheError, CacheLayout
from trainer.config import ConfigError, TrainConfig, load_config, save_config
from trainer.methods.base import MethodError

CHECKPOINT_DIR = "checkpoint"
COSMETIC_KEYS = frozenset({"num_workers", "log_every", "log_to", "device", "max_failures"})  # how it runs, not what it trains
UNSET = object()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"lm": x}} -> {"model.lm": x}: the dotted keys KEY=VALUE overrides name."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def comparable(config: TrainConfig) -> dict[str, Any]:
    """The config's keys as a resume compares them: `out` is where the checkpoint is, not how it
    was made, and a cache is its resolved root (`./cache` and its absolute path are one cache)."""
    flat = flatten(config.to_dict())
    flat.pop("out")
    try:
        flat["cache"] = str(CacheLayout(flat["cache"]).root)
    except (CacheError, ValueError, OSError):
        pass
    return flat


def config_changes(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every key that differs; UNSET where one lacks it."""
    a, b = comparable(old), comparable(new)
    return {key: (a.get(key, UNSET), b.get(key, UNSET)) for key in sorted(set(a) | set(b))
            if a.get(key, UNSET) != b.get(key, UNSET)}


def show(value: Any) -> str:
    return "(unset)" if value is UNSET else repr(value)


def saved_config(checkpoint: Path) -> TrainConfig:
    """The config a checkpoint was made with; a bad one is a ConfigError naming its file."""
    try:
        return load_config(checkpoint / "config.yaml", [])
    except ConfigError as e:
        raise ConfigError(f"{checkpoint / 'config.yaml'}: {e}") from None


def check_resume(out: Path, config: TrainConfig, allow_change: bool = False) -> dict[str, tuple[Any, Any]]:
    """The config changes a `fit` into `out` would resume with (none without a checkpoint there).

    Raises ConfigError naming every key that differs from the checkpoint's config, unless the
    keys are cosmetic (COSMETIC_KEYS) or `allow_change`; writes nothing.
    """
    previous = find_checkpoint(out)
    if previous is None:
        return {}
    changes = config_changes(saved_config(previous), config)
    refused = {key: change for key, change in changes.items() if key not in COSMETIC_KEYS}
    if refused and not allow_change:
        listed = ", ".join(f"{key} {show(old)} -> {show(new)}" for key, (old, new) in refused.items())
        raise ConfigError(f"{previous} (step {read_info(previous)['step']}) was made with a different config: {listed}; "
                          f"resume with its values, train into a new --out, or pass --allow-config-change to continue "
                          f"with the new ones (recorded in checkpoint.json's config_changes)")
    return changes


def recorded_changes(out: Path, config: TrainConfig) -> list[dict[str, Any]]:
    """checkpoint.json's `config_changes` for a save of `config` into `out`: the previous
    checkpoint's list, plus an entry at its step if `config` differs from the config it holds."""
    previous = find_checkpoint(out)
    if previous is None:
        return []
    prior = read_info(previous)
    history = list(prior.get("config_changes", []))
    changes = config_changes(saved_config(previous), config)
    if changes:
        history.append({"step": prior["step"], "changes": {
            key: {**({} if old is UNSET else {"from": old}), **({} if new is UNSET else {"to": new})}
            for key, (old, new) in changes.items()}})
    return history


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters and the buffers of the modules that own them.

    A trained module's buffers are trained state too: BatchNorm's running mean and variance (in
    Prismer's expert stems) are what eval mode normalises with. Saved without them, a reloaded model
    evaluates with the defaults (mean 0, variance 1) and its expert path reads noise.
    """
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    owners = {name.rpartition(".")[0] for name in names}
    names |= {name for name, _ in model.named_buffers() if name.rpartition(".")[0] in owners}
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if name in names}


def save_checkpoint(out: Path, model: torch.nn.Module, config: TrainConfig, info: dict[str, Any],
                    training_state: dict[str, Any]) -> Path:
    history = recorded_changes(out, config)
    info = {**info, **({"config_changes": history} if history else {})}
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
