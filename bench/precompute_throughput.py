"""Precompute throughput: the full pipeline against a bare forward loop, and bytes on disk.

Measured side by side in one run, on one model and one machine:

- bare loop: the `vit-cls` expert's `predict` over tensors decoded and preprocessed beforehand,
  with the batch size, shard grouping and torch thread count that the engine's one actor gets.
  It is the most the pipeline could reach.
- pipeline: `precompute.engine.run` over the `shapes` source doing its real work (Ray, decode
  threads, preprocess, forward, Zarr write, commit record), on three clocks: the sum of the
  commit records' per-shard `seconds` (what the actor spent per shard: the steady state), the
  engine's dispatch loop (model already loaded), and end to end (Ray start and model load too).
- disk: bytes per sample of the feature's Zarr files against a raw float32 `.npy` of [N, K, D].

A machine shared with other work slows either side at random and skews the ratio, so CPU use is
polled from /proc (Linux) all along: per shard, the cores this process and its descendants used
(Ray's daemons and actor included) and the cores everything else on the machine used. Samples
per CPU-second of our own processes is the ratio a busy neighbour disturbs least.

    python bench/precompute_throughput.py            # ViT-B/16 built from its config, 256 samples
    python bench/precompute_throughput.py --small    # tiny ViT, a quick check
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import bisect
import json
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from cache_schema import CacheLayout, CommitRecord, SplitReader
from precompute.engine import RunConfig, run, worker_layout
from precompute.experts import get_expert
from precompute.sources import get_source
from vit_models import save_tiny_vit, save_vit_base  # bench/ is on sys.path when a script here runs

EXPERT, SOURCE, SPLIT = "vit-cls", "shapes", "train"
GOAL = 0.85  # the pipeline should keep this share of the bare loop's rate
SHARED_CORES = 0.2  # other processes using more than this, on average, make wall-clock ratios unreliable


class CpuMonitor:
    """Polls CPU ticks of our process tree and of the whole machine, to split any window into ours/others.

    A process is counted at the last ticks seen, so Ray workers that exit keep what they used
    (less their last poll interval).
    """

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.ticks_per_s = os.sysconf("SC_CLK_TCK")
        self.ours_by_pid: dict[int, int] = {}
        self.series: list[tuple[float, int, int]] = []  # (time.time(), our ticks, machine busy ticks)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.wait(self.interval_s):
            self._sample()

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
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            ticks[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime + stime
        frontier = [os.getpid()]
        while frontier:
            pid = frontier.pop()
            self.ours_by_pid[pid] = ticks.get(pid, self.ours_by_pid.get(pid, 0))
            frontier.extend(children.get(pid, []))
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
        self.series.append((time.time(), sum(self.ours_by_pid.values()), user + nice + system + irq + softirq + steal))

    def __enter__(self) -> CpuMonitor:
        self._sample()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()

    def _at(self, t: float) -> tuple[float, float]:
        times = [s[0] for s in self.series]
        i = min(max(bisect.bisect_left(times, t), 1), len(times) - 1)
        (t0, ours0, busy0), (t1, ours1, busy1) = self.series[i - 1], self.series[i]
        w = min(max((t - t0) / (t1 - t0), 0.0), 1.0)
        return ours0 + w * (ours1 - ours0), busy0 + w * (busy1 - busy0)

    def usage(self, start: float, stop: float) -> dict[str, float]:
        """CPU-seconds and cores of ours and of everything else between two `time.time()`s."""
        (ours0, busy0), (ours1, busy1) = self._at(start), self._at(stop)
        ours, others = (ours1 - ours0) / self.ticks_per_s, (busy1 - busy0 - ours1 + ours0) / self.ticks_per_s
        return {"our_cpu_s": ours, "our_cores": ours / (stop - start), "other_cores": max(others, 0.0) / (stop - start)}


@dataclass
class Shard:
    seconds: float
    samples: int
    our_cpu_s: float
    our_cores: float
    other_cores: float


def run_pipeline(model: str, cache: Path, samples: int, batch_size: int, shard_size: int, cpu: CpuMonitor) -> dict:
    config = RunConfig(experts=[EXPERT], source=SOURCE, split=SPLIT, cache=str(cache), models={EXPERT: model},
                       shard_size=shard_size, batch_size=batch_size, limit=samples, workers=1,
                       source_options={"num": samples})
    began, wall = time.time(), time.perf_counter()
    [summary] = run(config, progress=False)
    end_to_end_s, ended = time.perf_counter() - wall, time.time()
    if summary.shards_failed or summary.samples != samples:
        raise RuntimeError(f"the pipeline did not finish cleanly: {summary}")
    _, threads, _ = worker_layout(config.workers)
    ray.shutdown()
    layout = CacheLayout(cache)
    shards = []
    for shard in range(-(-samples // shard_size)):
        path = layout.commit_path(SOURCE, SPLIT, EXPERT, shard)
        record, committed = CommitRecord.read(path), path.stat().st_mtime
        shards.append(Shard(record.seconds, record.num_samples, **cpu.usage(committed - record.seconds, committed)))
    return {"shards": shards, "dispatch_s": summary.seconds, "end_to_end_s": end_to_end_s,
            "end_to_end_cpu": cpu.usage(began, ended), "threads": int(threads)}


def run_bare_loop(model: str, samples: int, batch_size: int, shard_size: int, threads: int, cpu: CpuMonitor) -> list[Shard]:
    """The expert's forward alone, grouped as the engine groups it: shards, then batches."""
    torch.set_num_threads(threads)
    expert = get_expert(EXPERT, model=model, device="cuda" if torch.cuda.is_available() else "cpu")
    expert.load()
    source = get_source(SOURCE, None, SPLIT, num=samples)
    planned = source.samples()
    tensors_by_shard = []
    for start in range(0, samples, shard_size):
        shard = planned[start : start + shard_size]
        tensors_by_shard.append([
            torch.stack([expert.preprocess(source.load_image(s)) for s in shard[i : i + batch_size]])
            for i in range(0, len(shard), batch_size)
        ])
    expert.predict(tensors_by_shard[0][0])  # warm-up (first-call allocations, kernel choice), untimed
    shards = []
    for batches in tensors_by_shard:
        began, wall = time.time(), time.perf_counter()
        for batch in batches:
            expert.predict(batch)
        seconds = time.perf_counter() - wall
        shards.append(Shard(seconds, sum(len(b) for b in batches), **cpu.usage(began, began + seconds)))
    return shards


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
        "zarr_bytes_by_part": by_part,
        "zarr_bytes_per_sample": zarr_bytes / samples,
        "raw_float16_bytes_per_sample": cls[0].size * 2,
        "npy_float32_bytes_per_sample": npy_bytes / samples,
        "zarr_over_npy_float32": zarr_bytes / npy_bytes,
    }


