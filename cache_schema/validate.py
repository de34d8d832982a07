"""Check that every committed shard still holds exactly what its record vouches for, and say
what is not committed yet.

A problem with one shard (a torn record, a corrupt compressed chunk, a tar that no longer reads)
is reported and the check goes on with the others: an integrity tool that stops at the first bad
byte leaves the rest of the cache unchecked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache_schema.commit import CommitRecord, content_checksum
from cache_schema.layout import CacheError
from cache_schema.reader import FeatureReader, SplitReader, list_splits
from cache_schema.writer import VALID_ARRAY


@dataclass
class ShardProblem:
    split: str
    feature: str
    shard: int | None  # None: the problem is the feature's (or the split's), not one shard's
    problem: str

    def __str__(self) -> str:
        where = " ".join(part for part in (self.split, self.feature) if part)
        return f"{where} shard {self.shard}: {self.problem}" if self.shard is not None else f"{where}: {self.problem}"


@dataclass
class PendingShards:
    """Shards of one feature that have no commit record: not run yet, or failed (`failed` of them)."""

    split: str
    feature: str | None  # None: the split has a shard plan and no feature yet
    pending: list[int]
    total: int
    failed: int = 0

    def __str__(self) -> str:
        if self.feature is None:
            return f"{self.split}: a shard plan of {self.total} shards and no feature computed yet"
        failed = f", {self.failed} of them failed (see _failures/{self.feature}/)" if self.failed else ""
        return f"{self.split} {self.feature}: {len(self.pending)} of {self.total} shards pending (no commit record){failed}"


def read_shard(feature: FeatureReader, shard: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A shard's stored arrays and validity mask; an error names the array (Zarr) or tar that fails."""
    if feature.format != "zarr":
        return feature.shard(shard)
    split = feature.split
    start, stop = shard * split.shard_size, min((shard + 1) * split.shard_size, split.num_samples)
    arrays: dict[str, Any] = {}
    for name in [stored for stored, _, _ in feature.spec.stored_arrays()] + [VALID_ARRAY]:
        try:
            arrays[name] = feature.group[name][start:stop]
        except Exception as e:  # a corrupt chunk surfaces as whatever the codec raises
            raise CacheError(f"array {name!r} unreadable: {type(e).__name__}: {e}") from e
    valid = arrays.pop(VALID_ARRAY)
    return arrays, valid


def check_shard(reader: SplitReader, feature: FeatureReader, spec_dict: dict[str, Any], shard: int, path: Path) -> str | None:
    """What is wrong with one committed shard, or None."""
    try:
        record = CommitRecord.read(path)
    except (CacheError, OSError) as e:
        return f"commit record unreadable: {e}"
    keys = reader.shard_keys(shard)
    mismatch = record.mismatch(spec_dict, keys)  # spec, keys, and a reason for every gap
    if mismatch:
        return mismatch
    try:
        arrays, valid = read_shard(feature, shard)
    except Exception as e:
        return str(e) if isinstance(e, CacheError) else f"unreadable: {type(e).__name__}: {e}"
    valid = np.asarray(valid)
    if content_checksum(arrays, valid) != record.checksum:
        return "content checksum differs from commit record"
    if int(valid.sum()) != record.num_valid:
        return "validity mask differs from commit record"
    unexplained = [key for key, ok in zip(keys, valid) if not ok and key not in record.invalid]
    if unexplained:
        return f"{len(unexplained)} invalid sample(s) without a reason (first: {unexplained[0]!r})"
    return None


def validate_cache(root: str | Path) -> tuple[int, list[ShardProblem]]:
    """(number of committed shards checked, problems). Uncommitted shards are pending, not problems
    (see `pending_shards`). A split or feature that cannot be opened is one problem; the check goes
    on with the rest."""
    checked, problems = 0, []
    for source, split in list_splits(root):
        where = f"{source}/{split}"
        try:
            reader = SplitReader(root, source, split)
            names = reader.feature_names
        except Exception as e:
            problems.append(ShardProblem(where, "", None, f"unreadable split: {e}"))
            continue
        for feature_name in names:
            try:
                feature = reader.feature(feature_name)
                spec_dict = feature.spec.to_dict()
            except Exception as e:
                problems.append(ShardProblem(where, feature_name, None, f"unreadable feature: {type(e).__name__}: {e}"))
                continue
            for shard in range(reader.num_shards):
                path = reader.layout.commit_path(source, split, feature_name, shard)
                if not path.exists():
                    continue
                checked += 1
                try:
                    problem = check_shard(reader, feature, spec_dict, shard, path)
                except Exception as e:  # a record of the right shape holding values of the wrong types
                    problem = f"unreadable: {type(e).__name__}: {e}"
                if problem:
                    problems.append(ShardProblem(where, feature_name, shard, problem))
    return checked, problems


def pending_shards(root: str | Path) -> list[PendingShards]:
    """Per split and feature, the planned shards without a commit record (empty: nothing pending).

    A split planned with no feature yet is pending too: the run that planned it did not finish.
    """
    pending = []
    for source, split in list_splits(root):
        where = f"{source}/{split}"
        try:
            reader = SplitReader(root, source, split)
            names = reader.feature_names
        except CacheError:
            continue  # validate_cache reports it
        if not names:
            pending.append(PendingShards(where, None, list(range(reader.num_shards)), reader.num_shards))
        for feature in names:
            missing = [shard for shard in range(reader.num_shards)
                       if not reader.layout.commit_path(source, split, feature, shard).exists()]
            if missing:
                failed = sum(reader.layout.failure_path(source, split, feature, shard).exists() for shard in missing)
                pending.append(PendingShards(where, feature, missing, reader.num_shards, failed))
    return pending
