"""Check that every committed shard still holds exactly what its record vouches for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache_schema.commit import CommitRecord, content_checksum
from cache_schema.layout import CacheError
from cache_schema.reader import SplitReader, list_splits


@dataclass
class ShardProblem:
    split: str
    feature: str
    shard: int
    problem: str

    def __str__(self) -> str:
        return f"{self.split} {self.feature} shard {self.shard}: {self.problem}"


def validate_cache(root: str | Path) -> tuple[int, list[ShardProblem]]:
    """(number of committed shards checked, problems). Uncommitted shards are pending, not problems."""
    checked, problems = 0, []
    for source, split in list_splits(root):
        reader = SplitReader(root, source, split)
        for feature_name in reader.feature_names:
            feature = reader.feature(feature_name)
            spec_dict = feature.spec.to_dict()
            for shard in range(reader.num_shards):
                path = reader.layout.commit_path(source, split, feature_name, shard)
                if not path.exists():
                    continue
                checked += 1
                where = f"{source}/{split}"
                try:
                    record = CommitRecord.read(path)
                    mismatch = record.mismatch(spec_dict, reader.shard_keys(shard))
                    if mismatch:
                        problems.append(ShardProblem(where, feature_name, shard, mismatch))
                        continue
                    arrays, valid = feature.shard(shard)
                except (CacheError, OSError, ValueError) as e:
                    problems.append(ShardProblem(where, feature_name, shard, f"unreadable: {e}"))
                    continue
                if content_checksum(arrays, np.asarray(valid)) != record.checksum:
                    problems.append(ShardProblem(where, feature_name, shard, "content checksum differs from commit record"))
                elif int(np.asarray(valid).sum()) != record.num_valid:
                    problems.append(ShardProblem(where, feature_name, shard, "validity mask differs from commit record"))
    return checked, problems