def rate_row(name: str, seconds: float, samples: int, bare_rate: float | None) -> dict:
    rate = samples / seconds
    return {"name": name, "seconds": seconds, "samples": samples, "samples_per_s": rate,
            "ratio": None if bare_rate is None else rate / bare_rate}


def summarize(pipeline: dict, bare: list[Shard]) -> dict:
    shards: list[Shard] = pipeline["shards"]
    samples = sum(s.samples for s in shards)
    bare_s = sum(s.seconds for s in bare)
    bare_rate = samples / bare_s
    rows = [rate_row("bare loop: predict on pre-decoded tensors", bare_s, samples, None),
            rate_row("pipeline steady: sum of per-shard seconds", sum(s.seconds for s in shards), samples, bare_rate)]
    if len(shards) > 1:
        rows.append(rate_row("pipeline steady, shards after the first", sum(s.seconds for s in shards[1:]),
                             samples - shards[0].samples, sum(s.samples for s in bare[1:]) / sum(s.seconds for s in bare[1:])))
    rows.append(rate_row("pipeline dispatch loop (model loaded)", pipeline["dispatch_s"], samples, bare_rate))
    rows.append(rate_row("pipeline end to end (Ray start, model load)", pipeline["end_to_end_s"], samples, bare_rate))
    bare_per_cpu_s = samples / sum(s.our_cpu_s for s in bare)
    rows.append({"name": "samples per our CPU-s, steady shards", "seconds": None, "samples": samples,
                 "samples_per_s": samples / sum(s.our_cpu_s for s in shards),
                 "ratio": samples / sum(s.our_cpu_s for s in shards) / bare_per_cpu_s, "bare_samples_per_s": bare_per_cpu_s})
    return {"timings": rows, "pipeline_shards": [asdict(s) for s in shards], "bare_shards": [asdict(s) for s in bare],
            "other_cores_mean": {"pipeline": mean_other_cores(shards), "bare": mean_other_cores(bare)},
            "pipeline_end_to_end_cpu": pipeline["end_to_end_cpu"]}


def mean_other_cores(shards: list[Shard]) -> float:
    return sum(s.other_cores * s.seconds for s in shards) / sum(s.seconds for s in shards)


