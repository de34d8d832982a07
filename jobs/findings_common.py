"""What every paper's findings share: the rows format, the tables, and one seeded trainer run.

`findings/<paper>.json` is `{"rows": [{"arm", "seed", "group", "metric", "value"}, ...], "runs":
[...]}`, one row per measured number (accuracies in percent); `findings/<paper>.md` shows each
metric as a table, rows = arms, columns = groups, cells `mean ± std` over seeds. Every arm is an
ordinary `trainer fit` + `trainer eval` into OUT/findings-runs/<paper>/<arm>/seed<k>/; a run whose
eval metrics exist is skipped (the job resumes where it stopped), and one made with another config,
overrides or split is refused. jobs/findings_prismer.py, findings_epalm.py and findings_mope.py
import this; `python3 jobs/findings_common.py arms PAPER` prints a paper's arms (jobs/findings.sh
routes `--arms` with it), `quick-arms PAPER` the ones `--quick` runs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PAPERS = ("prismer", "epalm", "mope")


class BadInput(Exception):
    """Bad arguments or a missing main-job output: one line, exit 2."""


# ---------------------------------------------------------------------------------------------- rows


def group_rows(predictions: list[dict[str, Any]], arm: str, seed: int, expert_types: Iterable[str] = (),
               control_types: Iterable[str] = ()) -> list[dict[str, Any]]:
    """vqa_accuracy rows of one run from its prediction records (key, qid, answers, answer_type,
    prediction): one per question type, and the pooled `expert`, `control` and `overall` groups,
    each the mean official VQA accuracy over ITS QUESTIONS (so a type with more questions weighs
    more; with balanced types this equals the mean of the type means). A pooled group with no
    question is left out."""
    from trainer.eval import vqa_score

    def score(records: list[dict[str, Any]]) -> float:
        ids = [f"{r['key']}#{r['qid']}" for r in records]
        return vqa_score({i: r["prediction"] for i, r in zip(ids, records)},
                         {i: r["answers"] for i, r in zip(ids, records)})["vqa_accuracy"]

    groups: dict[str, list[dict[str, Any]]] = {}
    for record in predictions:
        groups.setdefault(record.get("answer_type") or "untyped", []).append(record)
    pooled = {"expert": set(expert_types), "control": set(control_types)}
    rows = [{"arm": arm, "seed": seed, "group": kind, "metric": "vqa_accuracy", "value": score(records)}
            for kind, records in sorted(groups.items())]
    for name, kinds in pooled.items():
        records = [r for r in predictions if r.get("answer_type") in kinds]
        if records:
            rows.append({"arm": arm, "seed": seed, "group": name, "metric": "vqa_accuracy", "value": score(records)})
    if predictions:
        rows.append({"arm": arm, "seed": seed, "group": "overall", "metric": "vqa_accuracy", "value": score(predictions)})
    return rows


def summarize(rows: list[dict[str, Any]], metric: str) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(arm, group) -> (mean, std, n) over seeds of `metric`; std is the sample std (n - 1), 0 for one seed."""
    values: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if row["metric"] == metric:
            values.setdefault((row["arm"], row["group"]), []).append(float(row["value"]))
    return {key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for key, v in values.items()}


