"""The interface every frozen expert implements, and what they share.

An expert is constructed cheaply (no weights) on the driver to validate options, then loaded
once per Ray actor, which keeps it resident for every shard it processes.
"""

from __future__ import annotations

import json
import struct
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from PIL import Image

from cache_schema import ClassTable, FeatureSpec, load_timm_model, model_revision
from precompute.experts import ExpertError, option_value
from precompute.sources import Sample, Source

PROCESSOR_CONFIG = "preprocessor_config.json"
# In the preprocessing hash of experts that resize uint8 tensors (`Source.load_image_tensor`) rather
# than Pillow images: the pixels differ by a level or two on under 1% of values, so a feature made
# one way is told apart from one made the other way, and a rerun into an old cache is refused as a changed spec.
PIXELS = "uint8 tensor, torch antialiased resize"


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


def looks_local(model_ref: str) -> bool:
    """Whether `model_ref` names a file or directory here rather than a hub id or timm name."""
    return model_ref.startswith(("/", ".", "~")) or Path(model_ref).expanduser().exists()


def check_model_files(expert: str, model_ref: str) -> None:
    """Refuse a local model that cannot load, in the driver, before anything is written or Ray starts.

    What can be checked without loading: the path exists; every JSON file at its top (config.json,
    the preprocessor and tokenizer configs) parses; every *.safetensors file's header parses and
    the file is as long as the header's tensors need (a copy cut short is the usual damage).
    Pickled weights (*.bin, *.pt) cannot be checked without unpickling them: the actor reports those.
    Hub ids and timm names pass: they are resolved where the model loads.
    """
    if not looks_local(model_ref):
        return
    path = Path(model_ref).expanduser()
    if not path.exists():
        raise ExpertError(f"{expert}: {model_ref}: no such model file or directory")
    if path.is_dir():
        for config in sorted(c for c in path.glob("*.json") if c.is_file()):  # not a FIFO: that would block here
            try:
                json.loads(config.read_bytes())
            except (OSError, ValueError) as e:
                raise ExpertError(f"{expert}: {config}: not readable JSON ({type(e).__name__}: {e})") from None
        weights = sorted(w for w in path.rglob("*.safetensors") if w.is_file())
    else:
        weights = [path] if path.suffix == ".safetensors" and path.is_file() else []
    for weight in weights:
        check_safetensors(expert, weight)


def check_safetensors(expert: str, path: Path) -> None:
    """A safetensors file is an 8-byte little-endian header length, a JSON header naming each
    tensor's byte range in the data that follows, and the data: refuse one whose header does not
    parse or whose data ends before the last tensor does."""
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
        needed = 8 + length + max(ends, default=0)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ExpertError(f"{expert}: {path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if size < needed:
        raise ExpertError(f"{expert}: {path}: truncated safetensors file ({size} bytes; its tensors need {needed})")


def uint8_tensor(image: torch.Tensor | Image.Image) -> torch.Tensor:
    """What the tensor-resizing experts' `preprocess` takes: the uint8 [3, H, W] tensor of
    `Source.load_image_tensor`, or a decoded RGB image (as scripts and tests hold them), made that
    tensor with the same pixels, so both give the same feature."""
    if isinstance(image, torch.Tensor):
        return image
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image)


def timm_tensor_transform(data_config: dict[str, Any], resize: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """timm's own eval transform for `data_config` (resize, crop, normalise) over the uint8 [3, H, W]
    tensors of `Source.load_image_tensor`, so decoding and resizing stay in libjpeg-turbo and
    torch's uint8 kernels, which release the GIL (Pillow's resize holds most of a sample's time).

    Its to-tensor step, which expects a PIL image, becomes a uint8 -> float [0, 1] conversion; its
    resize becomes torchvision's v2 resize with the same size, filter and antialiasing (v1's, on
    tensors, takes 5x longer: it resizes in float); crop and normalise stay as they are. Against the same
    transform of the same image through Pillow, resized pixels differ by at most two uint8 levels,
    on under 1% of values (tests/test_decode_tensor.py holds the bound), so features made this way
    carry their own preprocessing hash (`PIXELS`). With `resize=False`, only the conversion and
    normalisation: for images an augmentation has already cropped to the model's input size.
    """
    from timm.data import create_transform
    from torchvision.transforms import Compose, ConvertImageDtype, Resize, ToTensor, v2

    def on_tensors(step: Callable) -> Callable:
        if isinstance(step, ToTensor):
            return ConvertImageDtype(torch.float32)
        if type(step) is Resize:
            return v2.Resize(step.size, step.interpolation, step.max_size, step.antialias)
        return step

    steps = [on_tensors(step) for step in create_transform(**data_config, is_training=False).transforms]
    if not resize:
        steps = steps[next(i for i, step in enumerate(steps) if isinstance(step, ConvertImageDtype)):]
    return Compose(steps)


def has_processor_config(source: str) -> bool:
    """Whether the checkpoint (a `pretrained_source`) ships its own preprocessing config."""
    from transformers.utils import cached_file

    return cached_file(source, PROCESSOR_CONFIG, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False) is not None


class Expert(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    default_model: ClassVar[str]
    # option -> its default, whose type is the option's type (`precompute.experts.option_value`)
    options: ClassVar[dict[str, Any]] = {}
    # option -> one line saying what it changes, for `precompute experts` (a test holds every option to one)
    option_help: ClassVar[dict[str, str]] = {}
    # options that name a second model (a hub id or a path), checked before Ray starts like the expert's own
    model_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: str | None = None, device: str = "cpu", **options: Any):
        unknown = set(options) - set(self.options)
        if unknown:
            raise ExpertError(
                f"expert {self.name!r} has no option(s) {sorted(unknown)}; it takes {sorted(self.options) or 'none'}"
            )
        self.model_ref = model or self.default_model
        self.device = torch.device(device)
        self.config = {**self.options, **{k: option_value(self.name, k, v) for k, v in options.items()}}

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

    def check_model(self) -> None:
        """Refuse, in the driver and without loading it, a model that cannot load (`check_model_files`):
        the expert's own and each one an option in `model_options` names."""
        check_model_files(self.name, self.model_ref)
        for option in self.model_options:
            check_model_files(f"{self.name} {option}", str(self.config[option]))

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
