"""Where the trainer's messages and numbers go.

Messages: Python `logging`, under the `trainer` logger.

Every module logs to its own `logging.getLogger(__name__)` (`trainer.loop`, `trainer.cli`, ...),
so a library user routes or silences them like any other library's
(`logging.getLogger("trainer").setLevel(logging.WARNING)`); with no configuration, Python shows
only warnings and errors. The command line calls `cache_schema.console.show_messages("trainer", "stdout")`,
which prints every record at INFO and above as a bare line on stdout: the console reads as it always has.

Numbers (losses, learning rate, eval metrics) and figures: `RunLog`, OUT/log.jsonl and optionally
TensorBoard, MLflow and W&B (`log_to`), each behind the same three calls (`Tracker`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

if TYPE_CHECKING:  # `trainer --help` imports this module: no torch or matplotlib at import time
    from matplotlib.figure import Figure

    from trainer.config import TrainConfig


class Tracker(Protocol):
    """An experiment tracker beside log.jsonl: what RunLog hands each one."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def figure(self, name: str, figure: Figure, step: int) -> None: ...

    def close(self) -> None: ...


def resolved_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


class TensorBoardTracker:
    """Event files in OUT/tensorboard. A resumed run purges the events from its resume step on, so
    the steps a killed run logged past its last checkpoint do not show twice."""

    def __init__(self, out: Path, config: TrainConfig, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step or None)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in resolved_yaml(config).splitlines()), start_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def figure(self, name: str, figure: Figure, step: int) -> None:
        self.writer.add_figure(name, figure, step, close=False)

    def close(self) -> None:
        self.writer.close()


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: nested keys dotted (`model.lm`), values as text."""
    params: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = str(value)
    return params


class MLflowTracker:
    """One MLflow run in the tracking store the environment names (`MLFLOW_TRACKING_URI`; experiment
    `MLFLOW_EXPERIMENT_NAME`, default `expertcache`): the config as params and as config.yaml, the
    scalars as metrics, figures as PNG artifacts `<name>/step_<N>.png`. The run id is kept in
    OUT/mlflow_run_id, so a resumed fit goes on logging into the same run."""

    def __init__(self, out: Path, config: TrainConfig, start_step: int):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient()
        kept = out / "mlflow_run_id"
        if start_step and kept.exists():
            self.run_id = kept.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "expertcache")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
        kept.write_text(self.run_id)
        params = [Param(key, value) for key, value in flat_params(config.to_dict()).items()]
        self.client.log_batch(self.run_id, params=params)
        self.client.log_text(self.run_id, resolved_yaml(config), "config.yaml")

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step) for key, value in values.items()])

    def figure(self, name: str, figure: Figure, step: int) -> None:
        self.client.log_figure(self.run_id, figure, f"{name}/step_{step:06d}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """One W&B run as the environment sets it up (`WANDB_PROJECT`, default `expertcache`;
    `WANDB_MODE=offline` to write only under OUT/wandb): the config, the scalars, figures as images.
    The run id is kept in OUT/wandb_run_id, so a resumed fit goes on logging into the same run."""

    def __init__(self, out: Path, config: TrainConfig, start_step: int):
        import wandb

        self.wandb = wandb
        kept = out / "wandb_run_id"
        run_id = kept.read_text().strip() if start_step and kept.exists() else None
        self.run = wandb.init(dir=str(out), id=run_id, resume="allow" if run_id else None, name=out.name,
                              config=config.to_dict(), project=os.environ.get("WANDB_PROJECT", "expertcache"))
        kept.write_text(self.run.id)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def figure(self, name: str, figure: Figure, step: int) -> None:
        self.run.log({name: self.wandb.Image(figure)}, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type] = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


class RunLog:
    """A run's numbers, written by rank 0: OUT/log.jsonl always (resume, the findings and the
    figures read it back), and to each tracker `log_to` names beside jsonl (tensorboard, mlflow,
    wandb): the training scalars (`train/loss`, `train/lr`, `train/examples_per_s`), every numeric
    eval metric (`eval/<name>`), the resolved config and the method's figures.
    """

    def __init__(self, out: Path, config: TrainConfig, start_step: int):
        self.out = out
        self.jsonl = (out / "log.jsonl").open("a")
        self.trackers: list[Tracker] = [TRACKERS[target](out, config, start_step) for target in config.log_to if target != "jsonl"]

    def _write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def train(self, record: dict[str, Any]) -> None:
        """One training record: `step`, `epoch`, `loss`, `lr`, `examples_per_s`."""
        self._write(record)
        for tracker in self.trackers:
            tracker.scalars({f"train/{key}": record[key] for key in ("loss", "lr", "examples_per_s")}, record["step"])

    def eval(self, step: int, metrics: dict[str, Any]) -> list[dict[str, Any]]:
        """Record an evaluation; every eval record of the run so far, oldest first (what figures are drawn from)."""
        self._write({"step": step, "eval": metrics})
        numbers = {f"eval/{key}": value for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        for tracker in self.trackers:
            tracker.scalars(numbers, step)
        with (self.out / "log.jsonl").open() as f:
            return [record for record in map(json.loads, f) if "eval" in record]

    def figures(self, figures: dict[str, Figure], step: int) -> None:
        """Each figure as OUT/<name>.png and in every tracker at `step`; then closed."""
        import matplotlib.pyplot as plt

        for name, figure in figures.items():
            figure.savefig(self.out / f"{name}.png", dpi=110)
            for tracker in self.trackers:
                tracker.figure(name, figure, step)
            plt.close(figure)

    def close(self) -> None:
        self.jsonl.close()
        for tracker in self.trackers:
            tracker.close()
