"""The interface every frozen expert implements, and what they share.

An expert is constructed cheaply (no weights) on the driver to validate options, then loaded
once per Ray actor, which keeps it resident for every shard it processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from cache_schema import ClassTable, FeatureSpec, load_timm_model, model_revision
from precompute.experts import ExpertError
from precompute.sources import Sample, Source


class Expert(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    default_model: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: str | None = None, device: str = "cpu", **options: Any):
        unknown = set(options) - set(self.options)
        if unknown:
            raise ExpertError(
                f"expert {self.name!r} has no option(s) {sorted(unknown)}; it takes {sorted(self.options) or 'none'}"
            )
        self.model_ref = model or self.default_model
        self.device = torch.device(device)
        self.config = {**self.options, **{k: type(self.options[k])(v) for k, v in options.items()}}

    @property
    def dtype(self) -> torch.dtype:
        """Half precision on GPU (the frozen forward is the expensive part); float32 on CPU."""
        return torch.float16 if self.device.type == "cuda" else torch.float32

    def requires(self) -> tuple[str, ...]:
        """Cached features (by expert name) this expert reads for each shard it labels.

        The engine runs them first when asked for both, and refuses shards where they are not
        committed; their arrays for the batch reach `predict` as `inputs[name][array]`.
        """
        return ()

    def tables(self) -> dict[str, ClassTable]:
        """Class-name embedding tables this expert's labels index into (stored once per cache)."""
        return {}

    @abstractmethod
    def load(self) -> None:
        """Load weights (once per actor)."""

    def load_frozen_timm(self) -> torch.nn.Module:
        """`model_ref` as a frozen timm model on this expert's device and dtype; sets the provenance
        (`model_id`, `revision`) that the expert's spec records."""
        try:
            model = load_timm_model(self.model_ref).eval().to(self.device, self.dtype)
        except FileNotFoundError as e:
            raise ExpertError(str(e)) from e
        model.requires_grad_(False)
        self.model_id, self.revision = model_revision(self.model_ref)
        return model

    @abstractmethod
    def spec(self, feature: str) -> FeatureSpec:
        """The feature spec this loaded expert writes."""

    def read_input(self, source: Source, sample: Sample) -> Any:
        """What this expert looks at in one sample: the decoded image, unless it reads text.

        Raises MediaError when the sample has nothing usable, which records it as a gap.
        """
        return source.load_image(sample)

    @abstractmethod
    def preprocess(self, media: Any) -> torch.Tensor:
        """CPU work for one sample's `read_input`; runs in decode threads, overlapping `predict`.

        Returns one fixed-shape tensor per sample: the engine stacks them into a batch.
        """

    @abstractmethod
    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
        """Batched frozen forward + postprocess to the spec's arrays (sample axis first).

        Dense outputs are arrays [B, ...]; ragged outputs a list of B arrays [items, ...]; text
        outputs a list of B strings. `inputs` holds the required features' arrays for the batch.
        """
