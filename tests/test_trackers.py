"""`log_to`'s experiment trackers beside log.jsonl: what RunLog hands them, read back by the tracker's
own client; a tracker whose package is not installed is one line and exit 2, before any work.
(TensorBoard's event files are read back in tests/test_mope_trainer.py, from a whole `fit`.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from trainer.cli import main
from trainer.config import TrainConfig
from trainer.logs import RunLog


def train_record(step: int) -> dict:
    return {"step": step, "epoch": 0.5 * step, "loss": 2.0 / step, "lr": 1e-3 * step, "examples_per_s": 100.0 + step}


def a_figure() -> plt.Figure:
    figure, axes = plt.subplots(figsize=(2, 2))
    axes.bar(range(3), [0.2, 0.5, 0.3])
    return figure


def test_mlflow_holds_the_runs_numbers_config_and_figures_and_a_resume_continues_it(tmp_path, monkeypatch):
    from mlflow import MlflowClient  # mlflow-skinny: in the dev extras

    # a local file store: MLflow 3 keeps it only behind this switch (a server or sqlite is its default)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trackers-test")
    out = tmp_path / "run"
    out.mkdir()
    config = TrainConfig(out=str(out), log_to=["jsonl", "mlflow"], model={"lm": "some/lm", "num_levels": 2})

    log = RunLog(out, config, start_step=0)
    log.train(train_record(1))
    log.train(train_record(2))
    log.eval(2, {"accuracy": 50.0, "expert_importance": [0.5, 0.5], "converged": True})
    log.figures({"importance": a_figure()}, 2)
    log.close()
    resumed = RunLog(out, config, start_step=2)  # a killed fit, resumed from its step-2 checkpoint
    resumed.train(train_record(3))
    resumed.close()

    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("trackers-test").experiment_id])
    assert run.info.run_id == (out / "mlflow_run_id").read_text() and run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    assert run.data.params["log_to"] == "['jsonl', 'mlflow']" and run.data.params["model.num_levels"] == "2"
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "examples_per_s"):
        history = client.get_metric_history(run.info.run_id, f"train/{key}")
        assert [(m.step, m.value) for m in history] == [(r["step"], r[key]) for r in logged if "loss" in r]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/accuracy")] == [(2, 50.0)]
    assert set(run.data.metrics) == {"train/loss", "train/lr", "train/examples_per_s", "eval/accuracy"}  # numbers only
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert "method: epalm" in (artifacts / "config.yaml").read_text()
    assert (artifacts / "importance" / "step_000002.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "importance.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here: log_to: wandb can work")
def test_a_tracker_that_is_not_installed_is_one_line_exit_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["fit", "--cache", str(tmp_path / "no-cache"), "--out", str(out), "log_to=[jsonl,wandb]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == "trainer fit: error: log_to: wandb needs `pip install wandb`", err
    assert not out.exists()
