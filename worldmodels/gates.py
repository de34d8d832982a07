"""Quality gates: each world model states the held-out score it must reach (its `BAR`, next to its
config), and a default `pretrain-shapes` run fails when one misses it.

Why: the stand-ins' training is short and some of it fragile (a from-scratch Mask2Former at a high
rate, RT-DETR at a minute of CPU); a model that did not learn writes labels that mean nothing into
the cache, and every comparison built on them would quietly measure noise. Fast runs (tests) are
near chance by design, so their gates are recorded as not applied rather than failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldmodels.loop import EVAL_RESULTS


@dataclass(frozen=True)
class Bar:
    """A held-out metric a model must reach: `metric` is its key in the model's eval_results.json,
    `label` how a person names it, `higher_is_better` which side of `bar` passes (equal passes),
    `kind` what the model is in a failure line (a trained "stand-in", or a real "expert")."""

    metric: str
    bar: float
    label: str
    higher_is_better: bool = True
    kind: str = "stand-in"

    def passes(self, value: float) -> bool:
        """NaN (nothing measured) never passes."""
        return value >= self.bar if self.higher_is_better else value <= self.bar


class QualityGateError(RuntimeError):
    """Models that missed their bars; `lines` holds one line per failing gate, for stderr."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def check_gates(metrics: dict[str, dict[str, Any]], bars: dict[str, Bar], out_dir: Path,
                applied: bool = True) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Score every model of `bars` against its metrics; return the report's "gates" section
    (metric, value, bar, applied, passed per model) and one line per miss.

    With `applied=False` (fast runs) every gate is recorded with `passed: None` and nothing misses.
    A metric absent from a model's results counts as a miss: a gate that cannot be read must not pass.
    """
    section, failures = {}, []
    for name, bar in bars.items():
        raw = metrics.get(name, {}).get(bar.metric)
        value = float("nan") if raw is None else float(raw)
        passed = bar.passes(value) if applied else None
        section[name] = {"metric": bar.metric, "value": value, "bar": bar.bar,
                         "higher_is_better": bar.higher_is_better, "applied": applied, "passed": passed}
        if applied and not passed:
            side = "under" if bar.higher_is_better else "over"
            failures.append(f"{name} {bar.kind} {bar.label} {value:.2f} is {side} its bar {bar.bar:.2f} "
                            f"({Path(out_dir) / name / EVAL_RESULTS})")
    return section, failures
