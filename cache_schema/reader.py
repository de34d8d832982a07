"""Reading a cache: samples and annotations by index or key, features by sample.

Only shards with a matching commit record are readable as data: a sample whose shard is not
committed reads as invalid, so a half-written shard can never leak into training.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cache_schema.commit import vouching_record
from cache_schema.layout import CacheError, CacheLayout, read_json
from cache_schema.spec import RAGGED_LENGTH_SUFFIX, TEXT_DTYPE, FeatureSpec
from cache_schema.writer import VALID_ARRAY


def list_splits(root: str | Path) -> list[tuple[str, str]]:
    """(source, split) pairs the cache holds."""
    layout = CacheLayout(root)
    layout.require_exists()
    return [tuple(name.split("/", 1)) for name in sorted(layout.read_manifest()["splits"])]


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

    def spec(self, feature: str) -> FeatureSpec:
        entry = self.layout.read_manifest()["features"].get(f"{self.source}/{self.split}/{feature}")
        if entry is None:
            raise CacheError(
                f"{self.layout.root}: {self.source}/{self.split} has no feature {feature!r} "
                f"(it has: {', '.join(self.feature_names) or 'none'}); run `precompute run --expert ...` first"
            )
        return FeatureSpec.from_dict(entry)

    def feature(self, name: str) -> FeatureReader:
        return FeatureReader(self, self.spec(name))


class FeatureReader:
    """Random access to one feature; zarr arrays open lazily so the reader pickles into workers."""

    def __init__(self, split: SplitReader, spec: FeatureSpec):
        self.split, self.spec = split, spec
        self.path = split.layout.feature_dir(split.source, split.split, spec.name)
        self._group: zarr.Group | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_group": None}

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(str(self.path), mode="r")
        return self._group

    def committed_shards(self) -> list[int]:
        split, spec_dict = self.split, self.spec.to_dict()
        return [
            shard
            for shard in range(split.num_shards)
            if vouching_record(split.layout.commit_path(split.source, split.split, self.spec.name, shard), spec_dict, split.shard_keys(shard))
        ]

    @cached_property
    def usable(self) -> np.ndarray:
        """Per-sample bool: committed shard and valid input. The trainer's sample filter."""
        mask = np.zeros(self.split.num_samples, dtype=bool)
        valid = self.group[VALID_ARRAY][:].astype(bool)
        for shard in self.committed_shards():
            start = shard * self.split.shard_size
            stop = min(start + self.split.shard_size, self.split.num_samples)
            mask[start:stop] = valid[start:stop]
        return mask

    def get(self, index: int) -> dict[str, Any]:
        """One sample's outputs: arrays (ragged ones cut to their length) and strings."""
        sample: dict[str, Any] = {}
        for array in self.spec.arrays:
            value = self.group[array.name][index]
            if array.ragged:
                value = value[: int(self.group[array.name + RAGGED_LENGTH_SUFFIX][index])]
            elif array.dtype == TEXT_DTYPE:
                value = str(value)
            sample[array.name] = value
        return sample

    def get_by_key(self, key: str) -> dict[str, np.ndarray]:
        return self.get(self.split.index_of(key))

    def read(self, array: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A contiguous block of one array: whole shards at a time is the efficient pattern."""
        return self.group[array][start:stop]
