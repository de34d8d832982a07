"""How the main job's step 4 should share a small CPU: two `trainer fit`s side by side, each on one
thread, against the same two one after the other on every core (torch's default threads).

The main job (jobs/demo.sh) trains nine small models from its cache. They are too small for two
threads to share one step well, so jobs/demo.sh runs them two at a time with OMP_NUM_THREADS=1 and
num_workers=0. This measures that choice on one pair, eP-ALM and its blind baseline with the main
job's config, in one run: sequential on default threads first, then side by side on one thread
each, and prints both wall times, their ratio and whether each run's validation metrics agree.

    python bench/demo_trainings.py --demo-out demo-out            # after `bash jobs/demo.sh`
    python bench/demo_trainings.py --demo-out demo-out --epochs 4  # the main job's full schedule

Results also go to bench/out/demo_trainings.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "jobs" / "configs" / "epalm_shapes.yaml"
RUNS = {"epalm": [], "blind": ["model.blind=true"]}


def fit_command(demo_out: Path, out: Path, run: str, epochs: int, workers: int | None) -> list[str]:
    command = ["trainer", "fit", "--cache", str(demo_out / "cache"), "--config", str(CONFIG), "--out", str(out / run),
               "--no-progress", f"model.lm={demo_out / 'models' / 'lm'}", f"epochs={epochs}", *RUNS[run]]
    return command + ([f"num_workers={workers}"] if workers is not None else [])


def metrics_of(out: Path, run: str) -> dict:
    """The run's last validation metrics, from its log.jsonl."""
    rows = [json.loads(line) for line in (out / run / "log.jsonl").read_text().splitlines() if line.strip()]
    return next(row["eval"] for row in reversed(rows) if "eval" in row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-out", type=Path, required=True, help="the main job's output (cache/ and models/lm)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per fit (the main job: 4)")
    args = parser.parse_args()
    if not (args.demo_out / "cache").is_dir() or not (args.demo_out / "models" / "lm").is_dir():
        print(f"demo_trainings.py: {args.demo_out} has no cache/ and models/lm (run `bash jobs/demo.sh` first)",
              file=sys.stderr)
        return 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        sequential, side_by_side = Path(tmp) / "sequential", Path(tmp) / "side_by_side"
        began = time.perf_counter()
        for run in RUNS:  # the config's own DataLoader workers, torch's default threads
            subprocess.run(fit_command(args.demo_out, sequential, run, args.epochs, None), env=env, check=True,
                           capture_output=True)
        sequential_s = time.perf_counter() - began
        began = time.perf_counter()
        processes = [subprocess.Popen(fit_command(args.demo_out, side_by_side, run, args.epochs, 0),
                                      env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE) for run in RUNS]
        for process in processes:
            _, err = process.communicate()
            if process.returncode:
                raise SystemExit(f"demo_trainings.py: a side-by-side fit failed: {err.decode()[-2000:]}")
        side_by_side_s = time.perf_counter() - began
        accuracy = {run: metrics_of(side_by_side, run).get("vqa_accuracy") for run in RUNS}
        agree = {run: metrics_of(sequential, run).get("vqa_accuracy") == accuracy[run] for run in RUNS}
    result = {"epochs": args.epochs, "sequential_default_threads_s": round(sequential_s, 1),
              "side_by_side_one_thread_s": round(side_by_side_s, 1), "speedup": round(sequential_s / side_by_side_s, 2),
              "val_vqa_accuracy": accuracy, "same_val_accuracy": agree, "cpus": os.cpu_count()}
    print(f"eP-ALM + blind, {args.epochs} epoch(s) each, {os.cpu_count()} CPUs: one after the other on default threads "
          f"{sequential_s:.1f} s; side by side on one thread each {side_by_side_s:.1f} s; "
          f"{result['speedup']:.2f}x; same validation accuracy: {agree}")
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    (ROOT / "bench" / "out" / "demo_trainings.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
