"""What a training method supplies to the shared loop.

The loop (trainer/loop.py) owns optimisation, checkpoints, logging and resume; a method owns
what is specific to it: which cached features it reads, how annotations become examples, how a
batch becomes a loss, and how to score predictions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader

from cache_schema import SplitReader
from trainer.config import TrainConfig, check_options
from trainer.methods.errors import MethodError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

T = TypeVar("T")


def looks_local(ref: str) -> bool:
    """Whether a model reference means a path on this machine rather than a hub id: it starts
    like a path, or the folder it names inside already exists (`models/opt` beside `models/`)."""
    if ref.startswith(("/", "./", "../", "~")) or ref in (".", ".."):
        return True
    parent = Path(ref).parent
    return parent != Path(".") and parent.is_dir()


def check_model_ref(key: str, ref: Any, revision: str | None = None, timm_name: bool = False) -> str:
    """`ref` (the value of config key `key`) if a frozen model can be loaded from it, else a
    one-line MethodError: cheap, so a method checks its references when it is made, before
    anything is written or any weights load.

    A missing local path is not passed on to the hub client (which reports it as a malformed
    repo id, in a long traceback); with HF_HUB_OFFLINE=1 a hub id (for `timm_name`, the hub repo
    of that timm model) must already be in the local Hugging Face cache.
    """
    if not isinstance(ref, str) or not ref:
        raise MethodError(f"{key}: expected a hub id or a local path, got {ref!r}")
    if Path(ref).expanduser().exists():
        return ref
    if looks_local(ref):
        raise MethodError(f"{key}: {ref} does not exist (a local path; a hub id looks like org/name)")
    from huggingface_hub import constants, try_to_load_from_cache

    repo = ref
    if timm_name:
        import timm

        pretrained = timm.models.get_pretrained_cfg(ref)
        if pretrained is None or not pretrained.hf_hub_id:
            raise MethodError(f"{key}: {ref} is neither a local directory nor a timm model name with hub weights")
        repo = pretrained.hf_hub_id
    if constants.HF_HUB_OFFLINE:
        try:
            cached = try_to_load_from_cache(repo, "config.json", revision=revision)
        except ValueError as e:  # not a well-formed repo id
            raise MethodError(f"{key}: {ref} is not a local path, nor a hub id ({one_line(e)})") from None
        if not isinstance(cached, str):
            raise MethodError(f"{key}: {ref} is not a local path, and as a hub id it is not in the local Hugging Face "
                              f"cache while HF_HUB_OFFLINE=1 (download it once with network access, or give a local directory)")
    return ref


def load_frozen(key: str, ref: str, load: Callable[[], T], revision: str | None = None, timm_name: bool = False) -> T:
    """`load()` of the frozen model config key `key` names, after `check_model_ref`; what the hub
    client or the model class raises about it (missing or unreadable files, a model of the wrong
    kind) becomes one MethodError line naming the key."""
    check_model_ref(key, ref, revision, timm_name)
    try:
        return load()
    except (OSError, ValueError) as e:
        raise MethodError(f"{key}: cannot load {ref}: {one_line(e)}") from e


def one_line(error: BaseException) -> str:
    """The first line of an exception's message (hub errors run to several lines of advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class Method(ABC):
    name: ClassVar[str]
    # the method's `model.*` keys: every one typed, ranged and described (`trainer config` lists them)
    Options: ClassVar[type[BaseModel]]

    def __init__(self, config: TrainConfig):
        """Checks `config.model` against `Options` first: a bad key or value is one ConfigError
        line naming `model.KEY`, before anything loads."""
        self.config = config
        self.options = check_options(self.Options, config.model, "model.")

    @abstractmethod
    def feature_fields(self) -> dict[str, str]:
        """Batch field -> `feature/array` in the cache, e.g. {"visual": "vit-cls/cls"}."""

    @abstractmethod
    def check_cache(self, reader: SplitReader) -> None:
        """Raise MethodError, before any training, if the cached specs do not fit the config."""

    @abstractmethod
    def build_model(self, reader: SplitReader) -> nn.Module:
        """Frozen backbone(s) + trainable parts; only trainable parameters require grad."""

    @abstractmethod
    def expand(self, annotations: dict[str, Any], train: bool) -> list[dict[str, Any]]:
        """Training (or evaluation) examples from one cached sample's annotations."""

    @abstractmethod
    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Examples -> a batch (runs in DataLoader workers)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor: ...

    @abstractmethod
    def predict(self, model: nn.Module, loader: DataLoader) -> list[dict[str, Any]]:
        """One record per example: its key, what the model produced, and what it is scored against."""

    @abstractmethod
    def score(self, predictions: list[dict[str, Any]]) -> dict[str, Any]:
        """The method's metrics over `predict`'s records (numbers, or lists of numbers)."""

    def evaluate(self, model: nn.Module, loader: DataLoader) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The metrics and the records they were scored from. A method whose metrics include numbers
        over the whole split that no per-example record carries (MoPE's routing) overrides this, and
        returns them here rather than keeping them on itself between `predict` and `score`."""
        predictions = self.predict(model, loader)
        return self.score(predictions), predictions

    def figures(self, history: list[dict[str, Any]]) -> dict[str, Figure]:
        """The method's figures by name, drawn from all of the run's eval records so far
        (`{"step", "eval": metrics}`, oldest first); called after every evaluation during `fit`,
        which writes each to OUT/<name>.png (and to the trackers `log_to` names)."""
        return {}

    @abstractmethod
    def backbones(self) -> dict[str, dict[str, str]]:
        """Frozen models by role -> {"id", "revision"}: what a checkpoint is reloaded against."""

    def derive_state(self, train_reader: SplitReader) -> dict[str, Any]:
        """What the method learns from the training split that evaluation needs again (e.g. VQA's
        answer list); JSON, saved in checkpoint.json, so evaluating never reads the training split."""
        return {}

    def restore_state(self, state: dict[str, Any]) -> None:  # noqa: B027  (optional hook: the default derives nothing)
        """Take back what `derive_state` returned, before `build_model` when evaluating a checkpoint."""

    def view_fields(self) -> dict[str, str]:
        """Batch field -> the cached feature whose augmented views (`--expert-opt views=V`) training may
        read in that field's place, as the method's `model.views` says: each epoch reads, per sample,
        one of the clean array and its V views, a seeded draw (trainer/data.py: pick_view). Evaluation
        reads `feature_fields` alone, the clean features. Default: none."""
        return {}

    def feature_sources(self, reader: SplitReader, usable: Any) -> dict[str, Any]:
        """Batch field -> int array [num_samples]: the sample each sample reads that field from, for
        fields that do not come from the sample itself (a control that swaps inputs between samples);
        `usable` is the boolean mask of samples that may be read. Default: every field is its own."""
        return {}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups; override for per-group learning rates."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": self.config.lr}]
