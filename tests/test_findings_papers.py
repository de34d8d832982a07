"""jobs/findings_epalm.py and findings_mope.py: the quick arms, MoPE's step time and eP-ALM's video table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[1] / "jobs"
sys.path.insert(0, str(JOBS))
import findings_common as common  # noqa: E402


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


epalm, mope = load("findings_epalm"), load("findings_mope")


def test_step_time_reads_the_training_windows_not_the_fit_wall_time(tmp_path: Path) -> None:
    # 10 steps of 8 at 80 examples/s (1 s), an evaluation, 10 more at 160 (0.5 s): 75 ms a step
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in (
        {"step": 10, "epoch": 0, "loss": 1.0, "lr": 1e-3, "examples_per_s": 80.0},
        {"step": 10, "eval": {"accuracy": 50.0}},
        {"step": 20, "epoch": 0, "loss": 0.9, "lr": 1e-3, "examples_per_s": 160.0})) + "\n")
    assert mope.step_time_ms(log, 8) == pytest.approx(75.0)
    assert mope.step_time_ms(tmp_path / "missing.jsonl", 8) is None
    (tmp_path / "eval-only.jsonl").write_text(json.dumps({"step": 5, "eval": {"accuracy": 1.0}}) + "\n")
    assert mope.step_time_ms(tmp_path / "eval-only.jsonl", 8) is None


@pytest.mark.parametrize("paper", ["epalm", "mope"])
def test_quick_arms_are_known_arms_with_one_of_each_kind(paper: str) -> None:
    arms, quick = common.paper_arms(paper), common.paper_arms(paper, quick=True)
    assert set(quick) < set(arms) and len(set(quick)) == len(quick)
    module = epalm if paper == "epalm" else mope
    table = module.arms(Path(""))
    assert any("same_as" in table[arm] for arm in quick)  # an alias row, copied from its arm's runs
    kinds = (("levels_", "inject_", "lin", "pt", "default", "ada", "video_timesformer", "video_vit_avg") if paper == "epalm"
             else ("mope", "p_", "prompts_", "experts_", "length_", "mope_no_importance"))
    assert all(any(arm.startswith(kind) for arm in quick) for kind in kinds)
    assert common.paper_arms("prismer", quick=True) == common.paper_arms("prismer")  # Prismer names none: all


def test_epalm_video_arms_get_their_own_table_against_the_timesformer() -> None:
    def rows(arm: str, values: dict[str, float]) -> list[dict]:
        return [{"arm": arm, "seed": 0, "group": g, "metric": "vqa_accuracy", "value": v} for g, v in values.items()]

    table = epalm.render(rows("levels_last6", {"overall": 40.0, "depth": 30.0})
                         + rows("video_timesformer", {"overall": 60.0, "direction": 70.0, "number": 40.0})
                         + rows("video_vit_avg", {"overall": 45.0, "direction": 47.5, "number": 40.0}),
                         [], {"split": "test", "aliases": {}, "overrides": []})
    image, video = table.split("Video (")
    assert "| levels_last6 | 1 | 40.0 |" in image and "video_" not in image and "direction" not in image
    assert "| arm | seeds | overall | direction | number |" in video
    assert "| video_vit_avg | -15.0 (-15.0..-15.0) | -22.5 (-22.5..-22.5) | +0.0 (+0.0..+0.0) |" in video
