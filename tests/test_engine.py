"""The precompute engine on a real local Ray: gaps, resume, refusals, failures, kills."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache_schema import SpecMismatchError, SplitReader, validate_cache
from conftest import save_tiny_vit, write_images
from devsupport.processes import descendants
from precompute.engine import RunConfig, run

CLI = [sys.executable, "-m", "precompute.cli"]


def image_folder(root: Path) -> Path:
    write_images(root / "a", 5)
    Image.new("L", (30, 20), 128).save(root / "a" / "gray.png")
    Image.new("RGBA", (30, 20), (10, 20, 30, 0)).save(root / "b.WEBP")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    return root


def test_bad_images_become_recorded_gaps_and_rerun_skips(tmp_path, tiny_vit_dir, ray_local):
    root = image_folder(tmp_path / "images")
    config = RunConfig(experts=["vit-cls"], source="images", data_root=str(root), split="all",
                       cache=str(tmp_path / "cache"), models={"vit-cls": str(tiny_vit_dir)}, shard_size=4, batch_size=3)
    [summary] = run(config, progress=False)
    assert (summary.shards_done, summary.samples, summary.invalid, summary.shards_failed) == (3, 9, 2, [])
    reader = SplitReader(tmp_path / "cache", "images", "all")
    feature = reader.feature("vit-cls")
    usable = dict(zip(reader.keys, feature.usable))
    assert not usable["broken"] and not usable["empty"] and usable["a/gray"] and usable["b"]
    assert not feature.get_by_key("broken")["cls"].any()
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "cache/images/all/_commits/vit-cls").glob("*.json"))]
    reasons = {k: v for r in records for k, v in r["invalid"].items()}
    assert set(reasons) == {"broken", "empty"} and all(reasons.values())
    cls = feature.get_by_key("a/img000")["cls"]
    assert cls.dtype == np.float16 and cls.shape == (6, 32) and np.isfinite(cls).all() and cls.any()
    assert validate_cache(tmp_path / "cache") == (3, [])

    [again] = run(config, progress=False)
    assert (again.shards_skipped, again.shards_done) == (3, 0)


def test_other_model_into_same_feature_is_refused(tmp_path, tiny_vit_dir, ray_local):
    root = image_folder(tmp_path / "images")
    config = RunConfig(experts=["vit-cls"], source="images", data_root=str(root), split="all",
                       cache=str(tmp_path / "cache"), models={"vit-cls": str(tiny_vit_dir)}, shard_size=8)
    run(config, progress=False)
    other = save_tiny_vit(tmp_path / "other-vit", embed_dim=16, seed=1)
    config.models = {"vit-cls": str(other)}
    with pytest.raises(SpecMismatchError, match="model_id"):
        run(config, progress=False)
    config.overwrite = True
    [summary] = run(config, progress=False)
    assert summary.shards_done == 2
    assert SplitReader(tmp_path / "cache", "images", "all").feature("vit-cls").spec.array("cls").shape == (6, 16)


def test_a_shard_that_keeps_failing_is_reported_and_the_rest_finish(tmp_path, tiny_vit_dir, ray_local, caplog):
    cache = tmp_path / "cache"
    # A directory where shard 1's commit record must go: a real storage fault, on every attempt.
    (cache / "shapes/train/_commits/vit-cls/00001.json").mkdir(parents=True)
    config = RunConfig(experts=["vit-cls"], source="shapes", cache=str(cache), models={"vit-cls": str(tiny_vit_dir)},
                       shard_size=5, limit=15, retries=1, source_options={"num": 15})
    with caplog.at_level(logging.INFO, logger="precompute"):
        [summary] = run(config, progress=False)
    assert summary.shards_failed == [1] and summary.shards_done == 2
    # a library caller hears of it through logging, under the engine's own logger (routable, silenceable)
    [record] = [r for r in caplog.records if "shard 1 failed after 2 attempts" in r.getMessage()]
    assert record.name == "precompute.engine" and record.levelno == logging.WARNING
    failure = json.loads((cache / "shapes/train/_failures/vit-cls/00001.json").read_text())
    assert failure["attempts"] == 2 and "IsADirectoryError" in failure["error"]
    status = subprocess.run(CLI + ["status", "--cache", str(cache), "--json"], capture_output=True, text=True, check=True)
    [row] = json.loads(status.stdout)
    assert (row["done"], row["pending"], row["failed"], row["nodes"]) == (2, 1, [1], 1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--expert", "no-such-expert", "--shards", "shapes"], "unknown expert 'no-such-expert'"),
        (["--expert", "vit-cls", "--shards", "nowhere"], "nowhere"),
        (["--expert", "vit-cls", "--shards", "coco"], "--data-root"),
        (["--expert", "vit-cls", "--shards", "coco", "--data-root", "/no/such/dir"], "/no/such/dir"),
        (["--expert", "vit-cls", "--shards", "shapes", "--source-opt", "colour=red"], "colour"),
        # every split of a list is checked before the first runs
        (["--expert", "rgb", "--shards", "shapes", "--split", "val,tset"], "has no split 'tset'"),
        (["--expert", "rgb", "--shards", "shapes", "--split", ","], "names no split"),
        (["--expert", "rgb", "--shards", "shapes", "--expert-opt", "resolution=abc"],
         "expert 'rgb' option 'resolution' takes an integer (default 224), got 'abc'"),
        (["--expert", "rgb", "--shards", "shapes", "--expert-opt", "levels=2"], "no expert in this run (rgb) takes option 'levels'"),
        (["--expert", "vit-cls", "--shards", "shapes", "--expert-opt", "views=-1"], "vit-cls: views must be at least 0, got -1"),
        (["--expert", "image-pooled", "--shards", "shapes", "--expert-opt", "views=2.5"],
         "expert 'image-pooled' option 'views' takes an integer (default 0), got '2.5'"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    cache = tmp_path / "cache"
    result = subprocess.run(CLI + ["run", "--cache", str(cache), *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not cache.exists()


def test_several_splits_run_under_one_ray_start(tmp_path, ray_local):
    """`--split val,test`: both splits planned and committed in one command (one Ray start), each
    exactly as a run of that split alone writes it."""
    from precompute.cli import main

    common = ["run", "--expert", "rgb", "--shards", "shapes", "--source-opt", "num=6", "--expert-opt", "resolution=16",
              "--shard-size", "4", "--no-progress"]
    assert main([*common, "--split", "val,test", "--cache", str(tmp_path / "both")]) == 0
    assert main([*common, "--split", "test", "--cache", str(tmp_path / "one")]) == 0
    for split in ("val", "test"):
        reader = SplitReader(tmp_path / "both", "shapes", split)
        assert reader.feature("rgb").committed_shards() == [0, 1]
    records = [json.loads((cache / "shapes" / "test" / "_commits" / "rgb" / "00001.json").read_text())
               for cache in (tmp_path / "both", tmp_path / "one")]
    assert records[0]["checksum"] == records[1]["checksum"]
    assert validate_cache(tmp_path / "both")[1] == []


def test_malformed_annotation_json_names_the_file(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "annotations" / "captions_train2017.json").write_text("{ not json")
    result = subprocess.run(CLI + ["run", "--expert", "vit-cls", "--shards", "coco", "--data-root", str(root),
                                   "--cache", str(tmp_path / "cache")], capture_output=True, text=True)
    assert result.returncode == 2 and "captions_train2017.json" in result.stderr
    assert not (tmp_path / "cache").exists()


def subcommands() -> dict:
    from precompute.cli import build_parser

    [choices] = [action.choices for action in build_parser()._actions if action.choices and "run" in action.choices]
    return choices


@pytest.mark.parametrize("command", ["run", "status", "validate", "verify", "preview", "experts", "sources"])
def test_help_tells_the_truth(command):
    """Each subcommand's --help shows every default the parser really uses, and no other."""
    import re

    parser = subcommands()[command]
    result = subprocess.run(CLI + [command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: precompute " + command in result.stdout
    assert " ".join(result.stdout.split()) == " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.dest == "help" or not action.option_strings:
            continue
        stated = re.findall(r"\(default: ([^)]*)\)", action.help or "")
        if action.default not in (None, False, []):  # (None: the code decides, and the help says how in words)
            assert stated == [str(action.default)], (action.option_strings, action.help)
        if "--cache" in action.option_strings:
            assert action.default == "./cache" and "(default: ./cache)" in action.help
    if command == "run":  # engine.worker_layout: one actor per GPU, else one per node
        assert "one per node" in parser._option_string_actions["--workers"].help


def test_every_subcommand_has_a_help_test():
    assert set(subcommands()) == {"run", "status", "validate", "verify", "preview", "experts", "sources"}


def test_listing_commands():
    from precompute.experts import EXPERTS, expert_class

    experts = subprocess.run(CLI + ["experts"], capture_output=True, text=True, check=True).stdout
    assert "vit-cls" in experts and "vit_base_patch16_224.augreg_in21k_ft_in1k" in experts
    lines = experts.splitlines()
    for name in EXPERTS:  # every option, one line each: its default, what it changes and its type
        cls = expert_class(name)
        assert set(cls.option_help) == set(cls.options), name
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{name} "))
        for offset, (key, default) in enumerate(cls.options.items(), start=2):
            assert lines[start + offset].split() == [f"{key}={default}", *cls.option_help[key].split(),
                                                     *{int: ["(an", "integer)"], float: ["(a", "number)"],
                                                       str: ["(a", "string)"], bool: ["(true", "or", "false)"]}[type(default)]]
    sources = subprocess.run(CLI + ["sources"], capture_output=True, text=True, check=True).stdout
    for name in ("shapes", "coco", "vqav2", "images"):
        assert name in sources


def test_expert_options_are_typed_by_their_defaults_from_python_too():
    from precompute.experts import ExpertError, get_expert

    assert get_expert("rgb", resolution="32").config["resolution"] == 32
    with pytest.raises(ExpertError, match="option 'resolution' takes an integer"):
        get_expert("rgb", resolution="abc")
    with pytest.raises(ExpertError, match="option 'views' takes an integer"):
        get_expert("ast-cls", views=1.5)


def run_args(cache: Path, model: Path) -> list[str]:
    return CLI + ["run", "--expert", "vit-cls", "--shards", "shapes", "--model", str(model), "--cache", str(cache),
                  "--limit", "600", "--shard-size", "20", "--batch-size", "2", "--source-opt", "num=600", "--no-progress"]


def wait_for_commits(directory: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if directory.exists() and len(list(directory.glob("*.json"))) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no {count} commits in {directory} after {timeout}s")


def summary_row(stdout: str, expert: str = "vit-cls") -> list[str]:
    """The fields of the run summary's row for `expert`. Not simply the last line: Ray's driver
    prints its own notices to stdout too (a node marked dead can land after the table)."""
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] == [expert]]
    assert rows, f"no summary row for {expert} in:\n{stdout[-2000:]}"
    return rows[-1]


@pytest.mark.slow
def test_kill_9_driver_then_resume_equals_uninterrupted(tmp_path, tiny_vit_dir):
    cache = tmp_path / "resumed"
    process = subprocess.Popen(run_args(cache, tiny_vit_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    commits = cache / "shapes/train/_commits/vit-cls"
    wait_for_commits(commits, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed_before = len(list(commits.glob("*.json")))
    assert committed_before < 30, "the run finished before it could be killed; make it longer"

    resumed = subprocess.run(run_args(cache, tiny_vit_dir), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    skipped = int(summary_row(resumed.stdout)[2])
    assert skipped >= committed_before
    subprocess.run(CLI + ["validate", "--cache", str(cache)], check=True, capture_output=True)

    fresh = tmp_path / "fresh"
    subprocess.run(run_args(fresh, tiny_vit_dir), check=True, capture_output=True)
    for path in sorted((fresh / "shapes/train/vit-cls").rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (cache / path.relative_to(fresh)).read_bytes(), path


@pytest.mark.slow
def test_worker_killed_mid_run_is_retried_and_the_run_completes(tmp_path, tiny_vit_dir):
    cache = tmp_path / "cache"
    process = subprocess.Popen(run_args(cache, tiny_vit_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_commits(cache / "shapes/train/_commits/vit-cls", 2, process)
    # this run's own workers only: a name match over the machine would kill any other Ray's too
    workers = descendants(process.pid, named="ray::ShardWorker")
    assert workers, "no ShardWorker process found below the run"
    for worker in workers:
        worker.kill()
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert summary_row(out)[1:5] == ["30", "0", "30", "0"]
    assert validate_cache(cache) == (30, [])


def test_wds_format_into_a_file_url_cache_resumes_and_validates(tmp_path, tiny_vit_dir, ray_local):
    """`--format wds --cache file://…`: tar shards through fsspec, same gaps, same commit records, same resume."""
    root = image_folder(tmp_path / "images")
    cache = f"file://{tmp_path}/cache"
    config = RunConfig(experts=["vit-cls"], source="images", data_root=str(root), split="all", cache=cache, format="wds",
                       models={"vit-cls": str(tiny_vit_dir)}, shard_size=4, batch_size=3)
    [summary] = run(config, progress=False)
    assert (summary.shards_done, summary.samples, summary.invalid) == (3, 9, 2)
    assert sorted(p.name for p in (tmp_path / "cache/images/all/vit-cls").iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    feature = SplitReader(cache, "images", "all").feature("vit-cls")
    assert feature.format == "wds" and int(feature.usable.sum()) == 7
    assert feature.get_by_key("a/img000")["cls"].shape == (6, 32) and not feature.get_by_key("broken")["cls"].any()
    assert validate_cache(cache) == (3, [])
    status = subprocess.run(CLI + ["status", "--cache", cache, "--json"], capture_output=True, text=True, check=True)
    [row] = json.loads(status.stdout)
    assert (row["format"], row["done"], row["invalid"]) == ("wds", 3, 2)
    [again] = run(config, progress=False)
    assert (again.shards_skipped, again.shards_done) == (3, 0)
