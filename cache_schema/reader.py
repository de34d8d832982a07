"""Reading a cache: `open_cache` -> its splits -> samples, annotations, features, and PyTorch datasets.

    cache = open_cache("./cache")                      # a directory or an fsspec URL
    split = cache.split("shapes/train")                # a SplitReader
    split.features["vit-cls"]                          # FeatureSpec: expert, model id + revision, arrays
    split.torch_dataset({"visual": "vit-cls/cls"})     # random access (cache_schema/torch_data.py)
    split.iterable_dataset({"visual": "vit-cls/cls"})  # streaming, shard by shard (tar shards)

Only shards with a matching commit record are readable as data: a sample whose shard is not
committed reads as invalid, so a half-written shard can never leak into training. Features stored
as WebDataset tars read through the same interface (a whole shard's tar at a time). Nothing here
imports torch until a dataset is built: reading a cache stays light.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from cache_schema.commit import CommitRecord, vouching_record
from cache_schema.layout import CacheError, CacheLayout, open_group, read_json
from cache_schema.spec import RAGGED_LENGTH_SUFFIX, TEXT_DTYPE, ArraySpec, FeatureSpec
from cache_schema.wds import empty_arrays, read_tar_shard, shard_tar_path
from cache_schema.writer import VALID_ARRAY

if TYPE_CHECKING:  # torch: only when a dataset is built
    from cache_schema.torch_data import CacheDataset, Expand, ShardStream


def list_splits(root: str | Path) -> list[tuple[str, str]]:
    """(source, split) pairs the cache holds."""
    layout = CacheLayout(root)
    layout.require_exists()
    return [tuple(name.split("/", 1)) for name in sorted(layout.read_manifest()["splits"])]


class Cache:
    """A feature cache, opened for reading: its splits and their features."""

    def __init__(self, location: str | Path):
        self.layout = CacheLayout(location)
        self.layout.require_exists()
        self.root = self.layout.root

    @property
    def sources(self) -> list[str]:
        return sorted({source for source, _ in list_splits(self.root)})

    @cached_property
    def splits(self) -> dict[str, SplitReader]:
        """`source/split` -> its reader, for every split the cache holds."""
        return {f"{source}/{split}": SplitReader(self.root, source, split) for source, split in list_splits(self.root)}

    def split(self, name: str, source: str | None = None) -> SplitReader:
        """`name` as `source/split`, or a bare split name of `source` (default: the cache's only source)."""
        if "/" not in name:
            if source is None:
                if len(self.sources) != 1:
                    raise CacheError(f"{self.root} holds sources {self.sources}; name the split as SOURCE/{name}")
                source = self.sources[0]
            name = f"{source}/{name}"
        if name not in self.splits:
            raise CacheError(f"{self.root}: no split {name} (the cache has: {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r}, splits={list(self.splits)})"


def open_cache(location: str | Path) -> Cache:
    """The cache at a directory or fsspec URL (`s3://bucket/cache`), for reading; CacheError if none is there."""
    return Cache(location)


class SplitReader:
    """One `<source>/<split>` of a cache: its samples table and its features."""

    def __init__(self, root: str | Path, source: str, split: str):
        self.layout = CacheLayout(root)
        self.layout.require_exists()
        self.source, self.split = source, split
        self.dir = self.layout.split_dir(source, split)
        header_path = self.dir / "split.json"
        if not header_path.exists():
            have = ", ".join(f"{s}/{p}" for s, p in list_splits(root)) or "none"
            raise CacheError(f"{self.layout.root}: no split {source}/{split} (the cache has: {have})")
        self.header: dict[str, Any] = read_json(header_path)
        self.num_samples: int = self.header["num_samples"]
        self.shard_size: int = self.header["shard_size"]
        self.num_shards: int = self.header["num_shards"]

    def __repr__(self) -> str:
        return f"SplitReader({self.source}/{self.split}: {self.num_samples} samples, features {self.feature_names})"

    @cached_property
    def _samples(self) -> list[dict[str, Any]]:
        with (self.dir / "samples.jsonl").open() as f:
            return [json.loads(line) for line in f]

    @cached_property
    def keys(self) -> list[str]:
        return [s["key"] for s in self._samples]

    @cached_property
    def annotations(self) -> list[dict[str, Any]]:
        return [s["annotations"] for s in self._samples]

    @cached_property
    def _index(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.keys)}

    def index_of(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"{self.source}/{self.split} has no sample {key!r}") from None

    def shard_keys(self, shard: int) -> list[str]:
        return self.keys[shard * self.shard_size : (shard + 1) * self.shard_size]

    @property
    def feature_names(self) -> list[str]:
        prefix = f"{self.source}/{self.split}/"
        return sorted(k[len(prefix) :] for k in self.layout.read_manifest()["features"] if k.startswith(prefix))

    def _entry(self, feature: str) -> dict[str, Any]:
        entry = self.layout.read_manifest()["features"].get(f"{self.source}/{self.split}/{feature}")
        if entry is None:
            raise CacheError(
                f"{self.layout.root}: {self.source}/{self.split} has no feature {feature!r} "
                f"(it has: {', '.join(self.feature_names) or 'none'}); run `precompute run --expert ...` first"
            )
        return entry

    @property
    def features(self) -> dict[str, FeatureSpec]:
        """Feature name -> its spec: the expert, model id + revision, preprocessing hash and arrays
        that made it (per-shard provenance: `feature(name).commit_records()`)."""
        return {name: self.spec(name) for name in self.feature_names}

    def spec(self, feature: str) -> FeatureSpec:
        return FeatureSpec.from_dict(self._entry(feature))

    def feature(self, name: str) -> FeatureReader:
        entry = self._entry(name)
        return FeatureReader(self, FeatureSpec.from_dict(entry), entry.get("format", "zarr"))

    def feature_arrays(self, features: dict[str, str]) -> dict[str, tuple[FeatureReader, ArraySpec]]:
        """Batch field -> (its feature, its array) for a `{field: "feature/array"}` mapping; a
        CacheError naming the field and what the cache has for a path that is not there."""
        resolved = {}
        for field_name, path in features.items():
            feature_name, slash, array_name = str(path).partition("/")
            if not slash or not array_name:
                raise CacheError(f"{field_name!r}: {path!r} is not FEATURE/ARRAY (e.g. vit-cls/cls)")
            feature = self.feature(feature_name)
            try:
                resolved[field_name] = feature, feature.spec.array(array_name)
            except KeyError:
                raise CacheError(f"{field_name!r}: feature {feature_name!r} of {self.source}/{self.split} has no array "
                                 f"{array_name!r} (it has: {', '.join(a.name for a in feature.spec.arrays)})") from None
        return resolved

    def torch_dataset(self, features: dict[str, str], expand: Expand | None = None, *, max_examples: int | None = None,
                      sources: Any = None) -> CacheDataset:
        """A map-style `torch.utils.data.Dataset` of this split's examples (random access).

        `features`: batch field -> `feature/array`, e.g. `{"visual": "vit-cls/cls"}`.
        `expand(annotations) -> [example, ...]`: the examples one sample yields (default: one, with
        no annotation fields). Items are `{"key", **example, field: np.ndarray}`.
        """
        from cache_schema.torch_data import CacheDataset

        return CacheDataset(self, features, expand, max_examples=max_examples, sources=sources)

    def iterable_dataset(self, features: dict[str, str], expand: Expand | None = None, *, seed: int = 0,
                         shuffle_buffer: int = 1000, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                         batch_size: int = 1) -> ShardStream:
        """A `torch.utils.data.IterableDataset` that streams this split shard by shard (one
        sequential read per tar: what object stores want), shuffled by seed and `.epoch`.

        `num_workers` must match the DataLoader's; `rank`/`world_size` give each data-parallel rank
        its own shards; `batch_size` (per rank) sizes `batches_per_rank(epoch)`, the batch count
        every rank can fill. Arguments as `torch_dataset`.
        """
        from cache_schema.torch_data import ShardStream

        return ShardStream(self, features, expand, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                           num_workers=num_workers, shuffle_buffer=shuffle_buffer)


class FeatureReader:
    """Random access to one feature, in either storage format (`zarr` or `wds`).

    Storage opens lazily so the reader pickles into DataLoader workers. Tar shards are read whole;
    the last one read is kept, so reading samples in shard order touches each tar once.
    """

    def __init__(self, split: SplitReader, spec: FeatureSpec, format: str = "zarr"):
        self.split, self.spec, self.format = split, spec, format
        self.path = split.layout.feature_dir(split.source, split.split, spec.name)
        self._group: zarr.Group | None = None
        self._tar: tuple[int, dict[str, np.ndarray], np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_group": None, "_tar": None}

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = open_group(self.path, mode="r")
        return self._group

    def commit_records(self) -> dict[int, CommitRecord]:
        """Shard -> the record vouching for it, for every committed shard."""
        split, spec_dict = self.split, self.spec.to_dict()
        records = {
            shard: vouching_record(split.layout.commit_path(split.source, split.split, self.spec.name, shard), spec_dict, split.shard_keys(shard))
            for shard in range(split.num_shards)
        }
        return {shard: record for shard, record in records.items() if record is not None}

    def committed_shards(self) -> list[int]:
        return sorted(self.commit_records())

    @cached_property
    def usable(self) -> np.ndarray:
        """Per-sample bool: committed shard and valid input. The trainer's sample filter.

        Tar shards are not opened for this: their records list the keys that are gaps.
        """
        mask = np.zeros(self.split.num_samples, dtype=bool)
        valid = self.group[VALID_ARRAY][:].astype(bool) if self.format == "zarr" else None
        for shard, record in self.commit_records().items():
            start, stop = record.start, record.stop
            if valid is not None:
                mask[start:stop] = valid[start:stop]
            else:
                mask[start:stop] = [key not in record.invalid for key in self.split.shard_keys(shard)]
        return mask

    def shard(self, shard: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """One shard's stored arrays and validity mask, whatever the format."""
        start = shard * self.split.shard_size
        stop = min(start + self.split.shard_size, self.split.num_samples)
        if self.format == "zarr":
            arrays = {name: self.group[name][start:stop] for name, _, _ in self.spec.stored_arrays()}
            return arrays, self.group[VALID_ARRAY][start:stop]
        if self._tar is None or self._tar[0] != shard:
            self._tar = (shard, *read_tar_shard(shard_tar_path(self.path, shard), self.spec, self.split.shard_keys(shard)))
        return self._tar[1], self._tar[2]

    def get(self, index: int) -> dict[str, Any]:
        """One sample's outputs: arrays (ragged ones cut to their length) and strings."""
        if self.format == "zarr":
            stored = {name: self.group[name][index] for name, _, _ in self.spec.stored_arrays()}
        else:
            arrays, _ = self.shard(index // self.split.shard_size)
            stored = {name: array[index % self.split.shard_size] for name, array in arrays.items()}
        sample: dict[str, Any] = {}
        for array in self.spec.arrays:
            value = stored[array.name]
            if array.ragged:
                value = value[: int(stored[array.name + RAGGED_LENGTH_SUFFIX])]
            elif array.dtype == TEXT_DTYPE:
                value = str(value)
            sample[array.name] = value
        return sample

    def get_by_key(self, key: str) -> dict[str, np.ndarray]:
        return self.get(self.split.index_of(key))

    def read(self, array: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A contiguous block of one array: whole shards at a time is the efficient pattern.

        Tar shards that are not committed read as zeros (their samples are not `usable`).
        """
        if self.format == "zarr":
            return self.group[array][start:stop]
        stop = self.split.num_samples if stop is None else stop
        size = self.split.shard_size
        committed = set(self.committed_shards())
        blocks = []
        for shard in range(start // size, -(-stop // size)):
            lo, hi = max(start, shard * size) - shard * size, min(stop, (shard + 1) * size) - shard * size
            if shard in committed:
                blocks.append(self.shard(shard)[0][array][lo:hi])
            else:
                blocks.append(empty_arrays(self.spec, hi - lo)[array])
        return np.concatenate(blocks)
