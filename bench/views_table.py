"""What cached augmented views buy eP-ALM, and what they cost: the README's views table.

On the shapes world with few training scenes (where a model trained on one fixed view of each
image overfits), for each V in --views: `precompute run --expert vit-cls --expert-opt views=V` over
the training scenes (and the clean held-out split), then `trainer fit` eP-ALM with the main job's
config (jobs/configs/epalm_shapes.yaml; `model.views=true` when V > 0) for each seed, scored on the
held-out scenes. Printed per V: held-out VQA accuracy, mean ± sample standard deviation over the
seeds (and each seed's), the feature's bytes on disk per training sample, and the precompute
seconds (the commit records' per-shard seconds: decode, augment, forward and write; Ray's start
and the model load are left out) for the training split.

    python bench/views_table.py --models demo-out/models      # the table (3 seeds x V = 0, 4, 8)
    python bench/views_table.py --quick                        # a check that it runs, ~2-3 min

`--models` is a directory written by `pretrain-shapes --world shapes` (the main job's stand-ins; it
reads vit/ and lm/). `--quick` without `--models` pretrains a fast ViT and LM first (near chance:
the numbers mean nothing, only that every leg runs). Results also go to bench/out/views_table.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "jobs" / "configs" / "epalm_shapes.yaml"
SOURCE, EXPERT = "shapes", "vit-cls"


def fast_models(out: Path) -> Path:
    """A ViT and an LM for the shapes world, trained for seconds as `pretrain-shapes --fast` trains them."""
    from precompute.sources.shapes import ShapesWorld
    from precompute.sources.shapes_video import ShapesVideoWorld
    from worldmodels import lm, vit

    world = ShapesWorld(seed=0, image_size=64)
    vit.pretrain_vit(out / "vit", world, num_scenes=300, steps=150, config=vit.VitConfig(val_scenes=100, warmup_steps=15))
    lm.pretrain_lm(out / "lm", (world, ShapesVideoWorld(seed=0, image_size=64)), num_scenes=100, steps=40,
                   config=lm.LmConfig(val_scenes=20, warmup_steps=5))
    return out


def precompute(cache: Path, vit: Path, split: str, scenes: int, views: int) -> float:
    """`vit-cls` with `views` over the first `scenes` of `split`; the commit records' seconds, summed."""
    from precompute.engine import RunConfig, run

    [summary] = run(RunConfig(experts=[EXPERT], source=SOURCE, split=split, cache=str(cache), models={EXPERT: str(vit)},
                              shard_size=100, batch_size=50, source_options={"num": scenes},
                              expert_options={EXPERT: {"views": views}}), progress=False)
    if summary.shards_failed or summary.invalid:
        raise RuntimeError(f"precompute {split} with views={views}: {summary}")
    records = (cache / SOURCE / split / "_commits" / EXPERT).glob("*.json")
    return sum(json.loads(record.read_text())["seconds"] for record in records)


def disk_bytes(cache: Path, split: str) -> int:
    return sum(path.stat().st_size for path in (cache / SOURCE / split / EXPERT).rglob("*") if path.is_file())


def train(cache: Path, out: Path, lm: Path, seed: int, views: int, epochs: float) -> float:
    """eP-ALM with the main job's config on `cache`; the held-out VQA accuracy (percent)."""
    from trainer.config import load_config
    from trainer.loop import fit

    config = load_config(CONFIG, [f"model.lm={lm}", f"model.views={'true' if views else 'false'}", f"seed={seed}",
                                  f"epochs={epochs}", "num_workers=0", "save_every=100000", "log_every=100000"],
                         cache=str(cache), out=str(out))
    return fit(config, progress=False)["vqa_accuracy"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="output directory of `pretrain-shapes --world shapes` (vit/, lm/)")
    parser.add_argument("--quick", action="store_true", help="V = 0, 2; one seed; 32 scenes, 2 epochs: a check that it runs")
    parser.add_argument("--views", default=None, help="comma-separated V values (default: 0,4,8; --quick: 0,2)")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds per V (default: 3; --quick: 1)")
    parser.add_argument("--train-scenes", type=int, default=None, help="training scenes (default: 100; --quick: 32)")
    parser.add_argument("--val-scenes", type=int, default=None, help="held-out scenes (default: 200; --quick: 32)")
    parser.add_argument("--epochs", type=float, default=None, help="training epochs (default: 20; --quick: 2)")
    parser.add_argument("--work", type=Path, help="where caches and runs go (default: a temporary directory)")
    args = parser.parse_args()
    quick = args.quick
    views = [int(v) for v in (args.views or ("0,2" if quick else "0,4,8")).split(",")]
    seeds = list(range(args.seeds or (1 if quick else 3)))
    train_scenes = args.train_scenes or (32 if quick else 100)
    val_scenes = args.val_scenes or (32 if quick else 200)
    epochs = args.epochs or (2.0 if quick else 20.0)
    if args.models is None and not quick:
        parser.error("--models DIR (from `pretrain-shapes --world shapes --out DIR`) is needed without --quick")
    if args.models is not None and not all((args.models / name).is_dir() for name in ("vit", "lm")):
        parser.error(f"--models {args.models}: no vit/ and lm/ there (write them with `pretrain-shapes --world shapes`)")
    logging.getLogger("trainer").setLevel(logging.WARNING)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="views-table-") as scratch:
        work = args.work or Path(scratch)
        models = args.models or fast_models(work / "models")
        rows: list[dict[str, Any]] = []
        for v in views:
            cache = work / f"cache-v{v}"
            seconds = precompute(cache, models / "vit", "train", train_scenes, v)
            precompute(cache, models / "vit", "val", val_scenes, 0)
            accuracies = [train(cache, work / f"run-v{v}-s{seed}", models / "lm", seed, v, epochs) for seed in seeds]
            rows.append({"views": v, "accuracy": accuracies, "bytes_per_sample": disk_bytes(cache, "train") / train_scenes,
                         "precompute_s": seconds})
            print(f"V={v}: accuracy {accuracies}, {rows[-1]['bytes_per_sample']:.0f} B/sample, precompute {seconds:.1f} s",
                  flush=True)

    print(f"\neP-ALM on shapes, {train_scenes} training scenes, {epochs:g} epochs, held-out {val_scenes} scenes "
          f"({len(seeds)} seed(s) per V; {time.perf_counter() - started:.0f} s in all)\n")
    print("| V | held-out VQA accuracy (%) | per seed | disk per sample | precompute, training split |")
    print("|---|---|---|---|---|")
    base = rows[0]
    for row in rows:
        mean = statistics.fmean(row["accuracy"])
        spread = statistics.stdev(row["accuracy"]) if len(row["accuracy"]) > 1 else 0.0
        print(f"| {row['views']} | {mean:.1f} ± {spread:.1f} | {', '.join(f'{a:.1f}' for a in row['accuracy'])} "
              f"| {row['bytes_per_sample']:.0f} B ({row['bytes_per_sample'] / base['bytes_per_sample']:.1f}x) "
              f"| {row['precompute_s']:.1f} s ({row['precompute_s'] / base['precompute_s']:.1f}x) |")
    results = ROOT / "bench" / "out" / "views_table.json"
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({"quick": quick, "train_scenes": train_scenes, "val_scenes": val_scenes,
                                   "epochs": epochs, "seeds": seeds, "models": str(args.models or "fast"),
                                   "rows": rows, "seconds": time.perf_counter() - started}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
