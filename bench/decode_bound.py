"""Is precompute decode-bound at the decoder's own rate? The pipeline against bare decode loops.

When the model is cheap (a fast GPU, or a no-model expert such as `rgb`), what bounds a run is
the CPU side: decode, resize, write. This measures, in one run, on the same JPEG files and with
the same thread count:

- bare PIL loop: `Image.open` + `convert("RGB")` + bicubic resize to 224, in a thread pool;
- bare torchvision loop: `torchvision.io.decode_jpeg` on the file's bytes + antialiased bicubic
  resize of the uint8 tensor to 224 (libjpeg-turbo, GIL released), in a thread pool; also with
  one thread, which gives the per-core decode rate;
- pipeline, in-process: `precompute.engine.commit_shard` over every shard (the actor's own code:
  decode threads, preprocess, batched predict, Zarr write, commit record) for `rgb` at
  resolution 224 and for `vit-cls` with a 1-block ViT (width 32, patch 16) at 224 px (a model too
  cheap to matter);
  the bare forward of that ViT is timed too, for reference;
- `precompute run` end to end, as a user runs it (Ray start, model load, planning included), with
  its start-up (command start to the first shard's first decode) read from the commit records.

Each side runs `--rounds` times, interleaved; the best round counts (the machine may be shared).
Ratios are pipeline / best bare loop.

    python bench/decode_bound.py                 # 600 JPEGs 640x480, ~2 min on 2 cores
    python bench/decode_bound.py --images 200 --rounds 1 --no-run   # a quick look
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import resize

from cache_schema import CacheLayout, CacheWriter, CommitRecord
from precompute.engine import commit_shard, plan_split
from precompute.experts import get_expert
from precompute.sources import get_source
from vit_models import save_tiny_vit  # bench/ is on sys.path when a script here runs

SIZE = 224
GOAL = 0.9
BUSY_LOAD = 1.5  # a 1-minute load average above this before timing means the figures are shared


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Photo-like 640x480 JPEGs: smooth gradients, sensor noise, blurred shapes, quality 90, so they
    compress (and decode) like photographs rather than like flat test cards or pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        tilt = rng.uniform(-1, 1, size=(3, 2))
        base = np.stack([128 + 100 * (tilt[c, 0] * x / 640 + tilt[c, 1] * y / 480) for c in range(3)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(8, 25))):
            x0, y0 = int(rng.integers(-50, 640)), int(rng.integers(-50, 480))
            box = [x0, y0, x0 + int(rng.integers(10, 250)), y0 + int(rng.integers(10, 250))]
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
        path = folder / f"img{i:05d}.jpg"
        image.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def pil_one(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def torchvision_one(path: Path) -> torch.Tensor:
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    image = decode_jpeg(data, mode=ImageReadMode.RGB)
    return resize(image, [SIZE, SIZE], interpolation=InterpolationMode.BICUBIC, antialias=True)


def bare_loop(one, paths: list[Path], threads: int) -> float:
    """img/s of `one` over `paths` in a pool of `threads` (after a short untimed warm-up)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, paths[:16]))
        began = time.perf_counter()
        list(pool.map(one, paths))
        return len(paths) / (time.perf_counter() - began)


def pipeline(expert_name: str, model: str | None, options: dict, data_root: Path, cache: Path, threads: int,
             batch_size: int, shard_size: int) -> dict:
    """img/s of the actor's code path in this process, over every shard of the folder, plus the
    commit records' per-stage profile summed over shards."""
    expert = get_expert(expert_name, model=model, **options)
    expert.load()
    spec = expert.spec(expert_name)
    source = get_source("images", str(data_root), "all")
    plan, samples = plan_split(source, "images", shard_size, None)
    writer = CacheWriter(str(cache))
    writer.prepare_split(plan, overwrite=True)
    writer.prepare_feature(plan, spec, overwrite=True)
    records = []
    with ThreadPoolExecutor(max_workers=threads) as decoder:
        commit_shard(expert, spec, writer, "images", source, 0, 0, samples[:batch_size], batch_size, {}, decoder,
                     "cpu")  # warm-up: first-call allocations; shard 0 is written again below
        began = time.perf_counter()
        for shard in range(plan.num_shards):
            start, stop = plan.shard_range(shard)
            records.append(commit_shard(expert, spec, writer, "images", source, shard, start, samples[start:stop],
                                        batch_size, {}, decoder, f"cpu x{threads} threads"))
        seconds = time.perf_counter() - began
    profile: dict[str, float] = {}
    for record in records:
        for stage, value in getattr(record, "profile", {}).items():
            profile[stage] = round(profile.get(stage, 0.0) + value, 3)
    return {"img_s": len(samples) / seconds, "profile": profile,
            "gaps": sum(r.num_samples - r.num_valid for r in records)}


