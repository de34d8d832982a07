"""jobs/findings_prismer.py: the table's aggregation, the linear probe, and (slow) the job on a tiny cache."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("findings_prismer", ROOT / "jobs" / "findings_prismer.py")
findings = importlib.util.module_from_spec(spec)
spec.loader.exec_module(findings)


def record(key: str, kind: str, right: bool) -> dict:
    return {"key": key, "qid": kind, "answer_type": kind, "answers": ["yes"] * 10, "prediction": "yes" if right else "no"}


def test_pooled_groups_are_means_over_questions_not_over_types():
    # depth: 3 questions, 3 right; sign: 1 question, wrong; color: 2, 1 right; side: none asked
    predictions = [record(f"s{i}", "depth", True) for i in range(3)] + [record("s9", "sign", False)]
    predictions += [record("s10", "color", True), record("s11", "color", False)]
    rows = findings.group_rows(predictions, "all", 0)
    values = {row["group"]: row["value"] for row in rows}
    assert all(row["metric"] == "vqa_accuracy" and row["arm"] == "all" and row["seed"] == 0 for row in rows)
    assert values["depth"] == pytest.approx(100) and values["sign"] == pytest.approx(0)
    assert values["expert"] == pytest.approx(75)  # 3 of 4 questions; the mean of type means would be 50
    assert values["control"] == pytest.approx(50) and values["overall"] == pytest.approx(400 / 6)
    assert "side" not in values
    assert findings.group_rows([record("a", "color", True)], "none", 1)[-2]["group"] == "control"
    assert "expert" not in {row["group"] for row in findings.group_rows([record("a", "color", True)], "none", 1)}


def test_table_cells_are_mean_and_sample_std_over_seeds():
    rows = [{"arm": arm, "seed": seed, "group": group, "metric": "vqa_accuracy", "value": value}
            for arm, group, values in (("none", "expert", (40, 50, 60)), ("all", "expert", (70, 72, 74)),
                                       ("none", "overall", (50, 50, 50)), ("all", "overall", (60, 61, 62)))
            for seed, value in enumerate(values)]
    rows.append({"arm": "probe:vit", "seed": 0, "group": "depth", "metric": "probe_accuracy", "value": 99})
    summary = findings.summarize(rows, "vqa_accuracy")
    assert summary[("none", "expert")] == (pytest.approx(50), pytest.approx(10), 3)
    assert summary[("all", "overall")] == (pytest.approx(61), pytest.approx(1), 3)
    assert ("probe:vit", "depth") not in summary
    table = findings.markdown_table(rows, "vqa_accuracy").splitlines()
    assert table[0] == "| arm | seeds | expert | overall |"
    assert table[2] == "| none | 3 | 50.0 ± 10.0 | 50.0 ± 0.0 |" and table[3] == "| all | 3 | 72.0 ± 2.0 | 61.0 ± 1.0 |"
    differences = findings.difference_table(rows).splitlines()
    assert differences[2] == "| all | +22.0 (+14.0..+30.0) | +11.0 (+10.0..+12.0) |"
    one_seed = findings.markdown_table([r for r in rows if r["seed"] == 0], "vqa_accuracy").splitlines()
    assert one_seed[2] == "| none | 1 | 40.0 | 50.0 |"


def test_probe_decodes_a_linear_quantity_and_not_an_unrelated_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 20)).astype(np.float32) * rng.uniform(0.1, 10, 20).astype(np.float32)
    directions = rng.standard_normal((20, 3))
    decodable = (x / x.std(0)) @ directions
    decodable = decodable.argmax(1)
    unrelated = rng.integers(0, 3, 600)
    train, held = slice(0, 400), slice(400, 600)
    good = findings.fit_probe(x[train], decodable[train], x[held], decodable[held], 3)
    bad = findings.fit_probe(x[train], unrelated[train], x[held], unrelated[held], 3)
    assert good["accuracy"] > 90 and good["accuracy"] > good["chance"] + 40
    assert bad["accuracy"] < bad["chance"] + 12 and 20 < bad["chance"] < 50
    assert bad["weight_decay"] in findings.WEIGHT_DECAYS


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert findings.main(["--out", str(tmp_path / "nothing"), "--findings", str(tmp_path / "f")]) == 2
    assert "run jobs/findings.sh, which builds it" in capsys.readouterr().err and not (tmp_path / "f").exists()
    with pytest.raises(findings.BadInput, match="unknown arm 'sonar'"):
        findings.arm_overrides("sonar")
    assert findings.arm_overrides("shuffled")[-1] == "model.shuffle_experts=true"


TINY_CONFIG = """\
method: prismer
source: shapes
train_split: train
eval_split: null
batch_size: 8
max_steps: 1
warmup_steps: 1
lr: 1.0e-3
num_workers: 0
save_every: 100
log_every: 1
max_eval_examples: 12
model:
  task: vqa
  inference: rank
  num_candidates: 4
  num_latents: 8
  resampler_heads: 4
  augment: null
