"""From the cache to a rank's training batches.

The examples themselves come from the cache's own PyTorch API (`SplitReader.torch_dataset` /
`iterable_dataset`, cache_schema/torch_data.py): features joined with annotations by sample key,
as a method's `expand` says, gaps and uncommitted shards left out and counted.

`train_batches` decides which examples each rank trains on at each step, for one process and for
every rank of `trainer fit --workers N` alike: from a Zarr cache a seeded order per epoch, each
global batch sliced across the ranks; from a WebDataset cache the shards stream, dealt out per
epoch, the same number of batches on every rank.

Cached augmented views (a method's `view_fields`, from `model.views`): a training sample holds its
clean array and V views, and each epoch trains on one of the V + 1, drawn by `pick_view` from
(seed, sample key, epoch) in the collate step, so an epoch has as many examples as without views,
a resumed run draws what an uninterrupted one would, and every rank agrees. Evaluation never reads them.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from cache_schema import VIEWS_ARRAY, SplitReader
from cache_schema.torch_data import CacheDataset, ShardStream
from trainer.config import TrainConfig
from trainer.methods.base import Method, MethodError


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, cut into global batches of `batch_size`, that can start at
    any batch, so a resumed run sees the examples an uninterrupted one would have seen, in the same
    order. With `world_size` ranks, rank r takes the r-th of `world_size` equal slices of every
    global batch: the ranks' batches at step s together are exactly the one batch a single process
    would train on at step s, and every rank gets the same number of batches (unequal counts hang
    DDP). Only whole global batches are yielded; the remainder of the permutation waits for the
    next epoch's draw."""

    def __init__(self, size: int, seed: int, epoch: int = 0, start_batch: int = 0, batch_size: int = 1,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} ranks")
        self.size, self.seed, self.epoch, self.start_batch = size, seed, epoch, start_batch
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        share = self.batch_size // self.world_size
        for first in range(self.start_batch * self.batch_size, self.size - self.batch_size + 1, self.batch_size):
            yield from order[first + self.rank * share : first + (self.rank + 1) * share]

    def __len__(self) -> int:
        return max(0, self.size // self.batch_size - self.start_batch) * (self.batch_size // self.world_size)


def views_field(field: str) -> str:
    """The batch field that carries `field`'s cached views until `collate_views` picks one."""
    return f"{field}.{VIEWS_ARRAY}"


def check_views(reader: SplitReader, method: Method) -> None:
    """The training split must hold the views `model.views` asks for: one MethodError line if not."""
    for feature in method.view_fields().values():
        if VIEWS_ARRAY not in {array.name for array in reader.spec(feature).arrays}:
            raise MethodError(f"{method.name}: model.views=true, but {reader.source}/{reader.split} caches no augmented "
                              f"views of {feature!r} (precompute it with --expert-opt views=N)")


def pick_view(seed: int, key: str, epoch: int, choices: int) -> int:
    """Which of a sample's `choices` inputs epoch `epoch` trains on: 0 the clean one, v > 0 its v-th
    cached view. Uniform, and a function of (seed, sample key, epoch) alone: not of the example's
    position, the rank, the DataLoader worker or a generator's state."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % choices


Collate = Callable[[list[dict[str, Any]]], dict[str, Any]]


def collate_views(collate: Collate, fields: list[str], seed: int, epoch: int, items: list[dict[str, Any]]) -> dict[str, Any]:
    """`collate` after each item's `fields` were replaced by the view `pick_view` draws for its sample
    (recorded as the item's `view`) and the views themselves dropped."""
    for item in items:
        views = {field: item.pop(views_field(field)) for field in fields}
        item["view"] = pick_view(seed, item["key"], epoch, 1 + min(len(v) for v in views.values()))
        if item["view"]:
            item.update({field: view[item["view"] - 1] for field, view in views.items()})
    return collate(items)


def training_collate(method: Method, config: TrainConfig, epoch: int) -> Collate:
    """The collate function of epoch `epoch`'s training batches (picklable, for DataLoader workers)."""
    fields = list(method.view_fields())
    return functools.partial(collate_views, method.collate, fields, config.seed, epoch) if fields else method.collate


def training_examples(reader: SplitReader, method: Method, config: TrainConfig) -> CacheDataset | ShardStream:
    """The training set: streamed shard by shard when any feature it reads is stored as tar shards.
    Its items carry the cached views `model.views` asks for beside the clean arrays."""
    views = {views_field(field): f"{feature}/{VIEWS_ARRAY}" for field, feature in method.view_fields().items()}
    fields, expand = {**method.feature_fields(), **views}, functools.partial(method.expand, train=True)
    if any(feature.format == "wds" for feature, _ in reader.feature_arrays(fields).values()):
        return reader.iterable_dataset(fields, expand, seed=config.seed, shuffle_buffer=config.shuffle_buffer,
                                       num_workers=config.num_workers, batch_size=config.batch_size)
    return reader.torch_dataset(fields, expand, sources=method.feature_sources)


def eval_examples(reader: SplitReader, method: Method, config: TrainConfig) -> CacheDataset:
    """An evaluation split's examples, in the split's order (a WebDataset split is read whole)."""
    return reader.torch_dataset(method.feature_fields(), functools.partial(method.expand, train=False),
                                max_examples=config.max_eval_examples, sources=method.feature_sources)


def train_batches(train_set: CacheDataset | ShardStream, method: Method, config: TrainConfig, state: dict[str, int], rank: int = 0,
                  world_size: int = 1) -> Iterator[dict[str, Any]]:
    """This rank's training batches, endlessly, epoch after epoch, from the data position in
    `state` (`epoch`, `batch_in_epoch` in global batches), which it advances as batches are taken.

    The one place that decides how a rank gets its batches: `config.batch_size` is the global
    batch and each of the `world_size` ranks gets `batch_size // world_size` examples of it. A
    single process is rank 0 of 1.
    """
    if isinstance(train_set, ShardStream):
        yield from stream_batches(train_set, method, config, state, rank, world_size)
        return
    while True:
        sampler = EpochSampler(len(train_set), config.seed, state["epoch"], state["batch_in_epoch"], config.batch_size,
                               rank, world_size)
        loader = DataLoader(train_set, batch_size=config.batch_size // world_size, sampler=sampler,
                            collate_fn=training_collate(method, config, state["epoch"]), num_workers=config.num_workers,
                            drop_last=True)
        for batch in loader:
            state["batch_in_epoch"] += 1
            yield batch
        state["epoch"] += 1
        state["batch_in_epoch"] = 0


def stream_batches(stream: ShardStream, method: Method, config: TrainConfig, state: dict[str, int], rank: int,
                   world_size: int) -> Iterator[dict[str, Any]]:
    """`train_batches` for a WebDataset cache: exactly `batches_per_rank(epoch)` batches per epoch on
    every rank. Resuming mid-epoch reads past the batches already trained on (same order: it is a
    function of seed, epoch, rank and worker)."""
    stream.rank, stream.world_size, stream.batch_size = rank, world_size, config.batch_size // world_size
    while True:
        stream.epoch = state["epoch"]
        loader = DataLoader(stream, batch_size=stream.batch_size, collate_fn=training_collate(method, config, state["epoch"]),
                            num_workers=config.num_workers, drop_last=True)
        for batch in itertools.islice(loader, state["batch_in_epoch"], stream.batches_per_rank(state["epoch"])):
            state["batch_in_epoch"] += 1
            yield batch
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
