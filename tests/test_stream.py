"""Streaming training examples from tar shards: exact, equal epoch lengths per rank, deterministic order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from torch.utils.data import DataLoader

from cache_schema import ArraySpec, CacheError, CacheWriter, FeatureSpec, SplitPlan, SplitReader

SPEC = FeatureSpec("emb", "toy", "m", "r", "p", (ArraySpec("cls", "float32", (3,)),))


def build_cache(root, format: str, n: int = 53, shard_size: int = 5) -> SplitReader:
    """n samples, sample i has i % 3 captions (so 0, 1 or 2 examples), every 7th sample a gap."""
    keys = [f"s{i:03d}" for i in range(n)]
    plan = SplitPlan("toy", "train", keys, [{"captions": [f"c{i}.{j}" for j in range(i % 3)]} for i in range(n)], shard_size)
    writer = CacheWriter(root, format=format)
    writer.prepare_split(plan)
    writer.prepare_feature(plan, SPEC)
    for shard in range(plan.num_shards):
        start, stop = plan.shard_range(shard)
        cls = np.repeat(np.arange(start, stop, dtype=np.float32)[:, None], 3, axis=1)
        valid = np.array([i % 7 != 0 for i in range(start, stop)])
        cls[~valid] = 0
        invalid = {keys[i]: "bad" for i in range(start, stop) if i % 7 == 0}
        writer.write_shard("toy", "train", SPEC, shard, start, plan.shard_keys(shard), {"cls": cls}, valid, invalid, 0.1, "cpu")
    return SplitReader(root, "toy", "train")


def expand(annotations):
    return [{"caption": caption} for caption in annotations["captions"]]


def collate(items):
    return [(item["key"], item["caption"], float(item["visual"][0])) for item in items]


def rank_batches(reader, rank, world_size, epoch, num_workers=0, batch_size=4, buffer=8):
    stream = reader.iterable_dataset({"visual": "emb/cls"}, expand, seed=3, rank=rank, world_size=world_size,
                                     num_workers=num_workers, shuffle_buffer=buffer, batch_size=batch_size)
    stream.epoch = epoch
    loader = DataLoader(stream, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, drop_last=True)
    return stream, list(itertools.islice(loader, stream.batches_per_rank(epoch)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_gets_the_same_number_of_full_batches_and_no_example_twice(tmp_path, num_workers):
    reader = build_cache(tmp_path, "wds")
    per_rank = [rank_batches(reader, rank, 3, epoch=0, num_workers=num_workers)[1] for rank in range(3)]
    stream = reader.iterable_dataset({"visual": "emb/cls"}, expand, seed=3, world_size=3, num_workers=num_workers, batch_size=4)
    expected = stream.batches_per_rank(0)
    assert expected > 0 and [len(batches) for batches in per_rank] == [expected] * 3
    assert all(len(batch) == 4 for batches in per_rank for batch in batches)
    seen = [example for batches in per_rank for batch in batches for example in batch]
    assert len(seen) == len(set(seen))
    # everything it yields is real: a valid sample's own feature with one of its own captions
    for key, caption, value in seen:
        index = int(key[1:])
        assert index % 7 != 0 and value == index and caption.startswith(f"c{index}.")
    total = len(stream)
    assert total == sum(i % 3 for i in range(53) if i % 7 != 0)
    assert len(seen) > total - 3 * max(1, num_workers) * 4 - 3 * 5 * 2  # at most a partial batch per slot + one shard's imbalance per rank


def test_order_is_a_function_of_seed_and_epoch(tmp_path):
    reader = build_cache(tmp_path, "wds")
    _, first = rank_batches(reader, 0, 1, epoch=0)
    _, again = rank_batches(reader, 0, 1, epoch=0)
    _, next_epoch = rank_batches(reader, 0, 1, epoch=1)
    assert first == again and first != next_epoch
    assert sorted(map(tuple, first)) != first  # shuffled, not in key order


def test_zarr_and_wds_caches_stream_the_same_examples(tmp_path):
    from_wds = rank_batches(build_cache(tmp_path / "w", "wds"), 0, 1, epoch=2)[1]
    from_zarr = rank_batches(build_cache(tmp_path / "z", "zarr"), 0, 1, epoch=2)[1]
    assert from_wds == from_zarr


def test_a_wrong_feature_path_fails_at_construction(tmp_path):
    reader = build_cache(tmp_path, "wds")
    with pytest.raises(CacheError, match="'visual': feature 'emb' of toy/train has no array 'pooled' \\(it has: cls\\)"):
        reader.iterable_dataset({"visual": "emb/pooled"}, expand)
