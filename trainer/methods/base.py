"""What a training method supplies to the shared loop.

The loop (trainer/loop.py) owns optimisation, checkpoints, logging and resume; a method owns
what is specific to it: which cached features it reads, how annotations become examples, how a
batch becomes a loss, and how to score predictions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from cache_schema import SplitReader
from trainer.config import TrainConfig


class MethodError(Exception):
    """The cache or config does not fit the method (missing feature, wrong width, bad option)."""


class Method(ABC):
    name: ClassVar[str]

    def __init__(self, config: TrainConfig):
        self.config = config

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

    def after_eval(self, out: Path, history: list[dict[str, Any]]) -> None:
        """Called after every evaluation during `fit` with all of the run's eval records so far
        (`{"step", "eval": metrics}`, oldest first): the place to draw a method's figures into `out`."""

    @abstractmethod
    def backbones(self) -> dict[str, dict[str, str]]:
        """Frozen models by role -> {"id", "revision"}: what a checkpoint is reloaded against."""

    def derive_state(self, train_reader: SplitReader) -> dict[str, Any]:
        """What the method learns from the training split that evaluation needs again (e.g. VQA's
        answer list); JSON, saved in checkpoint.json, so evaluating never reads the training split."""
        return {}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Take back what `derive_state` returned, before `build_model` when evaluating a checkpoint."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups; override for per-group learning rates."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": self.config.lr}]
