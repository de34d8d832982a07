"""Trainer examples/s reading the same features from a Zarr cache and from WebDataset tar shards.

Both caches are written by `CacheWriter` from the same arrays (eP-ALM-shaped [CLS] stacks,
float16 [6, 768] per image, five captions per image, as `vit-cls` writes them for COCO), so every
byte the trainer sees is the same; only the storage differs. Each side is the trainer's own data
path for that format, as `trainer.loop.fit` builds it:

- zarr: `split.torch_dataset` (`CacheDataset`: whole arrays read into memory at start, then random access) with the
        seeded `EpochSampler`, a DataLoader with `--workers` workers;
- wds:  `split.iterable_dataset` (`ShardStream`: shards dealt to DataLoader workers, read front to back through a
        shuffle buffer of 1000) with the same workers.

The collate step stacks the features and keeps the captions, as a method's collate would; no
model runs, so the figure is the data path alone. `startup` is the dataset's construction (Zarr
reads every array here; the stream only reads commit records and the samples table). The sides
run in rounds (A B B A ...), so a slow spell of a shared machine falls on both.

    python bench/cache_formats.py                       # 4096 images, 2 workers, 3 rounds
    python bench/cache_formats.py --samples 1024 --workers 0 --rounds 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cache_schema import ArraySpec, CacheWriter, FeatureSpec, SplitPlan, SplitReader
from trainer.data import EpochSampler

SPEC = FeatureSpec("vit-cls", "vit-cls", "synthetic", "none", "none", (ArraySpec("cls", "float16", (6, 768)),))
FEATURES = {"visual": "vit-cls/cls"}


def expand(annotations: dict) -> list[dict]:
    return [{"caption": caption} for caption in annotations["captions"]]


def collate(items: list[dict]) -> dict:
    return {"visual": torch.from_numpy(np.stack([item["visual"] for item in items])), "captions": [item["caption"] for item in items]}


def build(root: Path, format: str, samples: int, shard_size: int) -> None:
    rng = np.random.default_rng(0)
    keys = [f"img{i:06d}" for i in range(samples)]
    plan = SplitPlan("bench", "train", keys, [{"captions": [f"a picture number {i} ({j})" for j in range(5)]} for i in range(samples)], shard_size)
    writer = CacheWriter(root, format=format)
    writer.prepare_split(plan)
    writer.prepare_feature(plan, SPEC)
    for shard in range(plan.num_shards):
        start, stop = plan.shard_range(shard)
        cls = rng.standard_normal((stop - start, 6, 768)).astype(np.float16)
        writer.write_shard("bench", "train", SPEC, shard, start, plan.shard_keys(shard), {"cls": cls}, np.ones(stop - start, bool), {}, 0.0, "cpu")


def run_epoch(root: Path, format: str, batch_size: int, workers: int, epoch: int) -> dict:
    began = time.perf_counter()
    reader = SplitReader(root, "bench", "train")
    if format == "zarr":
        dataset = reader.torch_dataset(FEATURES, expand)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), 0, epoch), collate_fn=collate,
                            num_workers=workers, drop_last=True)
        batches = len(dataset) // batch_size
    else:
        dataset = reader.iterable_dataset(FEATURES, expand, num_workers=workers, batch_size=batch_size)
        dataset.epoch = epoch
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers, drop_last=True)
        batches = dataset.batches_per_rank(epoch)
    startup = time.perf_counter() - began
    began = time.perf_counter()
    examples = sum(len(batch["captions"]) for batch in itertools.islice(loader, batches))
    seconds = time.perf_counter() - began
    return {"format": format, "startup_s": round(startup, 3), "examples": examples, "seconds": round(seconds, 3),
            "examples_per_s": round(examples / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        roots = {format: Path(tmp) / format for format in ("zarr", "wds")}
        for format, root in roots.items():
            build(root, format, args.samples, args.shard_size)
        disk = {format: sum(p.stat().st_size for p in (root / "bench/train/vit-cls").rglob("*") if p.is_file())
                for format, root in roots.items()}
        results = []
        for round_index in range(args.rounds):
            order = ("zarr", "wds") if round_index % 2 == 0 else ("wds", "zarr")
            for format in order:
                result = run_epoch(roots[format], format, args.batch_size, args.workers, round_index)
                results.append({"round": round_index, **result})
                print(json.dumps(results[-1]))
    rate = {f: float(np.median([r["examples_per_s"] for r in results if r["format"] == f])) for f in roots}
    startup = {f: float(np.median([r["startup_s"] for r in results if r["format"] == f])) for f in roots}
    summary = {"samples": args.samples, "workers": args.workers, "batch_size": args.batch_size,
               "examples_per_s": rate, "startup_s": startup, "wds_over_zarr": round(rate["wds"] / rate["zarr"], 3),
               "disk_bytes_per_sample": {f: round(b / args.samples) for f, b in disk.items()}}
    print(json.dumps(summary, indent=1))
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "cache_formats.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
