"""Training examples streamed shard by shard: how the trainer reads WebDataset caches.

A map-style dataset needs random access; tar shards on an object store give one sequential read
per shard. So each epoch:

1. the usable shards (committed for every feature, with at least one valid sample) are shuffled
   with a seed that depends on the epoch;
2. they are dealt to slots, one slot per (rank, DataLoader worker), each shard to the slot with
   the fewest examples so far, so the slots end up nearly even;
3. every slot reads its shards front to back and passes the examples through a seeded shuffle
   buffer.

Epoch lengths are exact and known before a byte of tensor data is read: the commit records say
which samples are gaps and the samples table says how many examples each sample expands to. Every
rank runs exactly `batches_per_rank(epoch)` batches — the least any rank can fill — because DDP
ranks with unequal batch counts wait for each other forever at the next all-reduce (the classic
WebDataset trap). The few examples over that count wait for a later epoch's deal.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from cache_schema import SplitReader


class ShardStream(IterableDataset):
    def __init__(self, reader: SplitReader, features: dict[str, str], expand: Callable[[dict[str, Any]], list[dict[str, Any]]],
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 1000):
        """`features` maps a batch field to `feature/array` (as CacheExamples); `batch_size` is per rank."""
        self.reader, self.batch_size, self.seed = reader, batch_size, seed
        self.rank, self.world_size, self.num_workers, self.shuffle_buffer = rank, world_size, num_workers, shuffle_buffer
        self.fields = {field_name: tuple(path.split("/", 1)) for field_name, path in features.items()}
        self.feature_readers = {name: reader.feature(name) for name, _ in self.fields.values()}
        for feature_name, array_name in self.fields.values():
            self.feature_readers[feature_name].spec.array(array_name)  # a wrong name fails here, not in a worker
        usable = np.ones(reader.num_samples, dtype=bool)
        for feature in self.feature_readers.values():
            usable &= feature.usable
        self.skipped_samples = int((~usable).sum())
        self.examples: dict[int, list[tuple[int, dict[str, Any]]]] = {}  # shard -> (sample index, example)
        for index in np.flatnonzero(usable).tolist():
            for example in expand(reader.annotations[index]):
                self.examples.setdefault(index // reader.shard_size, []).append((index, example))
        self.epoch = 0

    def __len__(self) -> int:
        """Examples on all ranks (what a single process would see in one epoch)."""
        return sum(len(examples) for examples in self.examples.values())

    def deal(self, epoch: int) -> list[list[int]]:
        """Shards per slot (slot = rank * workers + worker) for `epoch`; the same on every rank."""
        shards = sorted(self.examples)
        random.Random(self.seed * 100_003 + epoch).shuffle(shards)
        slots = self.world_size * max(1, self.num_workers)
        dealt: list[list[int]] = [[] for _ in range(slots)]
        loads = [0] * slots
        for shard in shards:
            slot = loads.index(min(loads))
            dealt[slot].append(shard)
            loads[slot] += len(self.examples[shard])
        return dealt

    def batches_per_rank(self, epoch: int) -> int:
        """Full batches every rank can fill this epoch: each worker drops its own partial last batch."""
        workers = max(1, self.num_workers)
        dealt = self.deal(epoch)
        per_rank = [sum(sum(len(self.examples[s]) for s in dealt[rank * workers + w]) // self.batch_size for w in range(workers))
                    for rank in range(self.world_size)]
        return min(per_rank)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot = self.rank * max(1, self.num_workers) + (info.id if info is not None else 0)
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot}")
        buffer: list[dict[str, Any]] = []
        for shard in self.deal(self.epoch)[slot]:
            for item in self._read_shard(shard):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                position = rng.randrange(len(buffer))
                yield buffer[position]
                buffer[position] = item
        rng.shuffle(buffer)
        yield from buffer

    def _read_shard(self, shard: int) -> Iterator[dict[str, Any]]:
        stored = {name: feature.shard(shard)[0] for name, feature in self.feature_readers.items()}
        start = shard * self.reader.shard_size
        for index, example in self.examples[shard]:
            item = {"key": self.reader.keys[index], **example}
            for field_name, (feature_name, array_name) in self.fields.items():
                item[field_name] = np.asarray(stored[feature_name][array_name][index - start])
            yield item

