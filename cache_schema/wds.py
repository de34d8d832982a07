"""The WebDataset form of a feature: one tar per precompute shard, for streaming from object stores.

    CACHE/<source>/<split>/<feature>/<shard>.tar     members, in the shard's key order:
        {key}.{feature}.{array}.npy                   one per stored array (numpy .npy, no pickles)
        {key}.{feature}.{array}.txt                   text arrays, UTF-8

A sample whose input was bad (a recorded gap) has no members: the tar holds only valid samples,
and the commit record says which keys are missing and why. The members are exactly the Zarr
form's stored arrays (ragged outputs padded to capacity beside their `_length`), so a reader gets
the same arrays from either form and a shard's content checksum is the same in both.

A tar is written whole under a temporary name and renamed into place (one PUT on object
stores), then the commit record is written: a reader never sees a torn tar that looks done.
Bytes are deterministic (sorted-by-key members, zero mtimes, no owner names), so a re-run writes
the same file.
"""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cache_schema.layout import CacheError, publish
from cache_schema.spec import TEXT_DTYPE, FeatureSpec

FORMATS = ("zarr", "wds")


def shard_tar_path(feature_dir: Path, shard: int) -> Path:
    return feature_dir / f"{shard:05d}.tar"


def member_name(key: str, feature: str, array: str, dtype: str) -> str:
    return f"{key}.{feature}.{array}.{'txt' if dtype == TEXT_DTYPE else 'npy'}"


def encode(value: Any, dtype: str) -> bytes:
    if dtype == TEXT_DTYPE:
        return str(value).encode()
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(value), allow_pickle=False)
    return buffer.getvalue()


def decode(data: bytes, dtype: str) -> Any:
    if dtype == TEXT_DTYPE:
        return data.decode()
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_tar_shard(path: Path, spec: FeatureSpec, keys: list[str], stored: dict[str, np.ndarray], valid: np.ndarray) -> None:
    """Write one shard's valid samples as a tar at `path` (temp name, then rename)."""
    dtypes = {name: dtype for name, dtype, _ in spec.stored_arrays()}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, key in enumerate(keys):
            if not valid[i]:
                continue
            for name in sorted(dtypes):
                data = encode(stored[name][i], dtypes[name])
                info = tarfile.TarInfo(member_name(key, spec.name, name, dtypes[name]))
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("wb") as f:
        f.write(buffer.getvalue())
    publish(tmp, path)


def iter_tar_samples(path: Path, spec: FeatureSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {stored array: value}) for each sample in a tar, read front to back in one pass.

    Streaming (`r|`), so on an object store this is one sequential GET per shard, never a seek.
    """
    suffixes = {f".{spec.name}.{name}.{'txt' if dtype == TEXT_DTYPE else 'npy'}": (name, dtype)
                for name, dtype, _ in spec.stored_arrays()}
    key, sample = None, {}
    try:
        with path.open("rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                match = next((s for s in suffixes if info.name.endswith(s)), None)
                if match is None or not info.isfile():
                    raise CacheError(f"{path}: unexpected member {info.name!r} (not an array of feature {spec.name!r})")
                member_key = info.name[: -len(match)]
                if member_key != key:
                    if key is not None:
                        yield key, sample
                    key, sample = member_key, {}
                name, dtype = suffixes[match]
                sample[name] = decode(tar.extractfile(info).read(), dtype)
    except tarfile.TarError as e:
        raise CacheError(f"{path}: not a readable tar ({e})") from e
    if key is not None:
        yield key, sample


def empty_arrays(spec: FeatureSpec, count: int) -> dict[str, np.ndarray]:
    """The stored arrays of `count` samples that have no data: zeros, empty strings (Zarr's fill values)."""
    return {name: (np.full(count, "", dtype=object) if dtype == TEXT_DTYPE else np.zeros((count, *shape), dtype=dtype))
            for name, dtype, shape in spec.stored_arrays()}


def read_tar_shard(path: Path, spec: FeatureSpec, keys: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A whole shard as the Zarr form's stored arrays (absent samples zero-filled) + validity mask."""
    arrays = empty_arrays(spec, len(keys))
    valid = np.zeros(len(keys), dtype=np.uint8)
    position = {key: i for i, key in enumerate(keys)}
    for key, sample in iter_tar_samples(path, spec):
        i = position.get(key)
        if i is None or valid[i]:
            raise CacheError(f"{path}: sample {key!r} is {'listed twice' if i is not None else 'not in this shard'}")
        if set(sample) != set(arrays):
            raise CacheError(f"{path}: sample {key!r} has arrays {sorted(sample)}, the spec stores {sorted(arrays)}")
        for name, value in sample.items():
            arrays[name][i] = value
        valid[i] = 1
    return arrays, valid
