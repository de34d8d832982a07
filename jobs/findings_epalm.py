"""eP-ALM's findings (paper Table 9, the variants, Table 14) as seeded measurements from one cache.

    python3 jobs/findings_epalm.py [--out DIR] [--seeds 0,1,2] [--arms A,B,...] [--split test]
        [--findings DIR] [--set KEY=VALUE ...]

DIR is what jobs/findings.sh builds: DIR/models/lm (the tabletop world's frozen OPT) and DIR/cache
with `vit-cls` over tabletop (all 6 of the world ViT's levels) and `timesformer-cls` + `vit-avg-cls`
over shapes-video. Every arm starts from the main job's config (jobs/configs/epalm_tabletop.yaml, the
video arms from epalm_shapes_video.yaml) and is scored once, on --split, by official VQA accuracy
per question type (`answer_type`) and pooled (`expert`, `control`, `overall`, as Prismer's table).

The world's sizes are not the paper's: its ViT has 6 blocks (ViT-B: 12) and its OPT 6 layers
(OPT-350M: 24), so the rows scale the paper's by half:
    levels_last6   the last half of the ViT's levels (3; the paper's 6 of 12) into the LM's last half (3 layers)
    levels_last1   the last level alone, written into each of the last 3 layers (one token into many layers)
    levels_all     all 6 levels; six levels need six layers here, so they go into every layer
    inject_late    = levels_last6 (the same configuration)
    inject_all     3 levels over every layer (two layers each)
    inject_input   the last level prepended to the input only (the paper's worst row)
    lin / pt / default / ada   the variants (no extra adapters; ada: adapters instead of the prompt), 3 levels
    video_timesformer / video_vit_avg   shapes-video direction questions from the TimeSformer's [CLS]
                   or the per-frame ViT [CLS] averaged over the same 4 frames (one frame cannot answer);
                   their own table, with the group `direction` (the which-way and the is-it-moving-X
                   questions pooled; `number`, the count, needs no motion)
The levels/injection arms keep the main job's default variant + adapters (the tiny LM needs both).
Writes FINDINGS/epalm.json and FINDINGS/epalm.md (format: jobs/findings_common.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import findings_common as common
from findings_common import read_predictions

CONFIGS = Path(__file__).resolve().parent / "configs"
IMAGE, VIDEO = CONFIGS / "epalm_tabletop.yaml", CONFIGS / "epalm_shapes_video.yaml"
POOLED = ("overall", "expert", "control")
VIDEO_ARMS = ("video_timesformer", "video_vit_avg")
DIRECTION_TYPES = ("other", "yes/no")  # shapes-video's which-way and is-it-moving-X questions


def arms(out: Path) -> dict[str, dict[str, Any]]:
    lm = [f"model.lm={out / 'models' / 'lm'}", "eval_split=null"]

    def arm(config: Path, *overrides: str) -> dict[str, Any]:
        return {"config": config, "overrides": [*lm, *overrides]}

    variant = ("model.num_levels=3", "model.adapters=false")
    return {
        "levels_last6": arm(IMAGE, "model.num_levels=3"),
        "levels_last1": arm(IMAGE, "model.num_levels=1"),
        "levels_all": arm(IMAGE, "model.num_levels=6", "model.injection_start=0"),
        "inject_late": {"same_as": "levels_last6"},
        "inject_all": arm(IMAGE, "model.num_levels=3", "model.injection_start=0"),
        "inject_input": arm(IMAGE, "model.num_levels=1", "model.injection_start=0", "model.injection_end=1"),
        "lin": arm(IMAGE, "model.variant=lin", *variant),
        "pt": arm(IMAGE, "model.variant=pt", *variant),
        "default": arm(IMAGE, "model.variant=default", *variant),
        "ada": arm(IMAGE, "model.variant=ada", *variant),
        "video_timesformer": arm(VIDEO, "model.feature=timesformer-cls"),
        "video_vit_avg": arm(VIDEO, "model.feature=vit-avg-cls"),
    }


ARMS = list(arms(Path(".")))
# `--quick`: one arm of each kind (extraction, injection, the variants, both video features, the alias)
QUICK_ARMS = ["levels_last6", "levels_last1", "levels_all", "inject_late", "inject_input", "lin", "pt", "default",
              "ada", *VIDEO_ARMS]


def rows_for(arm: str, seed: int, run_dir: Path, made: dict[str, Any], split: str) -> list[dict[str, Any]]:
    from cache_schema import SplitReader
    from trainer.config import load_config

    config = load_config(run_dir / "checkpoint" / "config.yaml", [])
    info = SplitReader(config.cache, config.source, split).header.get("source_info") or {}
    predictions = read_predictions(run_dir / "eval" / f"predictions-{split}.jsonl")
    rows = common.group_rows(predictions, arm, seed, info.get("expert_question_types") or (),
                             info.get("control_question_types") or ())
    if arm in VIDEO_ARMS:
        direction = [r for r in predictions if r.get("answer_type") in DIRECTION_TYPES]
        rows += [{**row, "group": "direction"} for row in common.group_rows(direction, arm, seed)
                 if row["group"] == "overall"]
    return rows


def render(rows: list[dict[str, Any]], runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    aliases = "; ".join(f"`{a}` is `{b}`'s configuration and runs" for a, b in meta["aliases"].items())
    parts = ["# eP-ALM: extraction, injection, variants and video", "",
             f"Written by `jobs/findings.sh --paper epalm`, `{meta['split']}` split. VQA accuracy (official, percent); "
             "cells are mean ± std over seeds (sample std, n − 1). The world's ViT has 6 blocks and its OPT 6 layers, "
             "so `last6` is the last half of the ViT's levels (3) and late injection the LM's last 3 layers "
             "(jobs/findings_epalm.py). " + (aliases + "." if aliases else ""),
             *([f"Overrides for every arm: {' '.join(meta['overrides'])}."] if meta["overrides"] else []), ""]
    image = [r for r in rows if r["arm"] not in VIDEO_ARMS]
    video = [r for r in rows if r["arm"] in VIDEO_ARMS]
    if image:
        parts += ["Extraction, injection and variants (`tabletop`):", "",
                  common.markdown_table(image, "vqa_accuracy", ARMS, POOLED), ""]
    if any(r["arm"] == "levels_last6" for r in image):
        parts += ["Difference from `levels_last6` (the paper's choice), paired by seed: mean (min..max).", "",
                  common.difference_table(image, "levels_last6", ARMS, POOLED), ""]
    if video:
        parts += ["Video (Table 14's analogue, `shapes-video`; `direction`: the questions one frame cannot answer):", "",
                  common.markdown_table(video, "vqa_accuracy", VIDEO_ARMS, ("overall", "direction")), ""]
    if len({r["arm"] for r in video}) == 2:
        parts += ["Difference from `video_timesformer`, paired by seed: mean (min..max).", "",
                  common.difference_table(video, "video_timesformer", VIDEO_ARMS, ("overall", "direction")), ""]
    budget = {run["arm"]: run.get("trainable_parameters") for run in runs}
    parts += ["Trainable parameters: " + ", ".join(f"{a} {n:,}" for a, n in budget.items() if n) + ".", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    return common.run_paper("epalm", argv, __doc__, arms, rows_for, render)


if __name__ == "__main__":
    sys.exit(main())
