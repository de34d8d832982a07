"""`depth` and `normal`: tiny real models saved to disk and loaded by path through the experts' own
code; label dtype/shape/range, determinism, batches, blank images, bad paths, the geometry of
normals from depth, NNET's layout, and the shapes world's depth stand-in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from precompute.experts import ExpertError, get_expert
from precompute.experts.depth import DepthPreprocessing
from precompute.experts.normal import FROM_DEPTH_REVISION, NNET, normals_from_depth
from tiny_depth import TINY_NORMAL_ENCODER, save_tiny_dpt, save_tiny_normal

R = 40


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_dpt(tmp_path_factory.mktemp("depth") / "tiny-dpt")


@pytest.fixture(scope="module")
def tiny_normal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_normal(tmp_path_factory.mktemp("normal"))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Three images of different sizes and aspect ratios, and a blank one."""
    rng = np.random.default_rng(0)
    sizes = ((30, 50), (64, 64), (45, 20))
    noisy = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    return noisy + [Image.new("RGB", (33, 33), (90, 90, 90))]


def run(expert, images: list[Image.Image], inputs: dict | None = None) -> np.ndarray:
    batch = torch.stack([expert.preprocess(image) for image in images])
    (array,) = expert.predict(batch, inputs or {}).values()
    return array


def decode(normal: np.ndarray) -> np.ndarray:
    return normal.astype(np.float64) / 127.5 - 1


# --- depth ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def depth_expert(tiny_dpt: Path):
    expert = get_expert("depth", model=str(tiny_dpt), resolution=R)
    expert.load()
    return expert


def test_depth_label_dtype_shape_range(depth_expert, images):
    depth = run(depth_expert, images[:3])
    assert depth.dtype == np.uint8 and depth.shape == (3, 1, R, R)
    assert (depth.reshape(3, -1).min(axis=1) == 0).all() and (depth.reshape(3, -1).max(axis=1) == 255).all()


def test_depth_is_deterministic_and_batch_independent(depth_expert, images):
    first, second = run(depth_expert, images[:3]), run(depth_expert, images[:3])
    assert first.tobytes() == second.tobytes()
    alone = run(depth_expert, images[1:2])
    assert np.abs(alone[0].astype(int) - first[1].astype(int)).max() <= 1  # batched matmuls may round differently


def test_depth_blank_image_gives_a_valid_label(depth_expert, images):
    depth = run(depth_expert, images[3:])
    assert depth.dtype == np.uint8 and depth.shape == (1, 1, R, R)


def test_depth_uses_the_checkpoints_processor(depth_expert, tiny_dpt, tmp_path):
    assert depth_expert.preprocess(Image.new("RGB", (10, 70))).shape == (3, 32, 32)  # tiny DPT's config: 32 px
    spec = depth_expert.spec("depth")
    assert spec.params == {"resolution": R, "input_size": [32, 32]}
    assert spec.model_id == str(tiny_dpt.resolve()) and spec.revision.startswith("sha256:")
    bare = tmp_path / "no-processor"
    shutil.copytree(tiny_dpt, bare)
    (bare / "preprocessor_config.json").unlink()
    fallback = get_expert("depth", model=str(bare), resolution=R)
    fallback.load()  # DPT-Hybrid MiDaS's processor: 384 x 384, mean/std 0.5
    assert fallback.preprocess(Image.new("RGB", (8, 8), (255, 255, 255))).shape == (3, 384, 384)
    assert fallback.spec("depth").preprocess_hash != spec.preprocess_hash


def test_depth_preprocessing_follows_dpt_resize_rules():
    """Depth Anything V2's processor: keep the aspect ratio, a multiple of its 14 px patch."""
    from transformers import DPTImageProcessor

    processor = DPTImageProcessor(size={"height": 60, "width": 60}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    preprocessing = DepthPreprocessing.from_processor(processor)
    assert preprocessing.input_size(R) == (56, 56)
    pixels = preprocessing(Image.new("RGB", (R, R), (255, 255, 255)))
    assert pixels.shape == (3, 56, 56)
    white = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(pixels[:, 0, 0], white)


@pytest.mark.parametrize("ref", ["/no/such/dpt", "nobody/no-such-depth-model"])
def test_depth_bad_model_is_an_expert_error(ref):
    with pytest.raises(ExpertError, match="depth"):
        get_expert("depth", model=ref).load()


def test_depth_directory_without_config_is_an_expert_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ExpertError, match="config.json"):
        get_expert("depth", model=str(tmp_path)).load()


