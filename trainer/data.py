"""From the cache to batches: features joined with annotations by sample key.

One cached sample often yields several training examples (five captions, many questions per
image); the method says how (`Method.expand`). Features are read whole-shard into memory when they
fit, so a DataLoader worker does array indexing, not storage I/O, per example. Samples that are a
recorded gap (invalid input) or sit in an uncommitted shard are left out, and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cache_schema import SplitReader

IN_MEMORY_LIMIT_BYTES = 2 << 30


class CacheExamples(Dataset):
    def __init__(self, reader: SplitReader, features: dict[str, str], expand: Callable[[dict[str, Any]], list[dict[str, Any]]],
                 max_examples: int | None = None):
        """`features` maps a batch field name to `feature/array` in the cache (e.g. visual -> vit-cls/cls)."""
        self.reader = reader
        usable = np.ones(reader.num_samples, dtype=bool)
        self.arrays: dict[str, Any] = {}
        for field_name, path in features.items():
            feature_name, _, array_name = path.partition("/")
            feature = reader.feature(feature_name)
            usable &= feature.usable
            spec = feature.spec.array(array_name)
            nbytes = reader.num_samples * int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
            self.arrays[field_name] = feature.read(array_name) if nbytes <= IN_MEMORY_LIMIT_BYTES else feature.group[array_name]
        self.skipped_samples = int((~usable).sum())
        self.examples: list[tuple[int, dict[str, Any]]] = []
        for index, annotations in enumerate(reader.annotations):
            if usable[index]:
                self.examples.extend((index, example) for example in expand(annotations))
        if max_examples is not None:
            self.examples = self.examples[:max_examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, example = self.examples[i]
        item = {"key": self.reader.keys[index], **example}
        for field_name, array in self.arrays.items():
            item[field_name] = np.asarray(array[index])
        return item


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch that can start mid-epoch, so a resumed run sees the
    examples an uninterrupted one would have seen, in the same order."""

    def __init__(self, size: int, seed: int, epoch: int = 0, start: int = 0):
        self.size, self.seed, self.epoch, self.start = size, seed, epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return iter(order[self.start :])

    def __len__(self) -> int:
        return self.size - self.start
