"""`precompute verify` on real caches made by `precompute run`: clean, tampered, drifted, fp16 of a bf16 forward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_schema import SplitReader
from conftest import save_tiny_vit
from precompute.cli import main

NUM = 24


def make_cache(cache: Path, model: Path) -> Path:
    """vit-cls and rgb (resolution 16, an option the verify must take from the run's record) over 24 scenes."""
    assert main(["run", "--expert", "vit-cls,rgb", "--shards", "shapes", "--source-opt", f"num={NUM}",
                 "--model", f"vit-cls={model}", "--expert-opt", "resolution=16", "--cache", str(cache),
                 "--shard-size", "8", "--batch-size", "5", "--no-progress"]) == 0
    return cache


@pytest.fixture(scope="module")
def made(tmp_path_factory, ray_local) -> tuple[Path, Path]:
    """A cache and the model it was made with, copied by the tests that change either."""
    root = tmp_path_factory.mktemp("verify")
    model = save_tiny_vit(root / "vit")
    return make_cache(root / "cache", model), model


def own_copy(made: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A cache made with a model of its own, which the test may replace (the spec names the model's path)."""
    model = shutil.copytree(made[1], tmp_path / "vit")
    cache = shutil.copytree(made[0], tmp_path / "cache")
    manifest = json.loads((cache / "cache.json").read_text())
    for entry in manifest["features"].values():
        if entry["model_id"] == str(made[1].resolve()):
            entry["model_id"] = str(model.resolve())
    (cache / "cache.json").write_text(json.dumps(manifest))
    for record in (cache / "shapes/train/_commits/vit-cls").glob("*.json"):
        data = json.loads(record.read_text())
        record.write_text(json.dumps({**data, "model_id": str(model.resolve())}))
    return cache, model


def verify(capsys, cache: Path, *args: str) -> tuple[int, str, str]:
    code = main(["verify", "--cache", str(cache), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("feature", ["vit-cls", "rgb"])
def test_a_clean_cache_verifies(made, capsys, feature):
    code, out, err = verify(capsys, made[0], "--feature", feature, "--samples", "10", "--seed", "3")
    assert code == 0, err
    assert f"shapes/train {feature}: 10 of {NUM} committed samples (seed 3)" in out
    [row] = [line for line in out.splitlines() if line.startswith(("cls ", "rgb "))]
    assert row.split()[3] == "0"  # max|diff|: the same bytes, recomputed on the same kind of device
    assert f"verify: {feature} matches the live model on 10 samples" in out


def test_altered_values_fail_naming_the_worst_samples(made, capsys, tmp_path):
    import zarr

    cache = shutil.copytree(made[0], tmp_path / "cache")
    reader = SplitReader(cache, "shapes", "train")
    cls = zarr.open_array(cache / "shapes/train/vit-cls/cls", mode="r+")
    cls[5] = -cls[5]  # a sign flip: cosine -1
    noisy = cls[17].astype(np.float32)
    cls[17] = (noisy + np.random.default_rng(0).normal(0, 0.02, noisy.shape) * np.abs(noisy).max()).astype(np.float16)
    rgb = zarr.open_array(cache / "shapes/train/rgb/rgb", mode="r+")
    rgb[9] = 255 - rgb[9]

    code, out, err = verify(capsys, cache, "--feature", "vit-cls", "--samples", str(NUM))
    assert code == 1
    assert "shapes/train vit-cls does NOT match the live model" in err
    failing = err.splitlines()[1]
    assert failing.startswith("  cls: 2 of 24 samples outside tolerance; worst: " + reader.keys[5] + " (cos -1.0000")
    assert reader.keys[17] in failing  # small noise: cosine still 0.999+, but max|diff| past 2^-4 of the largest value
    code, out, err = verify(capsys, cache, "--feature", "rgb", "--samples", str(NUM))
    assert code == 1 and f"rgb: 1 of 24 samples outside tolerance; worst: {reader.keys[9]}" in err


def test_replaced_weights_refuse_with_exit_2(made, capsys, tmp_path):
    cache, model = own_copy(made, tmp_path)
    assert verify(capsys, cache, "--feature", "vit-cls", "--samples", "4")[0] == 0
    save_tiny_vit(model, seed=1)  # the same architecture and preprocessing, other weights, at the same path
    code, out, err = verify(capsys, cache, "--feature", "vit-cls", "--samples", "4")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out
    assert "weights: the model's revision/weights hash is sha256:" in err and "preprocessing" not in err


def test_changed_preprocessing_refuses_with_exit_2(made, capsys, tmp_path):
    cache, model = own_copy(made, tmp_path)
    config = json.loads((model / "config.json").read_text())
    assert config["pretrained_cfg"]["interpolation"] == "bilinear"
    config["pretrained_cfg"]["interpolation"] = "bicubic"  # the resize before the model: same weights
    (model / "config.json").write_text(json.dumps(config))
    code, out, err = verify(capsys, cache, "--feature", "vit-cls")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "preprocessing: its hash is" in err and "weights" not in err


def test_fp16_storage_of_a_bf16_forward_is_within_tolerance(made, capsys, tmp_path):
    """What a GPU run stores: a half-precision forward rounded to float16. Here the same ViT runs in
    bfloat16 through the engine's own path, its output replaces the cache's, and verify (float32
    forward) accepts it although the values differ."""
    from concurrent.futures import ThreadPoolExecutor

    import zarr

    from precompute.experts.vit_cls import VitClsExpert
    from precompute.forward import run_samples
    from precompute.sources import get_source

    class Bf16VitCls(VitClsExpert):
        dtype = torch.bfloat16  # the forward in bfloat16; predict still stores float16

    cache = shutil.copytree(made[0], tmp_path / "cache")
    reader = SplitReader(cache, "shapes", "train")
    expert = Bf16VitCls(model=str(made[1]))
    expert.load()
    source = get_source("shapes", None, "train", num=NUM)
    with ThreadPoolExecutor(2) as decoder:
        outputs, valid, _, _ = run_samples(expert, reader.spec("vit-cls"), source, source.samples(), 8, {}, decoder)
    assert valid.all()
    stored = zarr.open_array(cache / "shapes/train/vit-cls/cls", mode="r+")
    assert not np.array_equal(stored[:], outputs["cls"])
    stored[:] = outputs["cls"]

    code, out, err = verify(capsys, cache, "--feature", "vit-cls", "--samples", str(NUM))
    assert code == 0, err
    [row] = [line for line in out.splitlines() if line.startswith("cls ")]
    assert 0 < float(row.split()[3]) and float(row.split()[4]) >= 0.999


@pytest.mark.parametrize("args, message", [
    (["--feature", "vit-cls", "--samples", "0"], "--samples must be at least 1"),
    (["--feature", "depth"], "no split holds feature 'depth'"),
    (["--feature", "vit-cls", "--split", "val"], "--split val does not hold it"),
    (["--feature", "vit-cls", "--source-opt", "seed=5"], "gives other annotations for 'shapes-train-"),
    (["--feature", "rgb", "--expert-opt", "resolution=abc"], "option 'resolution' takes an integer"),
    (["--feature", "rgb", "--expert-opt", "resolution=32"], "preprocessing: its hash is"),
])
def test_bad_input_is_one_line_and_exit_2(made, capsys, args, message):
    code, out, err = verify(capsys, made[0], *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
