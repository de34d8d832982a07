"""Writing a cache: the shard plan, feature arrays, and one committed shard at a time.

The driver calls `prepare_split` and `prepare_feature` once per run (cheap metadata); workers call
`write_shard`, each for shards it alone owns. Because a precompute shard is exactly one Zarr
storage shard of every array (or one tar, in the WebDataset form), two workers can never touch
the same file.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from zarr.codecs import ZstdCodec

from cache_schema.commit import CommitRecord, content_checksum, keys_digest, vouching_record
from cache_schema.layout import CacheError, CacheLayout, is_local, open_group, publish, read_json, remove_tree, write_json_atomic, writing
from cache_schema.spec import RAGGED_LENGTH_SUFFIX, TEXT_DTYPE, FeatureSpec
from cache_schema.wds import FORMATS, shard_tar_path, write_tar_shard

VALID_ARRAY = "valid"


def code_version() -> str:
    try:
        return metadata.version("expertcache")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class SplitPlan:
    """Which keys go in which shard: shard i holds keys[i*shard_size:(i+1)*shard_size], always."""

    source: str
    split: str
    keys: list[str]
    annotations: list[dict[str, Any]]
    shard_size: int
    source_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {self.shard_size}")
        if len(set(self.keys)) != len(self.keys):
            raise CacheError(f"{self.source}/{self.split}: sample keys are not unique")

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def shard_keys(self, shard: int) -> list[str]:
        start, stop = self.shard_range(shard)
        return self.keys[start:stop]

    def header(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "split": self.split,
            "num_samples": self.num_samples,
            "shard_size": self.shard_size,
            "num_shards": self.num_shards,
            "keys_digest": keys_digest(self.keys),
            "source_info": self.source_info,
        }


class CacheWriter:
    """Writes features in one storage `format`: `zarr` (random access) or `wds` (tar shards to stream)."""

    def __init__(self, root: str | Path, format: str = "zarr"):
        if format not in FORMATS:
            raise CacheError(f"unknown cache format {format!r}; formats: {', '.join(FORMATS)}")
        self.layout = CacheLayout(root)
        self.format = format

    def prepare_split(self, plan: SplitPlan, overwrite: bool = False) -> None:
        """Write the samples table, or check that the existing one is the same plan."""
        split_dir = self.layout.split_dir(plan.source, plan.split)
        header_path = split_dir / "split.json"
        header = plan.header()
        if header_path.exists():
            existing = read_json(header_path)
            same = all(existing.get(k) == header[k] for k in ("num_samples", "shard_size", "keys_digest"))
            if same:
                if f"{plan.source}/{plan.split}" not in self.layout.read_manifest()["splits"]:
                    self._register_split(plan)  # an earlier run stopped between split.json and cache.json
                return
            if not overwrite:
                raise CacheError(
                    f"{split_dir} holds a different shard plan ({existing.get('num_samples')} samples, "
                    f"shard size {existing.get('shard_size')}) than this run ({plan.num_samples} samples, "
                    f"shard size {plan.shard_size}); use the same --limit/--shard-size, another --cache, "
                    f"or --overwrite to discard it"
                )
            remove_tree(split_dir)
            manifest = self.layout.read_manifest()
            prefix = f"{plan.source}/{plan.split}/"
            manifest["features"] = {k: v for k, v in manifest["features"].items() if not k.startswith(prefix)}
            self.layout.write_manifest(manifest)
        samples_path = split_dir / "samples.jsonl"
        tmp = samples_path.with_suffix(".jsonl.tmp")
        # The plan counts only once split.json and then cache.json name it. A write that fails
        # (full disk, file size limit) leaves neither behind, so nothing half-written looks planned.
        written = None
        try:
            with writing(split_dir):
                split_dir.mkdir(parents=True, exist_ok=True)
            with writing(samples_path):
                with tmp.open("w") as f:
                    for key, annotations in zip(plan.keys, plan.annotations):
                        f.write(json.dumps({"key": key, "annotations": annotations}, sort_keys=True) + "\n")
                publish(tmp, samples_path)
            with writing(header_path):
                write_json_atomic(header_path, header)
            written = header_path
            self._register_split(plan)
        except BaseException:
            if is_local(tmp):
                tmp.unlink(missing_ok=True)
            if written is not None:
                written.unlink(missing_ok=True)
            raise

    def _register_split(self, plan: SplitPlan) -> None:
        with writing(self.layout.manifest_path):
            manifest = self.layout.read_manifest()
            manifest["splits"][f"{plan.source}/{plan.split}"] = {
                "num_samples": plan.num_samples,
                "shard_size": plan.shard_size,
            }
            self.layout.write_manifest(manifest)

    def prepare_feature(self, plan: SplitPlan, spec: FeatureSpec, overwrite: bool = False,
                        options: dict[str, Any] | None = None) -> None:
        """Register the feature's spec and create its arrays; refuse a different spec.

        `options`, the expert options the run was given, are recorded beside the spec (not part of
        its identity) so `precompute verify` can rebuild the expert as it was. The manifest entry
        is written last: arrays half-created on a full disk are not a feature yet, and the next
        run creates them afresh.
        """
        with writing(self.layout.feature_dir(plan.source, plan.split, spec.name)):
            self._prepare_feature(plan, spec, overwrite, options or {})

    def _prepare_feature(self, plan: SplitPlan, spec: FeatureSpec, overwrite: bool, options: dict[str, Any]) -> None:
        manifest = self.layout.read_manifest()
        entry = f"{plan.source}/{plan.split}/{spec.name}"
        existing = manifest["features"].get(entry)
        feature_dir = self.layout.feature_dir(plan.source, plan.split, spec.name)
        if existing is not None:
            stored_as = existing.get("format", "zarr")
            if not FeatureSpec.from_dict(existing).differences(spec) and stored_as == self.format:
                return
            if not overwrite:
                FeatureSpec.from_dict(existing).require_same(spec)
                raise CacheError(f"{entry} is stored as {stored_as}, this run writes {self.format}; "
                                 f"use --format {stored_as}, another --cache, or --overwrite to rewrite it")
            split_dir = self.layout.split_dir(plan.source, plan.split)
            for path in (feature_dir, split_dir / "_commits" / spec.name, split_dir / "_failures" / spec.name):
                remove_tree(path)
        manifest = self.layout.read_manifest()
        manifest["features"][entry] = {**spec.to_dict(), "format": self.format, "options": options}
        if self.format == "wds":
            feature_dir.mkdir(parents=True, exist_ok=True)
            self.layout.write_manifest(manifest)
            return
        group = open_group(feature_dir, mode="w")
        n, s = plan.num_samples, plan.shard_size
        for name, dtype, shape in spec.stored_arrays():
            group.create_array(
                name,
                shape=(n, *shape),
                dtype=str if dtype == TEXT_DTYPE else dtype,
                chunks=(1, *shape) if shape else (s,),  # per-sample scalars and strings: one chunk per shard
                shards=(s, *shape) if shape else None,
                compressors=ZstdCodec(level=3),
                fill_value="" if dtype == TEXT_DTYPE else 0,
            )
        group.create_array(VALID_ARRAY, shape=(n,), dtype="uint8", chunks=(s,), fill_value=0)
        self.layout.write_manifest(manifest)

    def committed_shards(self, plan: SplitPlan, spec: FeatureSpec) -> set[int]:
        """Shards whose commit record matches the spec and the plan's keys (cheap: no data read)."""
        spec_dict = spec.to_dict()
        return {
            shard
            for shard in range(plan.num_shards)
            if vouching_record(self.layout.commit_path(plan.source, plan.split, spec.name, shard), spec_dict, plan.shard_keys(shard))
        }

    def write_shard(
        self,
        source: str,
        split: str,
        spec: FeatureSpec,
        shard: int,
        start: int,
        keys: list[str],
        arrays: dict[str, Any],
        valid: np.ndarray,
        invalid: dict[str, str],
        seconds: float,
        device: str,
        node: str = "",
        profile: dict[str, float] | None = None,
    ) -> CommitRecord:
        """Write one shard's arrays, then its commit record (`node`: the Ray node id, if any;
        `profile`: seconds per stage before the write, which this adds as `write`). `seconds` is the
        shard's work before this call; the record's `seconds` adds the write's own time to it.

        `arrays` holds each output by its spec name: an ndarray for dense outputs (invalid samples
        zero-filled), a list with one array (ragged) or string (text) per sample otherwise. Takes
        the shard's own keys rather than the plan so a worker is sent only its shard.
        """
        began = time.perf_counter()
        stop = start + len(keys)
        check_gap_reasons(spec.name, shard, keys, valid, invalid)
        if set(arrays) != {a.name for a in spec.arrays}:
            raise CacheError(f"{spec.name}: expert produced arrays {sorted(arrays)}, spec says {[a.name for a in spec.arrays]}")
        stored = pack_arrays(spec, arrays, stop - start, shard)
        feature_dir = self.layout.feature_dir(source, split, spec.name)
        if self.format == "wds":
            write_tar_shard(shard_tar_path(feature_dir, shard), spec, keys, stored, valid)
        else:
            group = open_group(feature_dir, mode="r+")
            for name, data in stored.items():
                group[name][start:stop] = data
            group[VALID_ARRAY][start:stop] = valid.astype(np.uint8)
        checksum = content_checksum(stored, valid)
        written = time.perf_counter() - began
        profile = {**(profile or {}), "write": written}
        seconds += written
        record = CommitRecord(
            feature=spec.name,
            shard=shard,
            start=start,
            stop=stop,
            num_samples=stop - start,
            num_valid=int(valid.sum()),
            keys_digest=keys_digest(keys),
            checksum=checksum,
            expert=spec.expert,
            model_id=spec.model_id,
            revision=spec.revision,
            preprocess_hash=spec.preprocess_hash,
            dtypes={a.name: a.dtype for a in spec.arrays},
            shapes={a.name: list(a.shape) for a in spec.arrays},
            code_version=code_version(),
            seconds=round(seconds, 4),
            samples_per_s=round((stop - start) / max(seconds, 1e-9), 3),
            host=socket.gethostname(),
            device=device,
            invalid=invalid,
            node=node,
            profile={stage: round(value, 4) for stage, value in profile.items()},
        )
        self.layout.failure_path(source, split, spec.name, shard).unlink(missing_ok=True)
        record.write(self.layout.commit_path(source, split, spec.name, shard))
        return record

    def record_failure(self, plan: SplitPlan, feature: str, shard: int, error: str, attempts: int) -> None:
        write_json_atomic(
            self.layout.failure_path(plan.source, plan.split, feature, shard),
            {"shard": shard, "error": error, "attempts": attempts, "host": socket.gethostname()},
        )


