"""Commit records: the only proof that a shard is done.

A shard's arrays may exist half-written after a crash; only a record that matches the cache's
spec and the shard's keys counts. It is written last, atomically, by the one writer of the shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache_schema.layout import SCHEMA_VERSION, CacheError, read_json, write_json_atomic

# Where a shard's seconds went, in pipeline order: decode and preprocess are summed over the decode
# threads (CPU-side work, in parallel); wait is the forward loop idle for want of decoded samples;
# forward the batched model calls; write the arrays' packing, compression and storage.
PROFILE_STAGES = ("decode", "preprocess", "wait", "forward", "write")


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def content_checksum(arrays: dict[str, np.ndarray], valid: np.ndarray) -> str:
    """sha256 over every stored array (in name order) and the validity mask.

    Text arrays hash their UTF-8 strings (each length-prefixed), not their in-memory form, which
    differs between the writer's object array and the reader's numpy string array.
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        digest.update(name.encode())
        digest.update(str(array.shape).encode())
        if array.dtype.kind in "OTU":
            digest.update(b"str")
            for text in array.reshape(-1).tolist():
                encoded = str(text).encode()
                digest.update(len(encoded).to_bytes(8, "little") + encoded)
        else:
            digest.update(str(array.dtype).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(np.ascontiguousarray(valid, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def gap_category(reason: str, width: int = 40) -> str:
    """A gap's reason cut to its kind, for counting: decoders write `KIND: DETAIL` ("cannot decode:
    OSError: ...", "file not found: /data/x.jpg"), so the text before the first ':' groups them."""
    kind = str(reason).split(":", 1)[0].strip() or "no reason"
    return kind if len(kind) <= width else kind[: width - 3] + "..."


@dataclass
class CommitRecord:
    feature: str
    shard: int
    start: int
    stop: int
    num_samples: int
    num_valid: int
    keys_digest: str
    checksum: str
    expert: str
    model_id: str
    revision: str
    preprocess_hash: str
    dtypes: dict[str, str]
    shapes: dict[str, list[int]]
    code_version: str
    seconds: float
    samples_per_s: float
    host: str
    device: str
    invalid: dict[str, str] = field(default_factory=dict)
    node: str = ""  # the Ray node that wrote it: on a cluster, several nodes can share a host name
    profile: dict[str, float] = field(default_factory=dict)  # seconds per PROFILE_STAGES stage; {} in older records
    schema_version: int = SCHEMA_VERSION

    def write(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> CommitRecord:
        data = read_json(path)
        try:
            return cls(**data)
        except TypeError as e:
            raise CacheError(f"{path}: not a commit record ({e})") from e

    def mismatch(self, spec_dict: dict[str, Any], keys: list[str]) -> str | None:
        """Why this record does not vouch for the shard as the cache now defines it, or None."""
        if self.schema_version != SCHEMA_VERSION:
            return f"schema version {self.schema_version} != {SCHEMA_VERSION}"
        for name in ("expert", "model_id", "revision", "preprocess_hash"):
            if getattr(self, name) != spec_dict[name]:
                return f"{name} {getattr(self, name)!r} != spec {spec_dict[name]!r}"
        expected = {a["name"]: a["dtype"] for a in spec_dict["arrays"]}
        if self.dtypes != expected:
            return f"dtypes {self.dtypes} != spec {expected}"
        if self.num_samples != len(keys) or self.stop - self.start != len(keys):
            return f"{self.num_samples} samples recorded, the plan has {len(keys)}"
        if self.keys_digest != keys_digest(keys):
            return "keys digest differs from the samples table"
        return self.gap_problem(keys)

    def gap_problem(self, keys: list[str]) -> str | None:
        """Why this record's gaps do not account for its invalid samples, or None.

        Every invalid sample must carry a reason: a record with unexplained gaps (what a worker
        that processed nothing once committed) vouches for nothing, so the shard runs again.
        """
        unknown = sorted(set(self.invalid) - set(keys))
        if unknown:
            return f"gap reasons name {len(unknown)} key(s) not in this shard (first: {unknown[0]!r})"
        gaps = self.num_samples - self.num_valid
        if gaps != len(self.invalid):
            return (f"{gaps} invalid sample(s) but {len(self.invalid)} with a reason: "
                    "gaps without a reason are samples lost silently")
        blank = sorted(key for key, reason in self.invalid.items() if not str(reason).strip())
        if blank:
            return f"{len(blank)} gap(s) with an empty reason (first: {blank[0]!r})"
        return None


def vouching_record(path: Path, spec_dict: dict[str, Any], keys: list[str]) -> CommitRecord | None:
    """The record at `path` if it vouches for a shard with these keys under this spec, else None.

    Anything unreadable (missing, torn, a directory in its place, another schema) is "not done":
    the shard is simply run again.
    """
    try:
        record = CommitRecord.read(path)
    except (CacheError, OSError):
        return None
    return record if record.mismatch(spec_dict, keys) is None else None
