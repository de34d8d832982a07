"""Training configuration: one typed dataclass, a YAML file, and `key=value` overrides.

Every key of the YAML file can be overridden on the command line (`lr=3e-4`,
`model.variant=lin`), and the resolved config is saved beside the checkpoint, so a checkpoint
always says exactly how it was made.

The dataclass's type hints are the whole check: pydantic validates every value against its type
and range (the `Field(ge=…)` beside it) when a config is made, so `batch_size=0`, `max_steps=1.5`,
`seed=true` or `model=3` is one line naming the key, before anything loads or is written.
Values are strict: no bool for a number, no fraction for a count, no string for either (except a
number YAML 1.1 left as a string, `1e-4`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass


class ConfigError(Exception):
    """Unknown key, unparseable or out-of-range value, or unreadable config file."""


def yaml_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; a float field still takes it as the number it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


# `log_to`'s optional targets -> (the module each imports, what installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", "pip install tensorboard` (or expertcache[tensorboard])"),
    "mlflow": ("mlflow", "pip install mlflow-skinny` (or mlflow, or expertcache[mlflow])"),
    "wandb": ("wandb", "pip install wandb`"),
}


def log_targets(targets: list[str]) -> list[str]:
    """`log_to`: jsonl always (resume and the figures read OUT/log.jsonl back); a tracker only
    where its package is installed, said now rather than after the model has loaded."""
    if "jsonl" not in targets:
        raise ValueError("jsonl is always written (resume and the figures read it back); add it")
    for target in targets:
        if target in TRACKERS and importlib.util.find_spec(TRACKERS[target][0]) is None:
            raise ValueError(f"{target} needs `{TRACKERS[target][1]}")
    return list(dict.fromkeys(targets))


Float = Annotated[float, BeforeValidator(yaml_float)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
# a method's options and its model's config: the same strictness, and a misspelt key is an error
OPTIONS = ConfigDict(strict=True, extra="forbid")
M = TypeVar("M", bound=BaseModel)


@dataclass(config=ConfigDict(strict=True))
class TrainConfig:
    method: str = Field("epalm", description="training method: epalm | prismer | mope")
    cache: str = Field("./cache", description="feature cache: a directory or an fsspec URL (s3://bucket/cache)")
    source: str | None = Field(None, description="the cache's source to train on; null: its only one")
    train_split: str = Field("train", description="split to train on")
    eval_split: str | None = Field("val", description="split to evaluate on (during and after training); null: none")
    out: str = Field("./runs/run", description="run directory: checkpoint/, log.jsonl; a checkpoint there is resumed")
    seed: NonNegative = Field(0, description="seeds the model's new parts, the data order and every random draw")
    max_steps: Positive | None = Field(None, description="optimizer steps; null: `epochs` worth")
    epochs: PositiveFloat = Field(1.0, description="passes over the training set, when max_steps is null")
    batch_size: Positive = Field(32, description="the global batch: with --workers N each rank takes batch_size / N")
    grad_accum: Positive = Field(1, description="micro-batches accumulated per optimizer step")
    lr: PositiveFloat = Field(1e-4, description="peak learning rate (AdamW, after warmup)")
    weight_decay: NonNegativeFloat = Field(0.02, description="AdamW weight decay")
    warmup_steps: NonNegative = Field(100, description="linear warmup from 0 to lr over this many steps")
    min_lr: NonNegativeFloat = Field(1e-6, description="learning rate the cosine decays to at the last step")
    grad_clip: PositiveFloat = Field(1.0, description="max global norm of the trainable gradients")
    eval_every: NonNegative = Field(0, description="evaluate every N steps; 0: only at the end")
    save_every: Positive = Field(200, description="checkpoint every N steps (and at the end)")
    max_eval_examples: Positive | None = Field(None, description="evaluate on the first N examples; null: all")
    num_workers: NonNegative = Field(2, description="DataLoader worker processes")
    shuffle_buffer: Positive = Field(1000, description="examples in the shuffle buffer tar shards stream through (WebDataset caches)")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N")
    log_every: Positive = Field(10, description="write loss, lr and examples/s every N steps")
    log_to: Annotated[list[Literal["jsonl", "tensorboard", "mlflow", "wandb"]], AfterValidator(log_targets)] = Field(
        default_factory=lambda: ["jsonl"],
        description="jsonl, plus any of tensorboard (OUT/tensorboard), mlflow, wandb (where MLFLOW_* / WANDB_* say)")
    max_failures: NonNegative = Field(3, description="--workers / --address: Ray Train restarts after a lost worker")
    model: dict[str, Any] = Field(default_factory=dict, description="the method's own options (model.KEY, below)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(error: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """pydantic's report as one line, `key: what is wrong, got VALUE` per bad key (`prefix` before
    each key, dotted into nested sections; an unknown key lists the known ones of its `model`)."""
    by_key: dict[str, dict[str, Any]] = {}
    for problem in error.errors():
        # a union member (`int | None`) or list index in the location is not part of the key
        path = [part for part in problem["loc"] if isinstance(part, str) and part.isidentifier()]
        key = (prefix + ".".join(path)).rstrip(".")  # "": the model's own check of several keys together
        # `int | None` reports a failure per member; the one that is not "should be None" says why
        if key not in by_key or by_key[key]["type"] == "none_required":
            by_key[key] = problem

    def what(problem: dict[str, Any]) -> str:
        if problem["type"] == "extra_forbidden":
            return f"unknown key (known: {', '.join(known_keys(model, problem['loc'][:-1]))})"
        if problem["type"] == "missing":
            return "required"
        if problem["type"] == "value_error":  # a model's own check: its message says it all
            return problem["msg"].removeprefix("Value error, ")
        return f"{problem['msg'].removeprefix('Input ')}, got {problem['input']!r}"

    return "; ".join(f"{key}: {what(problem)}" if key else what(problem) for key, problem in by_key.items())


def known_keys(model: type[BaseModel] | None, section: tuple[Any, ...]) -> list[str]:
    """The keys of `model`'s nested `section` (e.g. ("augment",)): the fields of the model its type names."""
    for name in section:
        if model is None or name not in model.model_fields:
            return []
        annotation = model.model_fields[name].annotation
        model = next((t for t in (annotation, *get_args(annotation)) if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return list(model.model_fields) if model is not None else []


def check_options(cls: type[M], data: Any, prefix: str) -> M:
    """A method's options (`model.*`) from plain data, every key known and every value of its type
    and in its range, or one ConfigError line naming each bad `prefix`KEY."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: should be a mapping, got {data!r}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, prefix, cls)) from None


def parse_scalar(raw: str) -> Any:
    """A YAML scalar, with `1e-4`-style numbers read as floats (YAML 1.1 would keep them strings)."""
    return yaml_float(yaml.safe_load(raw))


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


def make_config(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from plain data, every key known and every value of its type and in its range."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known: {sorted(known)}")
    try:
        return TrainConfig(**data)
    except ValidationError as e:
        raise ConfigError(describe(e)) from None


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
    return make_config(data)


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