def print_report(result: dict) -> None:
    c, d = result["config"], result["disk"]
    print(f"\n{EXPERT} over {SOURCE}: {c['samples']} samples, batch {c['batch_size']}, shard {c['shard_size']}, "
          f"{c['threads']} torch threads, {c['cpus']} CPUs, model {c['model']}")
    print(f"{'':<46}{'seconds':>9}{'samples/s':>11}{'/ bare':>8}")
    for row in result["timings"]:
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.2f}"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"{row['name']:<46}{seconds:>9}{row['samples_per_s']:>11.2f}{ratio:>8}")
    print(f"(bare: {result['timings'][-1]['bare_samples_per_s']:.2f} samples per our CPU-s; "
          f"goal: pipeline steady >= {GOAL} of bare)")
    print(f"\n{'shard':<7}{'pipeline s':>11}{'our cores':>10}{'others':>8}{'bare s':>9}{'our cores':>10}{'others':>8}")
    for i, (p, b) in enumerate(zip(result["pipeline_shards"], result["bare_shards"])):
        print(f"{i:<7}{p['seconds']:>11.2f}{p['our_cores']:>10.2f}{p['other_cores']:>8.2f}"
              f"{b['seconds']:>9.2f}{b['our_cores']:>10.2f}{b['other_cores']:>8.2f}")
    others = result["other_cores_mean"]
    if max(others.values()) > SHARED_CORES:
        print(f"the machine was shared: other processes used {others['pipeline']:.2f} cores during the pipeline's "
              f"shards and {others['bare']:.2f} during the bare loop's; the wall-clock ratios measure that, "
              f"samples per our CPU-s is the better guide")
    e2e = result["pipeline_end_to_end_cpu"]
    print(f"pipeline end to end: {e2e['our_cpu_s']:.1f} CPU-s, {e2e['our_cores']:.2f} cores ours, "
          f"{e2e['other_cores']:.2f} others")
    print(f"\ndisk, {EXPERT} {d['shape']} float16, zstd:")
    print(f"  zarr feature dir {d['zarr_bytes_per_sample']:>9.1f} bytes/sample  {d['zarr_bytes_by_part']}")
    print(f"  raw float16      {d['raw_float16_bytes_per_sample']:>9.1f} bytes/sample  (K*D*2, for reference)")
    print(f"  .npy float32     {d['npy_float32_bytes_per_sample']:>9.1f} bytes/sample")
    print(f"  zarr / npy float32 = {d['zarr_over_npy_float32']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="timm model directory (save_for_hf) or timm name; default: ViT-B/16 from its config")
    which.add_argument("--small", action="store_true", help="a tiny ViT instead of ViT-B, for a quick check")
    parser.add_argument("--samples", type=int, help="samples to run (default: 256 for ViT-B, 2048 with --small)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per forward (default: 32, the engine's)")
    parser.add_argument("--shard-size", type=int, help="samples per shard (default: a quarter of --samples)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/precompute_throughput.json"), help="JSON results")
    args = parser.parse_args()
    samples = args.samples if args.samples is not None else 2048 if args.small else 256
    shard_size = args.shard_size if args.shard_size is not None else max(1, samples // 4)
    if min(samples, args.batch_size, shard_size) < 1:
        parser.error("--samples, --batch-size and --shard-size must be >= 1")

    with tempfile.TemporaryDirectory(prefix="precompute-bench-") as scratch, CpuMonitor() as cpu:
        scratch = Path(scratch)
        if args.model:
            model, model_name = args.model, args.model
        elif args.small:
            model, model_name = save_tiny_vit(scratch / "tiny-vit"), "tiny ViT (depth 6, width 32, 32 px)"
        else:
            model, model_name = save_vit_base(scratch / "vit-b16"), "vit_base_patch16_224 (random init)"
        print(f"pipeline: {samples} samples ...", flush=True)
        pipeline = run_pipeline(model, scratch / "cache", samples, args.batch_size, shard_size, cpu)
        print("bare loop ...", flush=True)
        bare = run_bare_loop(model, samples, args.batch_size, shard_size, pipeline["threads"], cpu)
        disk = disk_usage(scratch / "cache", samples)

    result = {
        "config": {"model": model_name, "samples": samples, "batch_size": args.batch_size, "shard_size": shard_size,
                   "threads": pipeline["threads"], "cpus": os.cpu_count(), "torch": torch.__version__,
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        **summarize(pipeline, bare),
        "disk": disk,
    }
    print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