def bare_forward(model: str, count: int, batch_size: int) -> float:
    """img/s of the tiny ViT's forward alone (`vit-cls` predict on ready tensors)."""
    expert = get_expert("vit-cls", model=model, levels=1)
    expert.load()
    batch = torch.rand(batch_size, 3, SIZE, SIZE)
    expert.predict(batch, {})
    began = time.perf_counter()
    for _ in range(max(1, count // batch_size)):
        expert.predict(batch, {})
    return max(1, count // batch_size) * batch_size / (time.perf_counter() - began)


def precompute_run(expert_args: list[str], data_root: Path, cache: Path, shard_size: int, batch_size: int) -> dict:
    """`precompute run` as a user runs it: end-to-end img/s, the steady rate from the commit records,
    and the start-up (command start until the first shard began, from the earliest record)."""
    began = time.time()
    subprocess.run([sys.executable, "-m", "precompute.cli", "run", *expert_args, "--shards", "images", "--data-root",
                    str(data_root), "--cache", str(cache), "--shard-size", str(shard_size), "--batch-size",
                    str(batch_size), "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    ended = time.time()
    expert = expert_args[expert_args.index("--expert") + 1]
    commits = sorted(CacheLayout(str(cache)).commit_path("images", "all", expert, 0).parent.glob("*.json"))
    records = [(CommitRecord.read(p), p.stat().st_mtime) for p in commits]
    samples = sum(r.num_samples for r, _ in records)
    first_shard_began = min(mtime - r.seconds for r, mtime in records)
    return {"end_to_end_img_s": samples / (ended - began), "steady_img_s": samples / sum(r.seconds for r, _ in records),
            "startup_s": first_shard_began - began, "seconds": ended - began}


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600, help="JPEGs to generate (default: 600)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="decode threads on every side, and torch threads (default: the CPU count, as an actor)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: --threads, as the actor)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: 32, the engine's)")
    parser.add_argument("--shard-size", type=int, default=200, help="(default: 200)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats; the best counts (default: 2)")
    parser.add_argument("--no-run", action="store_true", help="skip the end-to-end `precompute run`")
    parser.add_argument("--out", type=Path, default=Path("bench/out/decode_bound.json"), help="JSON results")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads or args.threads)  # the actor: its CPUs
    load_before = load_average()
    if load_before > BUSY_LOAD:
        print(f"warning: load average {load_before:.2f} before timing: other jobs share this machine", flush=True)

    with tempfile.TemporaryDirectory(prefix="decode-bound-") as scratch:
        scratch = Path(scratch)
        paths = make_jpegs(scratch / "images", args.images)
        model = save_tiny_vit(scratch / "vit-1block", depth=1, img_size=SIZE, patch_size=16)
        for path in paths:  # page cache: every side reads from memory
            path.read_bytes()
        rounds: dict[str, list[float]] = {}
        profiles: dict[str, dict] = {}
        sides = {
            "bare PIL": lambda: bare_loop(pil_one, paths, args.threads),
            "bare torchvision": lambda: bare_loop(torchvision_one, paths, args.threads),
            "bare torchvision, 1 thread": lambda: bare_loop(torchvision_one, paths, 1),
            "pipeline rgb": lambda: pipeline("rgb", None, {"resolution": SIZE}, scratch / "images", scratch / "cache",
                                             args.threads, args.batch_size, args.shard_size),
            "pipeline vit-cls (1-block ViT)": lambda: pipeline("vit-cls", model, {"levels": 1}, scratch / "images",
                                                               scratch / "cache", args.threads, args.batch_size,
                                                               args.shard_size),
            "bare forward (1-block ViT)": lambda: bare_forward(model, args.images, args.batch_size),
        }
        for round_ in range(args.rounds):
            for name, side in sides.items():
                result = side()
                if isinstance(result, dict):
                    profiles[name] = result["profile"]
                    if result["gaps"]:
                        raise SystemExit(f"{name}: {result['gaps']} gaps on valid JPEGs")
                    result = result["img_s"]
                rounds.setdefault(name, []).append(result)
                print(f"round {round_ + 1}  {name:<32}{result:>9.1f} img/s", flush=True)
        runs = {}
        if not args.no_run:
            for name, expert_args in (("rgb", ["--expert", "rgb", "--expert-opt", f"resolution={SIZE}"]),
                                      ("vit-cls", ["--expert", "vit-cls", "--model", model, "--expert-opt", "levels=1"])):
                runs[name] = precompute_run(expert_args, scratch / "images", scratch / f"run-{name}", args.shard_size,
                                            args.batch_size)
    load_after = load_average()

    best = {name: max(values) for name, values in rounds.items()}
    decoder_best = max(best["bare PIL"], best["bare torchvision"])
    ratios = {name: best[name] / decoder_best for name in best if name.startswith("pipeline")}
    result = {
        "config": {"images": args.images, "size": "640x480 -> 224", "threads": args.threads, "cpus": os.cpu_count(),
                   "batch_size": args.batch_size, "shard_size": args.shard_size, "rounds": args.rounds,
                   "torch": torch.__version__, "load_average_before": load_before, "load_average_after": load_after},
        "img_s_rounds": rounds, "img_s_best": best, "ratio_to_best_bare_decoder": ratios,
        "per_core_decode_img_s": best["bare torchvision, 1 thread"],
        "profile_s": profiles, "precompute_run": runs,
    }
    print(f"\n{args.images} JPEGs 640x480 -> {SIZE}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"load average {load_before:.2f} before, {load_after:.2f} after; best of {args.rounds}")
    for name, value in best.items():
        ratio = f"   pipeline / best bare decoder = {ratios[name]:.2f} (goal >= {GOAL})" if name in ratios else ""
        print(f"  {name:<32}{value:>9.1f} img/s{ratio}")
    print(f"  per-core decode rate (torchvision, 1 thread): {best['bare torchvision, 1 thread']:.1f} img/s")
    for name, profile in profiles.items():
        if profile:
            print(f"  {name} stage seconds (summed over shards): {profile}")
    for name, run in runs.items():
        print(f"  precompute run {name}: end to end {run['end_to_end_img_s']:.1f} img/s ({run['seconds']:.1f} s), "
              f"steady {run['steady_img_s']:.1f} img/s, start-up before the first shard {run['startup_s']:.1f} s")
    if max(load_before, load_after) > BUSY_LOAD:
        print(f"note: load average above {BUSY_LOAD} around this run: other jobs shared the cores")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
