"""Precompute throughput: the full pipeline against a bare forward loop, and bytes on disk.

Measured side by side in one run, on one model and one machine:

- bare loop: the `vit-cls` expert's `predict` over tensors decoded and preprocessed beforehand,
  with the batch size, shard grouping and torch thread count that the engine's one actor gets.
  It is the most the pipeline could reach.
- pipeline: `precompute.engine.run` over the `shapes` source, with its real work (Ray, decode
  threads, preprocess, forward, Zarr write, commit record). Three clocks: end to end (Ray start
  and the actor's model load included), the engine's dispatch loop (model already loaded), and
  the sum of the per-shard `seconds` of the commit records (what the actor spent per shard).
- disk: bytes per sample of the feature's Zarr files against a raw float32 `.npy` of [N, K, D].

The machine may be shared with other work, which slows either side and skews the ratio. So the
CPU seconds of this process and all its descendants (Ray's daemons and workers too) are counted
per phase from /proc: cores used well below the thread count means a neighbour took the rest.

    python bench/precompute_throughput.py            # ViT-B/16 built from its config, 256 samples
    python bench/precompute_throughput.py --small    # tiny ViT, a quick check
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import timm
import torch

from cache_schema import CacheLayout, CommitRecord, SplitReader
from precompute.engine import RunConfig, run, worker_layout
from precompute.experts import get_expert
from precompute.sources import get_source

EXPERT, SOURCE, SPLIT = "vit-cls", "shapes", "train"


@dataclass
class Timing:
    """One way of clocking N samples; `ratio` is this rate over the bare loop's."""

    name: str
    seconds: float
    samples: int
    ratio: float | None = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def save_vit_base(path: Path) -> str:
    """ViT-B/16 at its published size with random weights: same compute, no hub download."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    timm.models.save_for_hf(model, str(path), safe_serialization=True)
    return str(path)


def save_tiny_vit(path: Path) -> str:
    """A toy timm ViT (as in the tests): the pipeline's overheads dominate, the forward is ~free."""
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=6, num_heads=2, num_classes=4)
    model.pretrained_cfg = {
        "input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
        "crop_pct": 1.0, "crop_mode": "center", "num_classes": 4, "architecture": "vit_tiny_patch16_224",
    }
    timm.models.save_for_hf(model, str(path), safe_serialization=True,
                            model_args={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 6, "num_heads": 2})
    return str(path)


class TreeCpuMeter:
    """CPU seconds of this process and every descendant, polled from /proc (Linux only).

    Ray workers exit before a phase ends (the engine kills its actors), so their time is read
    while they live; whatever a process spends in its last poll interval is missed.
    """

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.ticks_per_s = os.sysconf("SC_CLK_TCK")
        self.last_ticks: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            self._sample()
            if self.stop.wait(self.interval_s):
                self._sample()
                return

    def _sample(self) -> None:
        children: dict[int, list[int]] = {}
        ticks: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:  # exited since the listing
                continue
            pid = int(entry.name)
            children.setdefault(int(fields[1]), []).append(pid)
            ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
        tree, frontier = [], [os.getpid()]
        while frontier:
            pid = frontier.pop()
            tree.append(pid)
            frontier.extend(children.get(pid, []))
        for pid in tree:
            if pid in ticks:
                self.last_ticks[pid] = ticks[pid]

    def __enter__(self) -> TreeCpuMeter:
        self._sample()
        self.baseline = sum(self.last_ticks.values())
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def seconds(self) -> float:
        return (sum(self.last_ticks.values()) - self.baseline) / self.ticks_per_s


