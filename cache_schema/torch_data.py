"""PyTorch datasets over one split of a cache: features joined with annotations by sample key.

Built through `SplitReader.torch_dataset` (random access, `CacheDataset`) and
`SplitReader.iterable_dataset` (streaming shard by shard, `ShardStream`); this module is the only
part of `cache_schema` that imports torch, and only when one of them is built, so reading a
cache (`precompute status`, `open_cache`) never pays for it. The trainer reads through the same
two classes.

Both take `features`, a batch field -> `feature/array` mapping (`{"visual": "vit-cls/cls"}`), and
`expand(annotations) -> [example, ...]`: one cached sample often yields several training examples
(five captions, many questions per image). Each item is `{"key", **example, field: np.ndarray}`.
Samples that are a recorded gap (invalid input) or sit in an uncommitted shard are left out, and
counted in `skipped_samples`.

`ShardStream` is how tar shards are read (one sequential read per shard, no random access). Each
epoch:

1. the usable shards (committed for every feature, with at least one valid sample) are shuffled
   with a seed that depends on the epoch;
2. they are dealt to slots, one slot per (rank, DataLoader worker), each shard to the slot with
   the fewest examples so far, so the slots end up nearly even;
3. every slot reads its shards front to back and passes the examples through a seeded shuffle
   buffer.

Epoch lengths are exact and known before a byte of tensor data is read: the commit records say
which samples are gaps and the samples table says how many examples each sample expands to. A
data-parallel trainer runs exactly `batches_per_rank(epoch)` batches on every rank — the least any
rank can fill — because DDP ranks with unequal batch counts wait for each other forever at the
next all-reduce (the classic WebDataset trap).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from cache_schema.reader import SplitReader

IN_MEMORY_LIMIT_BYTES = 2 << 30

Expand = Callable[[dict[str, Any]], list[dict[str, Any]]]


def one_example(annotations: dict[str, Any]) -> list[dict[str, Any]]:
    """The default `expand`: one example per sample, with no annotation fields (add them with your own)."""
    return [{}]


class CacheDataset(Dataset):
    """Random access to a split's examples (map-style): Zarr features, read whole into memory
    when they fit, so a DataLoader worker does array indexing, not storage I/O, per example."""

    def __init__(self, reader: SplitReader, features: dict[str, str], expand: Expand | None = None,
                 max_examples: int | None = None,
                 sources: Callable[[SplitReader, np.ndarray], dict[str, np.ndarray]] | None = None):
        """`sources(reader, usable)` (a trainer method's `feature_sources`) may say that a field of
        sample i is read from another sample (a shuffled-input control)."""
        self.reader = reader
        usable = np.ones(reader.num_samples, dtype=bool)
        self.arrays: dict[str, Any] = {}
        for field_name, (feature, array) in reader.feature_arrays(features).items():
            usable &= feature.usable
            nbytes = reader.num_samples * int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
            # tar shards have no random access: a WebDataset split read this way is read whole
            in_memory = nbytes <= IN_MEMORY_LIMIT_BYTES or feature.format == "wds"
            self.arrays[field_name] = feature.read(array.name) if in_memory else feature.group[array.name]
        self.skipped_samples = int((~usable).sum())
        self.sources = sources(reader, usable) if sources is not None else {}
        expand = expand or one_example
        self.examples: list[tuple[int, dict[str, Any]]] = []
        for index, sample_annotations in enumerate(reader.annotations):
            if usable[index]:
                self.examples.extend((index, example) for example in expand(sample_annotations))
        if max_examples is not None:
            self.examples = self.examples[:max_examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, example = self.examples[i]
        item = {"key": self.reader.keys[index], **example}
        for field_name, array in self.arrays.items():
            source = self.sources.get(field_name)
            item[field_name] = np.asarray(array[index if source is None else int(source[index])])
        return item


class ShardStream(IterableDataset):
    """A split's examples streamed shard by shard (see the module docstring), in a seeded order
    that is a function of (seed, epoch, rank, DataLoader worker): set `epoch` before each pass."""

    def __init__(self, reader: SplitReader, features: dict[str, str], expand: Expand | None = None,
                 batch_size: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 1000):
        """`batch_size` (per rank) only sizes `batches_per_rank`; `num_workers` must be the
        DataLoader's, since shards are dealt to (rank, worker) slots."""
        self.reader, self.batch_size, self.seed = reader, batch_size, seed
        self.rank, self.world_size, self.num_workers, self.shuffle_buffer = rank, world_size, num_workers, shuffle_buffer
        arrays = reader.feature_arrays(features)  # a wrong name fails here, not in a worker
        self.fields = {field_name: (feature.spec.name, array.name) for field_name, (feature, array) in arrays.items()}
        self.feature_readers = {feature.spec.name: feature for feature, _ in arrays.values()}
        usable = np.ones(reader.num_samples, dtype=bool)
        for feature in self.feature_readers.values():
            usable &= feature.usable
        self.skipped_samples = int((~usable).sum())
        expand = expand or one_example
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
        workers = info.num_workers if info is not None else 0
        if max(1, workers) != max(1, self.num_workers):
            raise ValueError(f"this stream was made for {self.num_workers} DataLoader workers but runs in {workers}: "
                             f"pass num_workers={workers} when making it")
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
