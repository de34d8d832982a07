"""Feature specs: the identity of a cached feature.

Two runs may write into the same feature only if they would produce the same thing, so a spec
names everything that changes the bytes: the expert, the model and its revision, a hash of the
preprocessing, and the dtype and per-sample shape of every array the expert emits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class SpecMismatchError(Exception):
    """A run's spec differs from the one a feature was created with."""


def config_hash(config: Any) -> str:
    """A short stable hash of a JSON-serialisable config (key order does not matter)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_revision(model: str, revision: str | None = None) -> tuple[str, str]:
    """(model id, revision) for provenance.

    A local file or directory is identified by its absolute path and a digest of its weight files, so
    retraining a stand-in model in place changes the revision and the cache notices.
    """
    path = Path(model).expanduser()
    if path.exists():
        candidates = [path] if path.is_file() else path.rglob("*")
        weights = sorted(p for p in candidates if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".h5", ".onnx"})
        if not weights:
            raise ValueError(f"{path}: no weight files (*.safetensors, *.bin, *.pt, *.pth, *.h5, *.onnx)")
        digest = hashlib.sha256()
        for weight in weights:
            with weight.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        return str(path.resolve()), "sha256:" + digest.hexdigest()[:16]
    return model, revision or "main"


RAGGED_LENGTH_SUFFIX = "_length"
TEXT_DTYPE = "str"
# A feature's augmented views (an expert's `views=V`): [V, *clean shape] per sample beside its one clean
# array, which a trainer may read in the clean one's place while training (precompute/experts/views.py).
VIEWS_ARRAY = "views"


@dataclass(frozen=True)
class ArraySpec:
    """One output of an expert: `shape` is per sample (the cache adds the sample axis).

    Three kinds, all plain typed Zarr arrays (never pickles):
    - dense: every sample has exactly `shape`.
    - ragged (`ragged=True`): a sample holds a variable number of items, at most `shape[0]`, each
      of shape `shape[1:]` (instances of an image, words of an OCR result). Stored padded to
      `shape[0]` beside a `<name>_length` array; the padding is zeros inside a zstd-compressed
      one-sample chunk, so it costs a few bytes, and readers hand back only the real items.
    - text (`dtype="str"`, shape ()): one variable-length UTF-8 string per sample.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    ragged: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.ragged and not self.shape:
            raise ValueError(f"ragged array {self.name!r} needs a capacity as shape[0]")
        if self.dtype == TEXT_DTYPE and (self.shape or self.ragged):
            raise ValueError(f"text array {self.name!r} holds one string per sample: shape () and not ragged")

    @property
    def length_dtype(self) -> str:
        capacity = self.shape[0]
        return "uint8" if capacity <= 0xFF else "uint16" if capacity <= 0xFFFF else "uint32"

    def stored(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, per-sample shape) of the Zarr arrays that hold this output."""
        if self.ragged:
            return [(self.name, self.dtype, self.shape), (self.name + RAGGED_LENGTH_SUFFIX, self.length_dtype, ())]
        return [(self.name, self.dtype, self.shape)]


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that determines a feature's content.

    `params` carries expert-specific facts a reader needs to check compatibility (e.g. which
    encoder layers a [CLS] stack came from, the label resolution); it is part of the identity.
    """

    name: str
    expert: str
    model_id: str
    revision: str
    preprocess_hash: str
    arrays: tuple[ArraySpec, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def array(self, name: str) -> ArraySpec:
        for array in self.arrays:
            if array.name == name:
                return array
        raise KeyError(f"feature {self.name!r} has no array {name!r} (has {[a.name for a in self.arrays]})")

    def stored_arrays(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [stored for array in self.arrays for stored in array.stored()]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["arrays"] = [
            {"name": a.name, "dtype": a.dtype, "shape": list(a.shape), **({"ragged": True} if a.ragged else {})}
            for a in self.arrays
        ]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        arrays = tuple(ArraySpec(a["name"], a["dtype"], tuple(a["shape"]), a.get("ragged", False)) for a in data["arrays"])
        return cls(
            name=data["name"],
            expert=data["expert"],
            model_id=data["model_id"],
            revision=data["revision"],
            preprocess_hash=data["preprocess_hash"],
            arrays=arrays,
            params=dict(data.get("params", {})),
        )

    def differences(self, other: FeatureSpec) -> list[str]:
        """Human-readable list of what differs, `self` being the cached spec."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{key}: cache has {json.dumps(mine[key])}, this run has {json.dumps(theirs[key])}"
            for key in mine
            if mine[key] != theirs[key]
        ]

    def require_same(self, other: FeatureSpec) -> None:
        diffs = self.differences(other)
        if diffs:
            raise SpecMismatchError(
                f"feature {self.name!r} was made with a different spec; refusing to mix them "
                f"(pass --overwrite to replace it):\n  " + "\n  ".join(diffs)
            )