def ordered(names: Iterable[str], first: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    front = [name for name in first if name in names]
    return front + sorted(name for name in names if name not in front)


def markdown_table(rows: list[dict[str, Any]], metric: str, arm_order: Iterable[str] = (),
                   group_order: Iterable[str] = ("overall",)) -> str:
    """Rows = arms, columns = groups, cells `mean ± std` over seeds (one decimal)."""
    summary = summarize(rows, metric)
    arms = ordered((arm for arm, _ in summary), arm_order)
    groups = ordered((group for _, group in summary), group_order)
    lines = ["| arm | seeds | " + " | ".join(groups) + " |", "|---|---:|" + "---:|" * len(groups)]
    for arm in arms:
        seeds = max(summary[(arm, g)][2] for g in groups if (arm, g) in summary)
        cells = []
        for group in groups:
            if (arm, group) not in summary:
                cells.append("–")
                continue
            mean, std, n = summary[(arm, group)]
            cells.append(f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}")
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference_table(rows: list[dict[str, Any]], baseline: str, arm_order: Iterable[str] = (),
                     group_order: Iterable[str] = ("overall",), metric: str = "vqa_accuracy") -> str:
    """Each arm minus `baseline`, paired by seed: mean (min..max over seeds) of the differences."""
    values = {(r["arm"], r["seed"], r["group"]): float(r["value"]) for r in rows if r["metric"] == metric}
    arms = ordered({arm for arm, _, _ in values} - {baseline}, arm_order)
    groups = ordered({group for _, _, group in values}, group_order)
    lines = ["| arm − " + baseline + " | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for arm in arms:
        cells = []
        for group in groups:
            diffs = [value - values[(baseline, seed, g)] for (a, seed, g), value in values.items()
                     if a == arm and g == group and (baseline, seed, g) in values]
            cells.append(f"{statistics.fmean(diffs):+.1f} ({min(diffs):+.1f}..{max(diffs):+.1f})" if diffs else "–")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- runs


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(seed) for seed in text.split(",") if seed.strip()]
    except ValueError:
        raise BadInput(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise BadInput(f"--seeds: expected distinct non-negative integers, got {text!r}")
    return seeds


def parse_arms(text: str, known: Iterable[str]) -> list[str]:
    arms = [arm.strip() for arm in text.split(",") if arm.strip()]
    known = list(known)
    for arm in arms:
        if arm not in known:
            raise BadInput(f"unknown arm {arm!r}; known: {', '.join(known)}")
    if len(set(arms)) != len(arms):
        raise BadInput(f"--arms: an arm is named twice in {text!r}")
    return arms


def fingerprint(config: Path, overrides: list[str]) -> str:
    return hashlib.sha256((config.read_text() + "\n".join(overrides)).encode()).hexdigest()[:16]


def one_torch_thread() -> None:
    """Train and evaluate every arm on one torch thread. The worlds' models are tiny, so a second
    thread buys little on idle cores, and on a 2-core machine shared with any other process two
    spinning OpenMP threads crawl: an eP-ALM fit at batch 32 ran 230 examples/s on one thread and
    8-18 on two beside another job, with the same losses (see the README's findings section)."""
    import torch

    torch.set_num_threads(1)


def run_trainer(arguments: list[str], what: str) -> None:
    """One `trainer` command (its own CLI entry point, in this process: torch and the models' code
    load once for the whole job); a failure is exit 1 naming the run (exit 2 if the trainer called
    the input bad: its own line is already on stderr)."""
    from trainer.cli import main as trainer_main

    print("+ trainer " + " ".join(arguments), flush=True)
    code = trainer_main(arguments)
    sys.stdout.flush()
    if code == 2:
        raise BadInput(f"{what}: the trainer refused its input (see above)")
    if code != 0:
        raise RuntimeError(f"{what} failed with exit status {code}")


def train_arm(out: Path, paper: str, arm: str, seed: int, config: Path, overrides: list[str], split: str,
              stamp_fingerprint: str) -> dict[str, Any]:
    """Fit + eval one (arm, seed) into OUT/findings-runs/<paper>/<arm>/seed<k>/ unless its eval
    metrics exist; its run record (trainable parameters, steps, seconds; fit_seconds: the fit alone)."""
    run = out / "findings-runs" / paper / arm / f"seed{seed}"
    evaluation = run / "eval"
    stamp = run / "findings-run.json"
    if (evaluation / "metrics.json").exists():
        made = json.loads(stamp.read_text()) if stamp.exists() else {}
        if made.get("fingerprint") != stamp_fingerprint or made.get("split") != split:
            raise BadInput(f"{run} was made with another config, overrides or split; remove it to retrain")
        print(f"= {arm} seed {seed}: done ({evaluation / 'metrics.json'})", flush=True)
        return made
    run.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run_trainer(["fit", "--cache", str(out / "cache"), "--config", str(config.resolve()), "--out", str(run),
                 "--no-progress", *overrides, f"seed={seed}"], f"fit {arm} seed {seed}")
    fitted = time.perf_counter()
    run_trainer(["eval", "--cache", str(out / "cache"), "--checkpoint", str(run / "checkpoint"), "--split", split,
                 "--out", str(evaluation)], f"eval {arm} seed {seed}")
    info = json.loads((run / "checkpoint" / "checkpoint.json").read_text())
    made = {"arm": arm, "seed": seed, "trainable_parameters": info.get("trainable_parameters"), "steps": info.get("step"),
            "seconds": round(time.perf_counter() - start, 1), "fit_seconds": round(fitted - start, 2),
            "fingerprint": stamp_fingerprint, "split": split}
    stamp.write_text(json.dumps(made, indent=1) + "\n")
    return made


def train_all(jobs: dict[tuple[str, int], tuple], workers: int) -> dict[tuple[str, int], dict[str, Any]]:
    """`train_arm(*arguments)` of every job, by its key. Each run trains on one torch thread
    (`one_torch_thread`); `workers` > 1 runs that many side by side in spawned processes, so a
    2-core machine trains two arms at once. A failed run stops the job (its error is raised)."""
    if workers <= 1 or len(jobs) <= 1:
        one_torch_thread()
        return {key: train_arm(*arguments) for key, arguments in jobs.items()}
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn"),
                             initializer=one_torch_thread) as pool:
        futures = {key: pool.submit(train_arm, *arguments) for key, arguments in jobs.items()}
        try:
            return {key: future.result() for key, future in futures.items()}
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the runs not yet started
            raise


def read_predictions(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def write_findings(findings: Path, paper: str, rows: list[dict[str, Any]], runs: list[dict[str, Any]],
                   markdown: str) -> list[Path]:
    """FINDINGS/<paper>.json (the shared rows format, plus the runs) and FINDINGS/<paper>.md: the one
    place every paper's job writes its outputs, so the format other tools read cannot drift."""
    paths = [findings / f"{paper}.json", findings / f"{paper}.md"]
    write_atomic(paths[0], json.dumps({"rows": rows, "runs": runs}, indent=1) + "\n")
    write_atomic(paths[1], markdown + "\n")
    return paths


def run_paper(paper: str, argv: list[str] | None, doc: str, arms_for: Any, rows_for: Any, render: Any,
              figures: Any = None) -> int:
    """The job of one paper whose arms are `arms_for(OUT)`: name -> {"config": Path, "overrides":
    [...]} or {"same_as": another arm} (the same configuration: its rows are copied under this name,
    said in the table). `rows_for(arm, seed, run_dir, made, split)` reads one finished run's rows; `render(rows,
    runs, meta)` the markdown; `figures(OUT, FINDINGS, rows)`, if given, draws the paper's plots into
    FINDINGS and returns their paths. Writes FINDINGS/<paper>.json and .md; exit 2 on bad input, 1 if a
    run fails."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog=f"findings_{paper}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="./findings-out", help="what jobs/findings.sh builds: models/ and cache/")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    names = list(arms_for(Path(".")))
    parser.add_argument("--arms", default=",".join(names), help=f"comma-separated arms (default all: {','.join(names)})")
    parser.add_argument("--split", default="test", help="the held-out split every arm is scored on (default test)")
    parser.add_argument("--findings", default="findings", help=f"where {paper}.json / {paper}.md go (default ./findings)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="runs trained side by side, one process and one torch thread each (default: the usable "
                             f"CPUs, {len(os.sched_getaffinity(0))} here); the numbers are the same for any number")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a trainer config override for every arm (repeatable), e.g. --set max_steps=20")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        out = Path(args.out).expanduser().resolve()
        for needed in (out / "models", out / "cache"):
            if not needed.exists():
                raise BadInput(f"{needed} is missing: run jobs/findings.sh, which builds it (or give its --out)")
        seeds = parse_seeds(args.seeds)
        arms = arms_for(out)
        chosen = parse_arms(args.arms, arms)
        if not chosen:
            raise BadInput("--arms: no arm given")
        if args.workers < 1:
            raise BadInput(f"--workers must be >= 1, got {args.workers}")
        jobs = {}  # (arm that is run, seed) -> train_arm's arguments, each once
        for arm in chosen:
            source = arms[arm].get("same_as", arm)
            overrides = [*arms[source]["overrides"], *args.set]
            config = arms[source]["config"]
            for seed in seeds:
                jobs[(source, seed)] = (out, paper, source, seed, config, overrides, args.split,
                                        fingerprint(config, overrides))
        made_by = train_all(jobs, args.workers)
        rows: list[dict[str, Any]] = []
        runs: list[dict[str, Any]] = []
        for arm in chosen:
            source = arms[arm].get("same_as", arm)
            for seed in seeds:
                made = made_by[(source, seed)]
                run_dir = out / "findings-runs" / paper / source / f"seed{seed}"
                rows += [{**row, "arm": arm} for row in rows_for(source, seed, run_dir, made, args.split)]
                runs.append({"arm": arm, **{k: made.get(k) for k in ("seed", "trainable_parameters", "steps", "seconds",
                                                                     "fit_seconds")},
                             **({"same_as": source} if source != arm else {})})
        meta = {"split": args.split, "aliases": {a: arms[a]["same_as"] for a in chosen if "same_as" in arms[a]},
                "overrides": args.set}
        findings = Path(args.findings)
        write_findings(findings, paper, rows, runs, render(rows, runs, meta))
        drawn = figures(out, findings, rows) if figures is not None else []
    except BadInput as e:
        print(f"findings: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"findings: {e}", file=sys.stderr)
        return 1
    for path in [findings / f"{paper}.json", findings / f"{paper}.md", *drawn]:
        print(f"findings: wrote {path}")
    return 0


def paper_arms(paper: str, quick: bool = False) -> list[str]:
    """A paper's arms, from its findings module (jobs/findings_<paper>.py's ARMS); with `quick` the
    ones `--quick` runs (its QUICK_ARMS, one arm of each kind, where it names them; else all)."""
    if paper not in PAPERS:
        raise BadInput(f"unknown paper {paper!r}; known: {', '.join(PAPERS)}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    module = importlib.import_module(f"findings_{paper}")
    return list(getattr(module, "QUICK_ARMS", module.ARMS) if quick else module.ARMS)


if __name__ == "__main__":  # `arms|quick-arms PAPER`: the paper's arms, comma-separated (for jobs/findings.sh)
    if len(sys.argv) != 3 or sys.argv[1] not in ("arms", "quick-arms"):
        print("usage: findings_common.py arms|quick-arms PAPER", file=sys.stderr)
        sys.exit(2)
    try:
        print(",".join(paper_arms(sys.argv[2], quick=sys.argv[1] == "quick-arms")))
    except BadInput as e:
        print(f"findings: {e}", file=sys.stderr)
        sys.exit(2)