# --- normal, NNET ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def normal_expert(tiny_normal: Path):
    expert = get_expert("normal", model=str(tiny_normal), resolution=R, encoder=TINY_NORMAL_ENCODER, input_size=64)
    expert.load()
    return expert


def test_nnet_label_dtype_shape_range(normal_expert, images):
    normal = run(normal_expert, images[:3])
    assert normal.dtype == np.uint8 and normal.shape == (3, 3, R, R)
    lengths = np.linalg.norm(decode(normal), axis=1)
    assert np.abs(lengths - 1).max() < 0.02  # unit vectors, up to uint8 rounding
    assert normal_expert.requires() == ()
    spec = normal_expert.spec("normal")
    assert spec.params["resolution"] == R and spec.params["mode"] == "model"
    assert spec.revision.startswith("sha256:")


def test_nnet_is_deterministic_and_handles_blank_images(normal_expert, images):
    assert run(normal_expert, images).tobytes() == run(normal_expert, images).tobytes()
    blank = run(normal_expert, images[3:])
    assert blank.shape == (1, 3, R, R) and blank.dtype == np.uint8


def test_nnet_checkpoint_forms(tiny_normal, tmp_path, images):
    """A bare state dict, "module."-prefixed keys (DataParallel) and a directory holding the file all load."""
    state = torch.load(tiny_normal, weights_only=True)["model"]
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "nnet.pth")
    expected = None
    for ref in (tiny_normal, tmp_path / "nnet.pth", tmp_path):
        expert = get_expert("normal", model=str(ref), resolution=R, encoder=TINY_NORMAL_ENCODER, input_size=64)
        expert.load()
        labels = run(expert, images[:1])
        expected = labels if expected is None else expected
        assert labels.tobytes() == expected.tobytes()


def test_nnet_keeps_nnets_layout():
    """EfficientNet-B5 under encoder.original_model, NNET's decoder widths: scannet.pt's keys and shapes."""
    with torch.device("meta"):
        model = NNET()
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert shapes["encoder.original_model.conv_stem.weight"] == (48, 3, 3, 3)
    assert shapes["decoder.conv2.weight"] == (2048, 2048, 1, 1)
    assert shapes["decoder.up1._net.0.weight"] == (1024, 2048 + 176, 3, 3)
    assert shapes["decoder.up4._net.0.weight"] == (128, 256 + 24, 3, 3)
    assert shapes["decoder.out_conv_res8.weight"] == (4, 512, 3, 3)
    assert shapes["decoder.out_conv_res4.0.weight"] == (128, 512 + 4, 1)
    assert shapes["decoder.out_conv_res1.6.weight"] == (4, 128, 1)


def test_nnet_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(ExpertError, match="--model PATH.*mode=from-depth"):
        get_expert("normal", model=str(tmp_path / "scannet.pt")).load()