"""


@pytest.mark.slow
def test_the_job_trains_arms_writes_the_tables_and_resumes(tmp_path, tiny_vit_dir, tiny_roberta_dir):
    """A tiny main-job output (the Prismer trainer tests' cache, with `quantities`): two arms, one
    seed, probes; a second run skips everything done."""
    from tests.test_prismer_trainer import write_prismer_cache

    def annotate(world, split, index, annotations):
        scene = world.scene(split, index)
        rng = np.random.default_rng(1000 + index + (0 if split == "train" else 500))
        return {**annotations, "quantities": {"count": len(scene.objects) - 1, "side": int(rng.integers(2))}}

    out = tmp_path / "demo-out"
    (out / "models").mkdir(parents=True)
    os.symlink(tiny_vit_dir, out / "models" / "vit")
    os.symlink(tiny_roberta_dir, out / "models" / "roberta")
    write_prismer_cache(out / "cache", "train", 24, annotate=annotate)
    write_prismer_cache(out / "cache", "test", 12, annotate=annotate)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    command = [sys.executable, str(ROOT / "jobs" / "findings_prismer.py"), "--out", str(out), "--config", str(config),
               "--arms", "none,shuffled", "--seeds", "0", "--findings", str(tmp_path / "findings")]
    # one thread: the tiny problems are all small ops, which thread contention on a shared machine slows 4x
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads((tmp_path / "findings" / "prismer.json").read_text())
    rows = table["rows"]
    assert {(r["arm"], r["metric"]) for r in rows} >= {("none", "vqa_accuracy"), ("shuffled", "vqa_accuracy"),
                                                        ("probe:vit", "probe_accuracy"), ("probe:depth", "probe_accuracy"),
                                                        ("probe:chance", "probe_chance")}
    assert {r["group"] for r in rows if r["metric"] == "vqa_accuracy"} >= {"overall", "number", "yes/no"}
    assert {r["group"] for r in rows if r["metric"] == "probe_accuracy"} == {"count", "side"}
    assert all(0 <= r["value"] <= 100 for r in rows)
    budget = {run["arm"]: run["trainable_parameters"] for run in table["runs"]}
    assert budget["shuffled"] > budget["none"] > 0
    markdown = (tmp_path / "findings" / "prismer.md").read_text()
    assert "| none | 1 |" in markdown and "## Linear probes" in markdown and "| chance |" in markdown
    metrics = out / "findings-runs" / "prismer" / "none" / "seed0" / "eval" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    start = time.perf_counter()
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "none seed 0: done" in again.stdout and "probes: done" in again.stdout
    assert metrics.stat().st_mtime_ns == stamp and time.perf_counter() - start < 30
    assert json.loads((tmp_path / "findings" / "prismer.json").read_text())["rows"] == rows
