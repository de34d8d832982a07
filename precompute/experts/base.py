"""The interface every frozen expert implements, and what they share.

An expert is constructed cheaply (no weights) on the driver to validate options, then loaded
once per Ray actor, which keeps it resident for every shard it processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cache_schema import ClassTable, FeatureSpec, load_timm_model, model_revision
from precompute.experts import ExpertError
from precompute.sources import Sample, Source

PROCESSOR_CONFIG = "preprocessor_config.json"


def pretrained_source(expert: str, model_ref: str, model_config: bool = True) -> str:
    """What `from_pretrained` takes for `model_ref`: a local `save_pretrained` directory (expanded)
    or a hub id. A path that is not there, or (with `model_config`) a directory with no config.json,
    is refused here, naming it, rather than surfacing as a hub lookup of a file name. Tokenizers
    are read from directories without a model config, so they pass `model_config=False`."""
    path = Path(model_ref).expanduser()
    if path.is_dir():
        if model_config and not (path / "config.json").is_file():
            raise ExpertError(f"{expert}: {path} is not a transformers model directory (no config.json; "
                              "write it with save_pretrained)")
        return str(path)
    if model_ref.startswith(("/", ".", "~")):
        raise ExpertError(f"{expert}: {model_ref}: no such model directory")
    return model_ref


def has_processor_config(source: str) -> bool:
    """Whether the checkpoint (a `pretrained_source`) ships its own preprocessing config."""
    from transformers.utils import cached_file

    return cached_file(source, PROCESSOR_CONFIG, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False) is not None


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