def check_gap_reasons(feature: str, shard: int, keys: list[str], valid: np.ndarray, invalid: dict[str, str]) -> None:
    """Refuse to commit a shard whose invalid samples do not each carry a reason.

    A gap without a reason is a sample lost silently: a committed shard is never run again, so
    a worker that produced nothing (a batch loop that never ran) must fail, not commit.
    """
    valid = np.asarray(valid, dtype=bool)
    if len(valid) != len(keys):
        raise CacheError(f"{feature} shard {shard}: {len(valid)} validity flags for {len(keys)} samples")
    gaps = [key for key, ok in zip(keys, valid) if not ok]
    unexplained = [key for key in gaps if not str(invalid.get(key, "")).strip()]
    if unexplained:
        raise CacheError(f"{feature} shard {shard}: {len(unexplained)} of {len(keys)} samples are invalid without a "
                         f"reason (first: {unexplained[0]!r}); refusing to commit them as gaps")
    stray = sorted(set(invalid) - set(gaps))
    if stray:
        raise CacheError(f"{feature} shard {shard}: a reason is given for {len(stray)} sample(s) that are valid or not "
                         f"in the shard (first: {stray[0]!r})")


def pack_arrays(spec: FeatureSpec, arrays: dict[str, Any], count: int, shard: int) -> dict[str, np.ndarray]:
    """Check one shard's outputs against the spec and turn them into the stored Zarr arrays."""
    stored: dict[str, np.ndarray] = {}
    for array_spec in spec.arrays:
        where = f"{spec.name}.{array_spec.name} shard {shard}"
        data = arrays[array_spec.name]
        if array_spec.dtype == TEXT_DTYPE:
            if len(data) != count or not all(isinstance(text, str) for text in data):
                raise CacheError(f"{where}: expected {count} strings")
            stored[array_spec.name] = np.array(data, dtype=object)
        elif array_spec.ragged:
            if len(data) != count:
                raise CacheError(f"{where}: expected {count} ragged items, got {len(data)}")
            capacity, item_shape = array_spec.shape[0], array_spec.shape[1:]
            padded = np.zeros((count, *array_spec.shape), dtype=array_spec.dtype)
            lengths = np.zeros(count, dtype=array_spec.length_dtype)
            for i, items in enumerate(data):
                items = np.asarray(items)
                if items.size == 0:
                    continue
                if items.shape[1:] != item_shape or str(items.dtype) != array_spec.dtype or len(items) > capacity:
                    raise CacheError(
                        f"{where}: sample {i} has {items.dtype}{list(items.shape)}, spec says "
                        f"{array_spec.dtype}[<= {capacity}, {', '.join(map(str, item_shape))}]"
                    )
                padded[i, : len(items)] = items
                lengths[i] = len(items)
            stored[array_spec.name] = padded
            stored[array_spec.name + RAGGED_LENGTH_SUFFIX] = lengths
        else:
            expected = (count, *array_spec.shape)
            if data.shape != expected or str(data.dtype) != array_spec.dtype:
                raise CacheError(f"{where}: got {data.dtype}{list(data.shape)}, spec says {array_spec.dtype}{list(expected)}")
            stored[array_spec.name] = data
    return stored
