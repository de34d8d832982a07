"""The main job, end to end, as the README's first command runs it (minutes: CI runs it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def clean_clone(dest: Path) -> Path:
    """This checkout as a fresh clone of it would be: tracked and not-ignored files only (no .venv,
    no egg-info, no caches), so the demo cannot lean on anything a developer or the test run built."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / os.fsdecode(name))
    return dest


@pytest.mark.slow
@pytest.mark.timeout(5400)  # 35 min on a 2-core machine beside the rest of the suite; the default 900 s is too tight
def test_main_job_epalm_prismer_mope_and_video(tmp_path):
    """The whole story from an empty directory: validated cache, summary.json, eP-ALM reading the
    image (held-out scenes) at least 20 points better than the same LM and prompt without it,
    Prismer, with and without its experts' labels, at least 15 points better than that blind LM,
    MoPE at least 30 points above both single-modality prompt baselines on the fusion task,
    eP-ALM reading the TimeSformer's [CLS] tokens at least 20 points above the blind LM on video QA
    and at least 8 above the same eP-ALM reading the per-frame ViT average of the same frames (paper
    Table 14's direction, issue #18's reduced form: one seed, the main job's budget; measured +14.2
    here, all of it on the which-way questions, and +15.6 ± 0.9 over 3 seeds in findings/epalm.md).
    Experts vs no experts is printed and reported, not asserted: on this world the gap is a point
    or two either way (see the note on issue #5), too small to hold across machines."""
    clone = clean_clone(tmp_path / "clone")
    out = tmp_path / "demo-out"
    # the newcomer's environment: not the one these tests run in (demo.sh builds clone/.venv itself)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    try:
        result = subprocess.run(["bash", str(clone / "jobs" / "demo.sh"), "--out", str(out)], capture_output=True,
                                text=True, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "== 0/5 install expertcache" in result.stdout  # it really built its own environment
    finally:
        shutil.rmtree(clone / ".venv", ignore_errors=True)  # gigabytes of wheels; the pip cache keeps them
    summary = json.loads((out / "summary.json").read_text())
    print(summary)
    assert set(summary) == {"epalm_vqa_accuracy", "blind_vqa_accuracy", "prismer_vqa_accuracy",
                            "prismer_no_experts_vqa_accuracy", "mope_accuracy", "prompt_image_only_accuracy",
                            "prompt_text_only_accuracy", "epalm_video_accuracy", "blind_video_accuracy",
                            "epalm_video_vit_avg_accuracy"}
    assert summary["epalm_vqa_accuracy"] - summary["blind_vqa_accuracy"] >= 20, summary
    for run in ("prismer", "prismer_no_experts"):
        assert summary[f"{run}_vqa_accuracy"] - summary["blind_vqa_accuracy"] >= 15, summary
    # the fusion task's label is (object count, the sentence's material): one modality alone tops out near 33%
    for baseline in ("prompt_image_only", "prompt_text_only"):
        assert summary["mope_accuracy"] - summary[f"{baseline}_accuracy"] >= 30, summary
    assert summary["epalm_video_accuracy"] - summary["blind_video_accuracy"] >= 20, summary
    assert summary["epalm_video_accuracy"] - summary["epalm_video_vit_avg_accuracy"] >= 8, summary
    assert (out / "runs" / "mope" / "importance.png").stat().st_size > 10_000
    validate = subprocess.run(["precompute", "validate", "--cache", str(out / "cache")], capture_output=True, text=True)
    # shapes: vit-cls + Prismer's 7 label features + text-cls + text-tokens, 20 shards each (train 16, val 2,
    # test 2); shapes-video: timesformer-cls and vit-avg-cls, 10 shards each (train 8, val 1, test 1)
    assert validate.returncode == 0 and "220 committed shards checked, 0 problems" in validate.stdout
    assert (out / "preview-shapes-test-000011.png").stat().st_size > 10_000
    assert "eP-ALM" in result.stdout and "blind baseline" in result.stdout and "Prismer with experts" in result.stdout
    assert "MoPE" in result.stdout and "Video QA accuracy" in result.stdout


def test_demo_rejects_unknown_arguments():
    result = subprocess.run(["bash", str(ROOT / "jobs" / "demo.sh"), "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "--bogus" in result.stderr


def test_demo_help_states_the_five_steps_and_its_own_environment():
    result = subprocess.run(["bash", str(ROOT / "jobs" / "demo.sh"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
    for step in ("1. pretrain", "2. `precompute run`", "3. validate", "4. `trainer fit`", "5. `trainer eval`"):
        assert step in result.stdout, step
    assert ".venv beside this checkout" in result.stdout and "jobs/install.sh" in result.stdout


def test_readme_opens_with_the_main_job_and_the_test_command_that_ci_runs():
    """The README's first two commands are the ones a newcomer runs: the main job, then the tests
    exactly as .ci/run runs them (a CI that ran something else could pass while they fail)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    demo, tests = [line.split("#")[0].strip() for line in block.splitlines()[:2]]
    assert demo == "bash jobs/demo.sh"
    assert tests.startswith("bash jobs/install.sh") and tests.endswith("python3 -m pytest")
    assert tests == (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
