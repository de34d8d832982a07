"""Hostile `--model` input and a Ray worker dying under a run.

A model that cannot load (a missing directory, a corrupt config.json, a truncated or garbled
safetensors file) is refused by the driver in one line, exit 2, before Ray starts or anything is
written. A worker that dies while it loads a good model is an infrastructure failure: exit 1,
naming the dead process, and the same command afterwards completes the run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from cache_schema import validate_cache
from conftest import save_tiny_bert
from devsupport.processes import kill_tree, title
from precompute.experts import ExpertError, get_expert
from precompute.experts.base import check_model_files

CLI = [sys.executable, "-m", "precompute.cli"]


def run_command(model: Path | str, cache: Path, *extra: str) -> list[str]:
    return CLI + ["run", "--expert", "vit-cls", "--shards", "shapes", "--model", str(model), "--cache", str(cache),
                  "--limit", "8", "--shard-size", "4", "--batch-size", "4", "--no-progress", *extra]


def ray_env(ray_tmp: Path) -> dict[str, str]:
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8  # inside the JSON header
    path.write_bytes(bytes(data))


def corrupt_config(path: Path) -> None:
    (path / "config.json").write_text('{"architecture": "vit_tiny_patch16_224", ')


DAMAGES = {
    "missing directory": (lambda model: shutil.rmtree(model), "no such model file or directory"),
    "corrupt config.json": (corrupt_config, "config.json: not readable JSON"),
    "truncated safetensors": (lambda model: truncate(model / "model.safetensors"), "truncated safetensors file"),
    "garbled safetensors header": (lambda model: garble_header(model / "model.safetensors"), "not a readable safetensors file"),
}


@pytest.fixture
def model_copy(tiny_vit_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_vit_dir, tmp_path / "model"))


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_model_that_cannot_load_is_refused_before_ray_starts(model_copy, tmp_path, damage):
    check_model_files("vit-cls", str(model_copy))  # the undamaged copy passes: the refusal below is the damage's
    apply, message = DAMAGES[damage]
    apply(model_copy)
    cache, ray_tmp = tmp_path / "cache", tmp_path / "ray"
    started = time.perf_counter()
    result = subprocess.run(run_command(model_copy, cache), capture_output=True, text=True, timeout=120, env=ray_env(ray_tmp))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(model_copy) in lines[0], result.stderr
    assert not cache.exists(), "the refused run wrote into --cache"
    assert not ray_tmp.exists(), "Ray started before the model was checked"
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize("expert", ["seg-coco", "objdet", "ocrdet"])
def test_a_text_encoder_that_is_not_there_is_refused_by_the_check(tmp_path, expert):
    """The class-name / word embedder these experts load beside their own model is checked the same way."""
    missing = tmp_path / "no-such-encoder"
    with pytest.raises(ExpertError, match=re.escape(f"{expert} text_encoder: {missing}: no such model file or directory")):
        get_expert(expert, text_encoder=str(missing)).check_model()


def test_a_text_encoder_that_is_not_there_exits_2_before_ray_starts(tmp_path):
    cache, ray_tmp = tmp_path / "cache", tmp_path / "ray"
    missing = tmp_path / "no-such-encoder"
    result = subprocess.run(CLI + ["run", "--expert", "ocrdet", "--shards", "shapes", "--cache", str(cache), "--limit", "4",
                                   "--expert-opt", f"text_encoder={missing}", "--no-progress"],
                            capture_output=True, text=True, timeout=120, env=ray_env(ray_tmp))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"precompute run: error: ocrdet text_encoder: {missing}: no such model file or directory"], result.stderr
    assert not cache.exists() and not ray_tmp.exists()


def test_transformers_model_files_are_checked_the_same_way(tmp_path):
    """A `save_pretrained` directory (tiny BERT): its JSON files and weights, as for timm's."""
    model = save_tiny_bert(tmp_path / "bert", ["a", "red", "square"])
    check_model_files("text-cls", str(model))
    (model / "tokenizer_config.json").write_text("{")
    with pytest.raises(ExpertError, match="tokenizer_config.json: not readable JSON"):
        check_model_files("text-cls", str(model))
    model = save_tiny_bert(tmp_path / "bert2", ["a", "red", "square"])
    truncate(model / "model.safetensors")
    with pytest.raises(ExpertError, match="truncated safetensors file"):
        check_model_files("text-cls", str(model))
    check_model_files("text-cls", "bert-base-uncased")  # a hub id is resolved where the model loads


INIT_TITLE = "ray::ShardWorker.__init__"  # Ray's process title for an actor running its constructor


def stop_while_loading(root: psutil.Process, process: subprocess.Popen, timeout: float = 120) -> psutil.Process:
    """SIGSTOP the run's ShardWorker while its constructor (which loads the model) runs, and make
    sure it was stopped there: its title still names `__init__` once it can no longer change."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in root.children(recursive=True):
            if INIT_TITLE in title(child):
                child.suspend()
                assert INIT_TITLE in title(child), "the actor finished loading before it could be stopped"
                return child
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError(f"no {INIT_TITLE} in {timeout} s")


@pytest.fixture
def short_tmp() -> Path:
    """A short private directory for Ray (its socket paths must fit in 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ec-hm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(400)
def test_a_worker_killed_while_loading_is_an_infrastructure_failure_and_a_rerun_completes(model_copy, tmp_path, short_tmp):
    """The run's one actor is stopped inside its constructor, while it loads a good model, and
    SIGKILLed there: exit 1 naming the dead worker, not exit 2 blaming the model; the same command
    then completes the run."""
    cache = tmp_path / "cache"
    command = run_command(model_copy, cache, "--workers", "1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ray_env(short_tmp))
    root = psutil.Process(process.pid)
    members: list[psutil.Process] = []
    try:
        actor = stop_while_loading(root, process)
        members = root.children(recursive=True)
        actor.send_signal(signal.SIGKILL)
        out, err = process.communicate(timeout=120)
    finally:
        kill_tree([root, *members])
    assert "Traceback" not in err, err
    assert process.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("precompute run: error: the Ray worker for expert 'vit-cls' died (pid "), err
    assert f"pid {actor.pid}" in last and "infrastructure failure; run again to resume" in last, last
    assert "could not load model" not in err

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ray_env(short_tmp))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert validate_cache(cache) == (2, [])
