"""Where the trainer's messages and numbers go.

Messages: Python `logging`, under the `trainer` logger.

Every module logs to its own `logging.getLogger(__name__)` (`trainer.loop`, `trainer.cli`, ...),
so a library user routes or silences them like any other library's
(`logging.getLogger("trainer").setLevel(logging.WARNING)`); with no configuration, Python shows
only warnings and errors. The command line calls `cache_schema.console.show_messages("trainer", "stdout")`,
which prints every record at INFO and above as a bare line on stdout: the console reads as it always has.

Numbers (losses, learning rate, eval metrics) and figures: `RunLog`, OUT/log.jsonl and optionally
TensorBoard (`log_to`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # `trainer --help` imports this module: no torch or matplotlib at import time
    from matplotlib.figure import Figure

    from trainer.config import TrainConfig


class RunLog:
    """A run's numbers, written by rank 0: OUT/log.jsonl always (resume, the findings and the
    figures read it back), and with `log_to: [jsonl, tensorboard]` TensorBoard event files in
    OUT/tensorboard: the training scalars (`train/loss`, `train/lr`, `train/examples_per_s`), every
    numeric eval metric (`eval/<name>`), the resolved config as text and the method's figures.

    A resumed run purges TensorBoard events from its resume step on, so the steps a killed run
    logged past its last checkpoint do not show twice.
    """

    def __init__(self, out: Path, config: TrainConfig, start_step: int):
        self.out = out
        self.jsonl = (out / "log.jsonl").open("a")
        self.tensorboard = None
        if "tensorboard" in config.log_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=start_step or None)
            resolved = yaml.safe_dump(config.to_dict(), sort_keys=False)
            self.tensorboard.add_text("config", "".join(f"    {line}\n" for line in resolved.splitlines()), start_step)

    def _write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def train(self, record: dict[str, Any]) -> None:
        """One training record: `step`, `epoch`, `loss`, `lr`, `examples_per_s`."""
        self._write(record)
        if self.tensorboard is not None:
            for key in ("loss", "lr", "examples_per_s"):
                self.tensorboard.add_scalar(f"train/{key}", record[key], record["step"])

    def eval(self, step: int, metrics: dict[str, Any]) -> list[dict[str, Any]]:
        """Record an evaluation; every eval record of the run so far, oldest first (what figures are drawn from)."""
        self._write({"step": step, "eval": metrics})
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"eval/{key}", value, step)
            self.tensorboard.flush()
        with (self.out / "log.jsonl").open() as f:
            return [record for record in map(json.loads, f) if "eval" in record]

    def figures(self, figures: dict[str, Figure], step: int) -> None:
        """Each figure as OUT/<name>.png and, with TensorBoard, as an image at `step`; then closed."""
        import matplotlib.pyplot as plt

        for name, figure in figures.items():
            figure.savefig(self.out / f"{name}.png", dpi=110)
            if self.tensorboard is not None:
                self.tensorboard.add_figure(name, figure, step)
            plt.close(figure)

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