def run_pipeline(model: str, cache: Path, samples: int, batch_size: int, shard_size: int) -> dict:
    config = RunConfig(experts=[EXPERT], source=SOURCE, split=SPLIT, cache=str(cache), model=model,
                       shard_size=shard_size, batch_size=batch_size, limit=samples, workers=1,
                       source_options={"num": samples})
    with TreeCpuMeter() as cpu:
        began = time.perf_counter()
        [summary] = run(config, progress=False)
        end_to_end = time.perf_counter() - began
    if summary.shards_failed or summary.samples != samples:
        raise RuntimeError(f"pipeline did not finish cleanly: {summary}")
    _, threads, _ = worker_layout(config.workers)
    ray.shutdown()
    layout = CacheLayout(cache)
    shard_seconds = [
        CommitRecord.read(layout.commit_path(SOURCE, SPLIT, EXPERT, shard)).seconds
        for shard in range(-(-samples // shard_size))
    ]
    return {"end_to_end_s": end_to_end, "dispatch_s": summary.seconds, "shard_seconds": shard_seconds,
            "threads": int(threads), "cpu_s": cpu.seconds}


def run_bare_loop(model: str, samples: int, batch_size: int, shard_size: int, threads: int) -> dict:
    """The expert's forward alone, grouped exactly as the engine groups it: shards, then batches."""
    torch.set_num_threads(threads)
    expert = get_expert(EXPERT, model=model, device="cuda" if torch.cuda.is_available() else "cpu")
    expert.load()
    source = get_source(SOURCE, None, SPLIT, num=samples)
    planned = source.samples()
    shards = []
    for start in range(0, samples, shard_size):
        shard = planned[start : start + shard_size]
        shards.append([
            torch.stack([expert.preprocess(source.load_image(s)) for s in shard[i : i + batch_size]])
            for i in range(0, len(shard), batch_size)
        ])
    expert.predict(shards[0][0])  # warm-up: first-call allocations and kernel choice, untimed
    shard_seconds = []
    with TreeCpuMeter() as cpu:
        for batches in shards:
            began = time.perf_counter()
            for batch in batches:
                expert.predict(batch)
            shard_seconds.append(time.perf_counter() - began)
    return {"shard_seconds": shard_seconds, "cpu_s": cpu.seconds}


def disk_usage(cache: Path, samples: int) -> dict:
    feature_dir = CacheLayout(cache).feature_dir(SOURCE, SPLIT, EXPERT)
    by_part = {
        part.name: sum(f.stat().st_size for f in ([part] if part.is_file() else part.rglob("*")) if f.is_file())
        for part in sorted(feature_dir.iterdir())
    }
    cls = SplitReader(cache, SOURCE, SPLIT).feature(EXPERT).read("cls")
    with tempfile.TemporaryDirectory() as scratch:
        npy = Path(scratch) / "cls.npy"
        np.save(npy, cls.astype(np.float32))
        npy_bytes = npy.stat().st_size
    zarr_bytes = sum(by_part.values())
    return {
        "shape": list(cls.shape),
        "zarr_bytes": zarr_bytes,
        "zarr_bytes_by_part": by_part,
        "zarr_bytes_per_sample": zarr_bytes / samples,
        "raw_float16_bytes_per_sample": cls[0].size * 2,
        "npy_float32_bytes_per_sample": npy_bytes / samples,
        "zarr_over_npy_float32": zarr_bytes / npy_bytes,
    }


def print_report(result: dict) -> None:
    c = result["config"]
    print(f"\nvit-cls over shapes: {c['samples']} samples, batch {c['batch_size']}, shard {c['shard_size']}, "
          f"{c['threads']} torch threads, model {c['model']}")
    print(f"{'':<44}{'seconds':>9}{'samples/s':>11}{'/ bare':>8}")
    for t in result["timings"]:
        ratio = "" if t["ratio"] is None else f"{t['ratio']:.3f}"
        print(f"{t['name']:<44}{t['seconds']:>9.2f}{t['samples_per_s']:>11.2f}{ratio:>8}")
    for phase in ("pipeline", "bare"):
        cpu = result["cpu"][phase]
        print(f"{phase} CPU: {cpu['cpu_s']:.1f} CPU-s over {cpu['wall_s']:.1f} s = {cpu['cores_used']:.2f} cores "
              f"({cpu['cpu_s_per_sample']:.3f} CPU-s/sample)")
    print(f"per-shard seconds: pipeline {result['pipeline_shard_seconds']}  bare {result['bare_shard_seconds']}")
    d = result["disk"]
    print(f"\ndisk, {EXPERT} {d['shape']} float16 (zstd):")
    print(f"  zarr feature dir {d['zarr_bytes_per_sample']:>10.1f} bytes/sample   {d['zarr_bytes_by_part']}")
    print(f"  raw float16      {d['raw_float16_bytes_per_sample']:>10.1f} bytes/sample   (K*D*2, for reference)")
    print(f"  .npy float32     {d['npy_float32_bytes_per_sample']:>10.1f} bytes/sample")
    print(f"  zarr / npy float32 = {d['zarr_over_npy_float32']:.3f}")
    print(f"\ngoal: pipeline (steady, all shards) >= 0.85 of bare; measured {result['timings'][1]['ratio']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="timm model directory (save_for_hf) or timm name; default: ViT-B/16 from its config")
    which.add_argument("--small", action="store_true", help="a tiny ViT instead of ViT-B, for a quick check")
    parser.add_argument("--samples", type=int, help="samples to run (default: 256 for ViT-B, 2048 with --small)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per forward (default: 32, the engine's)")
    parser.add_argument("--shard-size", type=int, help="samples per shard (default: samples / 4)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/precompute_throughput.json"))
    args = parser.parse_args()
    samples = args.samples or (2048 if args.small else 256)
    shard_size = args.shard_size or max(1, samples // 4)
    if min(samples, args.batch_size, shard_size) < 1:
        parser.error("--samples, --batch-size and --shard-size must be >= 1")

    with tempfile.TemporaryDirectory(prefix="precompute-bench-") as scratch:
        scratch = Path(scratch)
        if args.model:
            model, model_name = args.model, args.model
        elif args.small:
            model, model_name = save_tiny_vit(scratch / "tiny-vit"), "tiny ViT (6 x 32, 32 px)"
        else:
            model, model_name = save_vit_base(scratch / "vit-b16"), "vit_base_patch16_224 (random init)"
        print(f"pipeline: {samples} samples ...", flush=True)
        pipeline = run_pipeline(model, scratch / "cache", samples, args.batch_size, shard_size)
        print("bare loop ...", flush=True)
        bare = run_bare_loop(model, samples, args.batch_size, shard_size, pipeline["threads"])
        disk = disk_usage(scratch / "cache", samples)

    bare_s, shard_s = sum(bare["shard_seconds"]), pipeline["shard_seconds"]
    timings = [
        Timing("bare loop: predict on pre-decoded tensors", bare_s, samples),
        Timing("pipeline steady: sum of per-shard seconds", sum(shard_s), samples),
        Timing("pipeline steady, shards after the first", sum(shard_s[1:]), samples - shard_size)
        if len(shard_s) > 1 else None,
        Timing("pipeline dispatch loop (model loaded)", pipeline["dispatch_s"], samples),
        Timing("pipeline end to end (Ray start, load)", pipeline["end_to_end_s"], samples),
    ]
    timings = [t for t in timings if t is not None]
    bare_rate = timings[0].samples_per_s
    for t in timings[1:]:
        t.ratio = t.samples_per_s / bare_rate
    cpu = {
        phase: {"cpu_s": cpu_s, "wall_s": wall_s, "cores_used": cpu_s / wall_s, "cpu_s_per_sample": cpu_s / samples}
        for phase, cpu_s, wall_s in (("pipeline", pipeline["cpu_s"], pipeline["end_to_end_s"]),
                                     ("bare", bare["cpu_s"], bare_s))
    }
    result = {
        "config": {"model": model_name, "samples": samples, "batch_size": args.batch_size, "shard_size": shard_size,
                   "threads": pipeline["threads"], "cpus": os.cpu_count(), "torch": torch.__version__,
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
                   "load_average_after": os.getloadavg()},
        "timings": [{**asdict(t), "samples_per_s": t.samples_per_s} for t in timings],
        "pipeline_shard_seconds": shard_s,
        "bare_shard_seconds": [round(s, 4) for s in bare["shard_seconds"]],
        "cpu": cpu,
        "disk": disk,
    }
    print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
