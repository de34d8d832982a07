"""Training configuration: one dataclass, a YAML file, and `key=value` overrides.

Every key of the YAML file can be overridden on the command line (`lr=3e-4`,
`model.variant=lin`), and the resolved config is saved beside the checkpoint, so a checkpoint
always says exactly how it was made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """Unknown key, unparseable value or unreadable config file."""


@dataclass
class TrainConfig:
    method: str = "epalm"
    cache: str = "./cache"
    source: str | None = None  # None: the cache's only source
    train_split: str = "train"
    eval_split: str = "val"
    out: str = "./runs/run"
    seed: int = 0
    max_steps: int | None = None  # None: `epochs` worth of steps
    epochs: float = 1.0
    batch_size: int = 32  # the global batch: with `trainer fit --workers N` each rank takes batch_size / N of it
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.02
    warmup_steps: int = 100
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    eval_every: int = 0  # steps; 0: only at the end
    save_every: int = 200
    max_eval_examples: int | None = None
    num_workers: int = 2
    shuffle_buffer: int = 1000  # examples; WebDataset caches only (shards stream through this buffer)
    device: str = "auto"  # auto: cuda when available
    log_every: int = 10
    max_failures: int = 3  # --workers / --address: Ray Train restarts after a lost worker, from the last checkpoint
    model: dict[str, Any] = field(default_factory=dict)  # the method's own config (e.g. EPALMConfig fields)

    def __post_init__(self) -> None:
        # YAML 1.1 reads `1e-4` (no dot) as a string; the float fields must still be floats.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, (str, int)):
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    raise ConfigError(f"{f.name}: expected a number, got {value!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_scalar(raw: str) -> Any:
    """A YAML scalar, with `1e-4`-style numbers read as floats (YAML 1.1 would keep them strings)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` pairs into a nested dict; values parse as YAML scalars (`1e-4`, `true`, `null`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {parent!r} is not a section")
        target[leaf] = parse_scalar(raw)
    return data


def load_config(path: str | Path | None, overrides: list[str], **flags: Any) -> TrainConfig:
    """File, then explicit CLI flags (None = not given), then `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"config {path}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}: expected a mapping at the top level")
    data.update({k: v for k, v in flags.items() if v is not None})
    apply_overrides(data, overrides)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known: {sorted(known)}")
    return TrainConfig(**data)


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