def test_nnet_checkpoint_that_does_not_fit_is_an_expert_error(tiny_normal, tmp_path):
    with pytest.raises(ExpertError, match="encoder="):  # a B5 NNET is not the tiny one
        get_expert("normal", model=str(tiny_normal), encoder="tf_efficientnet_lite0").load()
    torch.save({"model": {"weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ExpertError, match="missing keys"):
        get_expert("normal", model=str(tmp_path / "other.pt"), encoder=TINY_NORMAL_ENCODER).load()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ExpertError, match="readable"):
        get_expert("normal", model=str(tmp_path / "junk.pth")).load()


@pytest.mark.parametrize("options", [{"mode": "normals-please"}, {"input_size": 100}, {"relief": 0.0}])
def test_normal_bad_options_are_expert_errors(options):
    with pytest.raises(ExpertError, match="normal"):
        get_expert("normal", **options)


# --- normal, from depth ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def from_depth():
    expert = get_expert("normal", mode="from-depth", resolution=R)
    expert.load()
    return expert


def from_depth_label(expert, depth: np.ndarray) -> np.ndarray:
    batch = torch.stack([expert.preprocess(Image.new("RGB", (8, 8)))] * len(depth))
    return expert.predict(batch, {"depth": {"depth": depth}})["normal"]


def test_from_depth_needs_depth_and_no_weights(from_depth):
    assert from_depth.requires() == ("depth",)
    assert get_expert("normal", mode="from-depth").requires() == ("depth",)
    spec = from_depth.spec("normal")
    assert (spec.model_id, spec.revision) == ("from-depth", FROM_DEPTH_REVISION)
    assert spec.params["resolution"] == R and spec.params["mode"] == "from-depth"
    assert from_depth.preprocess(Image.new("RGB", (500, 500))).numel() == 1  # pixels are not used


def test_from_depth_flat_depth_faces_the_viewer(from_depth):
    for value in (0, 128, 255):
        normal = from_depth_label(from_depth, np.full((1, 1, R, R), value, dtype=np.uint8))
        assert normal.dtype == np.uint8 and normal.shape == (1, 3, R, R)
        assert (normal[0, 0] == 128).all() and (normal[0, 1] == 128).all() and (normal[0, 2] == 255).all()


def test_from_depth_ramps_tilt_away_from_the_rising_side(from_depth):
    """Nearness rising to the right across the frame: a 45 degree slope facing left (relief 1)."""
    ramp = np.round(np.linspace(0, 255, R)).astype(np.uint8)
    rightward = np.broadcast_to(ramp[None, :], (R, R))
    downward = np.broadcast_to(ramp[:, None], (R, R))
    normal = decode(from_depth_label(from_depth, np.stack([rightward, downward])[:, None].copy()))
    inner = (slice(2, -2), slice(2, -2))
    s = np.sqrt(0.5) * R / (R - 1)  # the ramp rises 255 over R - 1 pixels, a frame is R pixels
    expected = np.array([-s, 0, np.sqrt(1 - s * s)])
    assert np.allclose(normal[0][(slice(None), *inner)].mean(axis=(1, 2)), expected, atol=0.03)
    assert np.allclose(normal[1][(slice(None), *inner)].mean(axis=(1, 2)), expected[[1, 0, 2]], atol=0.03)


def test_from_depth_sphere_normals_point_outward(from_depth):
    y, x = np.mgrid[0:R, 0:R] - (R - 1) / 2
    radius = R / 3
    bump = np.sqrt(np.clip(radius**2 - x**2 - y**2, 0, None)) / radius * 255
    normal = decode(from_depth_label(from_depth, np.round(bump).astype(np.uint8)[None, None]))[0]
    centre, off = R // 2, int(radius / 2)
    assert normal[2, centre, centre] > 0.95
    assert normal[0, centre, centre + off] > 0.2 and normal[0, centre, centre - off] < -0.2  # right / left
    assert normal[1, centre + off, centre] > 0.2 and normal[1, centre - off, centre] < -0.2  # down / up
    assert abs(normal[1, centre, centre + off]) < 0.1 and abs(normal[0, centre + off, centre]) < 0.1


def test_from_depth_relief_scales_slopes():
    ramp = torch.linspace(0, 255, R).round().to(torch.uint8).expand(1, 1, R, R)
    gentle, steep = normals_from_depth(ramp, 0.5), normals_from_depth(ramp, 2.0)
    assert gentle[0, 2, R // 2, R // 2] > steep[0, 2, R // 2, R // 2]


def test_from_depth_refuses_depth_at_another_resolution(from_depth):
    with pytest.raises(ExpertError, match="resolution"):
        from_depth_label(from_depth, np.zeros((1, 1, R + 8, R + 8), dtype=np.uint8))


# --- the shapes world's stand-in ------------------------------------------------------------------


def test_pretrain_depth_fast_writes_a_model_the_expert_loads(tmp_path):
    from precompute.sources.shapes import ShapesWorld
    from worldmodels.depth import pretrain_depth

    world = ShapesWorld(image_size=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as pretrain_all runs it: two threads on a shared 2-core box crawl
    try:
        metrics = pretrain_depth(tmp_path / "depth", world, resolution=32, fast=True)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "depth" / "eval_results.json").read_text()) == json.loads(json.dumps(metrics))
    assert all(np.isfinite(metrics[k]) for k in ("l1", "label_l1", "label_l1_background_only", "rank_correlation"))
    expert = get_expert("depth", model=str(tmp_path / "depth"), resolution=32)
    expert.load()
    assert expert.spec("depth").params["input_size"] == [32, 32]
    depth = run(expert, [world.render(world.scene("val", 0))])
    assert depth.dtype == np.uint8 and depth.shape == (1, 1, 32, 32)
