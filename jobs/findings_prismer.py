"""Prismer's finding as a seeded measurement: arms x seeds trained from one cache, and linear probes.

    python3 jobs/findings_prismer.py [--out DIR] [--config FILE] [--source S] [--seeds 0,1,2]
        [--arms none,all,shuffled,depth,...] [--split test] [--findings DIR] [--set KEY=VALUE ...]
        [--no-probe | --probe-only]

DIR is what jobs/findings.sh builds first: DIR/models/{vit,roberta} (the tabletop world's
`pretrain-shapes`) and DIR/cache (its `precompute run`). Every arm is
an ordinary `trainer fit` + `trainer eval` (the frozen models never run during training: cached
labels are the point), one per seed, into DIR/findings-runs/prismer/<arm>/seed<k>/; a run whose
eval metrics exist is skipped, so the job resumes where it stopped.

Arms (the layout of Prismer's Table 5, plus a control):
    none       model.experts=[]          RGB only (the resampler's latents still train: same budget)
    all        the six experts
    shuffled   the six, each image reading ANOTHER image's labels (model.shuffle_experts=true)
    <expert>   that expert alone: depth, normal, edge, seg-coco, objdet, ocrdet

Writes FINDINGS/prismer.json, `{"rows": [{"arm", "seed", "group", "metric", "value"}, ...], "runs":
[...]}` (value in percent; `runs`: each run's trainable parameter count, steps and seconds) and
FINDINGS/prismer.md. Groups: each question type (`answer_type`) by name, `expert` (every
expert-dependent question together), `control` (the control questions together) and `overall`;
pooled groups are means over their questions, not means of type means.

Probes: for each quantity a question type needs (the samples' `quantities` annotation), a
multinomial logistic regression (standardised features, weight decay picked on a held-out fifth of
the train split) fitted on the train split and scored on the evaluation split, for the frozen
ViT's output tokens (all of them, flattened) and for each expert's label alone (pooled to an 8 x 8
grid; id maps through their 64-d vectors); next to the majority-class chance. The data come
through the Prismer trainer's own dataset and collate code, so a probe reads exactly what the model
reads. Exit 2 on bad input (one line), 1 if a training or evaluation run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # findings_common beside this file, however it is loaded
import findings_common as common
from findings_common import (  # noqa: F401 (summarize: read by its tests)
    BadInput,
    ordered,
    read_predictions,
    summarize,
    train_arm,
    write_atomic,
)

EXPERTS = ["depth", "normal", "edge", "seg-coco", "objdet", "ocrdet"]
BASE_ARMS = ["none", "all", "shuffled"]
ARMS = BASE_ARMS + EXPERTS
# the tabletop world's question types; a cache's source_info may name its own
EXPERT_TYPES = ("depth", "form", "count", "sign")
CONTROL_TYPES = ("color", "side")
POOLED = ("expert", "control", "overall")
PROBE_GRID = 8
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------- table


def arm_overrides(arm: str) -> list[str]:
    """The `trainer fit` overrides that make an arm."""
    if arm == "none":
        return ["model.experts=[]"]
    if arm == "all":
        return [f"model.experts=[{','.join(EXPERTS)}]"]
    if arm == "shuffled":
        return [f"model.experts=[{','.join(EXPERTS)}]", "model.shuffle_experts=true"]
    if arm in EXPERTS:
        return [f"model.experts=[{arm}]"]
    raise BadInput(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")


# the shared table code, with Prismer's arm and group order
group_rows = partial(common.group_rows, expert_types=EXPERT_TYPES, control_types=CONTROL_TYPES)
markdown_table = partial(common.markdown_table, arm_order=ARMS, group_order=(*POOLED, *EXPERT_TYPES, *CONTROL_TYPES))
difference_table = partial(common.difference_table, baseline="none", arm_order=ARMS,
                           group_order=(*POOLED, *EXPERT_TYPES, *CONTROL_TYPES))


def probe_table(rows: list[dict[str, Any]], group_order: Iterable[str] = (*EXPERT_TYPES, *CONTROL_TYPES)) -> str:
    """Rows = probe inputs (then chance), columns = quantities, cells held-out accuracy in percent."""
    values = {(r["arm"], r["group"]): float(r["value"]) for r in rows if r["metric"] in ("probe_accuracy", "probe_chance")}
    arms = ordered({arm for arm, _ in values} - {"probe:chance"}, ["probe:vit", *(f"probe:{e}" for e in EXPERTS)])
    groups = ordered({group for _, group in values}, group_order)
    lines = ["| probe input | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for arm in [*arms, "probe:chance"]:
        cells = [f"{values[(arm, g)]:.1f}" if (arm, g) in values else "–" for g in groups]
        lines.append(f"| {arm.removeprefix('probe:')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- probe


def fit_probe(train_x, train_y, eval_x, eval_y, num_classes: int, weight_decays: Iterable[float] = WEIGHT_DECAYS,
              seed: int = 0) -> dict[str, float]:
    """Multinomial logistic regression on standardised features; the weight decay is the one that
    scores best on a held-out fifth of the training set, refitted on all of it. Returns held-out
    `accuracy` and majority-class `chance` (the training majority's share of the eval set), in
    percent, and the `weight_decay` chosen."""
    import torch

    train_x, eval_x = torch.as_tensor(train_x, dtype=torch.float32), torch.as_tensor(eval_x, dtype=torch.float32)
    train_y, eval_y = torch.as_tensor(train_y, dtype=torch.long), torch.as_tensor(eval_y, dtype=torch.long)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, eval_x = (train_x - mean) / std, (eval_x - mean) / std

    def train(x, y, weight_decay: float):
        weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
        bias = torch.zeros(num_classes, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=100, history_size=10, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return lambda z: (z @ weight.detach() + bias.detach()).argmax(1)

    def accuracy(predict, x, y) -> float:
        return 100.0 * (predict(x) == y).float().mean().item()

    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    held = order[: max(1, len(order) // 5)]
    kept = order[len(held):]
    scores = {wd: accuracy(train(train_x[kept], train_y[kept], wd), train_x[held], train_y[held]) for wd in weight_decays}
    best = max(scores, key=lambda wd: (scores[wd], wd))  # ties: the stronger decay
    majority = int(torch.bincount(train_y, minlength=num_classes).argmax())
    return {"accuracy": accuracy(train(train_x, train_y, best), eval_x, eval_y),
            "chance": 100.0 * (eval_y == majority).float().mean().item(), "weight_decay": best}


def pooled_label(label, grid: int = PROBE_GRID):
    """[B, C, S, S] -> [B, C * grid * grid]: a label map averaged over a coarse grid."""
    import torch.nn.functional as F

    return F.adaptive_avg_pool2d(label.float(), grid).flatten(1)


def probe_features(config, split: str, experts: list[str]) -> tuple[dict[str, Any], list[dict[str, int]]]:
    """For every usable sample of `split`: input name ("vit" or an expert) -> [N, F] features, and
    the samples' `quantities`. Read through the Prismer method's own dataset, collate and model code."""
    import torch
    from torch.utils.data import DataLoader

    from cache_schema import open_cache
    from trainer.methods import get_method
    from trainer.methods.prismer import embed_ids
    from trainer.methods.prismer_task import CONTINUOUS_EXPERTS

    method = get_method(config)
    reader = open_cache(config.cache).split(split, config.source)
    method.check_cache(reader)
    model = method.build_model(reader).eval()
    vit = model.vision.vit
    examples = reader.torch_dataset(method.feature_fields(),
                                    lambda a: [{"prompts": ["probe"], "quantities": a.get("quantities"), "train": False}])
    loader = DataLoader(examples, batch_size=64, collate_fn=method.collate, num_workers=0)
    features: dict[str, list[Any]] = {"vit": [], **{name: [] for name in experts}}
    quantities: list[dict[str, int]] = []
    with torch.no_grad():
        for batch in loader:
            features["vit"].append(vit.forward_features(batch["rgb"]).flatten(1))
            for name in experts:
                label = batch["expert_labels"][name]
                features[name].append(pooled_label(label if name in CONTINUOUS_EXPERTS else embed_ids(*label)))
            quantities.extend(item["quantities"] or {} for item in batch["items"])
    return {name: torch.cat(parts).numpy() for name, parts in features.items()}, quantities


def probe_rows(config, train_split: str, eval_split: str, experts: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """probe_accuracy rows (arm probe:vit / probe:<expert>) and probe_chance rows (arm probe:chance),
    one per quantity; empty when the samples hold no `quantities`. Also what was probed, for the record."""
    import numpy as np

    train, train_q = probe_features(config, train_split, experts)
    held, held_q = probe_features(config, eval_split, experts)
    names = sorted(set().union(*(q.keys() for q in train_q)) & set().union(*(q.keys() for q in held_q))) if train_q and held_q else []
    names = [n for n in names if all(n in q for q in train_q) and all(n in q for q in held_q)]
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {"quantities": names, "train": len(train_q), "eval": len(held_q),
                              "features": {k: int(v.shape[1]) for k, v in train.items()}, "weight_decay": {}}
    for quantity in names:
        train_y = np.array([q[quantity] for q in train_q])
        eval_y = np.array([q[quantity] for q in held_q])
        num_classes = int(max(train_y.max(), eval_y.max())) + 1
        majority = int(np.bincount(train_y).argmax())
        rows.append({"arm": "probe:chance", "seed": 0, "group": quantity, "metric": "probe_chance",
                     "value": 100.0 * float((eval_y == majority).mean())})
        for source, x in train.items():
            result = fit_probe(x, train_y, held[source], eval_y, num_classes)
            rows.append({"arm": f"probe:{source}", "seed": 0, "group": quantity, "metric": "probe_accuracy",
                         "value": result["accuracy"]})
            record["weight_decay"][f"{source}/{quantity}"] = result["weight_decay"]
    return rows, record


# ---------------------------------------------------------------------------------------------- the job


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="findings_prismer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="./findings-out",
                        help="the directory jobs/findings.sh builds models/ and cache/ in (default ./findings-out)")
    parser.add_argument("--config", default=str(HERE / "configs" / "prismer_tabletop.yaml"),
                        help="the trainer config every arm starts from (default jobs/configs/prismer_tabletop.yaml, "
                             "the main job's; each run is scored once, by `trainer eval --split`, not during fit)")
    parser.add_argument("--source", help="the cached source to train on (default: the config's)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms (default all: {','.join(ARMS)})")
    parser.add_argument("--split", default="test", help="the held-out split every arm is scored on (default test)")
    parser.add_argument("--findings", default="findings", help="where prismer.json / prismer.md go (default ./findings)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a trainer config override for every arm (repeatable), e.g. --set epochs=2")
    probe = parser.add_mutually_exclusive_group()
    probe.add_argument("--no-probe", action="store_true", help="skip the linear probes")
    probe.add_argument("--probe-only", action="store_true", help="only the linear probes (the table is left as it is)")
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the job needs, checked before anything is written or trained."""
    from cache_schema import CacheError, list_splits
    from trainer.config import ConfigError, load_config

    out = Path(args.out).expanduser().resolve()
    for needed in (out / "models" / "vit", out / "models" / "roberta", out / "cache"):
        if not needed.exists():
            raise BadInput(f"{needed} is missing: run jobs/findings.sh, which builds it (or give its --out)")
    seeds = common.parse_seeds(args.seeds)
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    if not arms and not args.probe_only:
        raise BadInput("--arms: no arm given")
    for arm in arms:
        arm_overrides(arm)
    if len(set(arms)) != len(arms):
        raise BadInput(f"--arms: an arm is named twice in {args.arms!r}")
    if not Path(args.config).is_file():
        raise BadInput(f"--config: {args.config} is not a file")
    models = [f"model.vision={out / 'models' / 'vit'}", f"model.lm={out / 'models' / 'roberta'}"]
    overrides = [*models, "eval_split=null", *([f"source={args.source}"] if args.source else []), *args.set]
    try:
        config = load_config(args.config, overrides, cache=str(out / "cache"), method="prismer")
        splits = list_splits(out / "cache")
    except (ConfigError, CacheError) as e:
        raise BadInput(str(e)) from None
    if config.source is None:
        raise BadInput(f"{args.config} names no source; give --source")
    for split in (config.train_split, args.split):
        if (config.source, split) not in splits:
            raise BadInput(f"{out / 'cache'} has no {config.source}/{split} (it has {', '.join('/'.join(s) for s in splits)}); "
                           f"precompute it, or choose --source / --split")
    fingerprint = common.fingerprint(Path(args.config), overrides)
    return {"out": out, "seeds": seeds, "arms": arms, "overrides": overrides, "config": config,
            "fingerprint": fingerprint}


def render_markdown(rows: list[dict[str, Any]], runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    parts = [f"# Prismer: experts vs none, {meta['source']} world, `{meta['split']}` split",
             "", f"Written by `jobs/findings.sh` from `{meta['config']}`. VQA accuracy (official, percent); "
             "cells are mean ± std over seeds (sample std, n − 1). `expert` and `control` pool the questions "
             f"of their types ({', '.join(meta['expert_types'])} / {', '.join(meta['control_types'])}): a mean "
             "over questions, not a mean of type means.", ""]
    if any(r["metric"] == "vqa_accuracy" for r in rows):
        parts += [markdown_table(rows, "vqa_accuracy", group_order=(*POOLED, *meta["expert_types"], *meta["control_types"])), ""]
        if any(r["arm"] == "none" for r in rows):
            parts += ["Difference from `none`, paired by seed: mean (min..max over seeds).", "",
                      difference_table(rows, group_order=(*POOLED, *meta["expert_types"], *meta["control_types"])), ""]
    if runs:
        budget = {}
        for run in runs:
            budget.setdefault(run["arm"], set()).add(run.get("trainable_parameters"))
        parts += ["Trainable parameters per arm (the arms differ only by the expert stems; `none` keeps the "
                  "resampler's latents and read-outs): " + ", ".join(f"{arm} {'/'.join(f'{n:,}' for n in sorted(v) if n)}"
                                                                for arm, v in budget.items()) + ".", ""]
    probes = [r for r in rows if r["metric"] in ("probe_accuracy", "probe_chance")]
    if probes:
        parts += ["## Linear probes", "",
                  "Held-out accuracy (percent) of a multinomial logistic regression per quantity a question type "
                  "needs, trained on the train split: the frozen ViT's output tokens (all, flattened) and each "
                  f"expert's label alone (pooled to {PROBE_GRID} x {PROBE_GRID}; id maps through their 64-d vectors). "
                  "`chance`: the training majority class.", "", probe_table(
                      rows, group_order=(*meta["expert_types"], *meta["control_types"])), ""]
    elif meta.get("probe_note"):
        parts += [f"Linear probes: {meta['probe_note']}", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any hub client loads: the job reads local models only
    try:
        job = check_inputs(args)
        from cache_schema import SplitReader

        config = job["config"]
        info = SplitReader(config.cache, config.source, args.split).header.get("source_info") or {}
        expert_types = tuple(info.get("expert_question_types") or EXPERT_TYPES)
        control_types = tuple(info.get("control_question_types") or CONTROL_TYPES)
        findings = Path(args.findings)
        previous = json.loads((findings / "prismer.json").read_text()) if (findings / "prismer.json").exists() else {}
        rows: list[dict[str, Any]] = []
        runs: list[dict[str, Any]] = []
        if args.probe_only:
            rows = [r for r in previous.get("rows", []) if not r["arm"].startswith("probe:")]
            runs = previous.get("runs", [])
        else:
            for arm in job["arms"]:
                for seed in job["seeds"]:
                    made = train_arm(job["out"], "prismer", arm, seed, Path(args.config),
                                     [*job["overrides"], *arm_overrides(arm)], args.split, job["fingerprint"])
                    runs.append({k: made.get(k) for k in ("arm", "seed", "trainable_parameters", "steps", "seconds")})
                    evaluation = job["out"] / "findings-runs" / "prismer" / arm / f"seed{seed}" / "eval"
                    rows += common.group_rows(read_predictions(evaluation / f"predictions-{args.split}.jsonl"), arm, seed,
                                       expert_types, control_types)
        probe_note = ""
        if not args.no_probe:
            probe_cache = job["out"] / "findings-runs" / "prismer" / f"probes-{args.split}.json"
            stamp = {"fingerprint": job["fingerprint"], "split": args.split}
            cached = json.loads(probe_cache.read_text()) if probe_cache.exists() else {}
            if cached.get("stamp") == stamp:
                probes, record = cached["rows"], cached["record"]
                print(f"= probes: done ({probe_cache})", flush=True)
            else:
                print("+ linear probes", flush=True)
                config.model = {**config.model, "experts": list(EXPERTS), "shuffle_experts": False}
                probes, record = probe_rows(config, config.train_split, args.split, list(EXPERTS))
                write_atomic(probe_cache, json.dumps({"stamp": stamp, "rows": probes, "record": record}, indent=1) + "\n")
            if not probes:
                probe_note = f"skipped: the {config.source} samples hold no `quantities` annotation."
                print(f"findings: linear probes {probe_note}", file=sys.stderr)
            rows += probes
        meta = {"source": config.source, "split": args.split, "config": Path(args.config).name,
                "expert_types": expert_types, "control_types": control_types, "probe_note": probe_note}
        common.write_findings(findings, "prismer", rows, runs, render_markdown(rows, runs, meta))
    except BadInput as e:
        print(f"findings: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"findings: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a MethodError / CacheError from the probes' model or cache reading
        from cache_schema import CacheError
        from trainer.config import ConfigError
        from trainer.methods import MethodError

        if isinstance(e, (CacheError, ConfigError, MethodError)):
            print(f"findings: {e}", file=sys.stderr)
            return 2
        raise
    print(f"findings: wrote {findings / 'prismer.json'} and {findings / 'prismer.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
