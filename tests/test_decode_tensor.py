"""The fast image path: JPEG through torchvision's libjpeg-turbo, uint8 tensor resizes, and what
they change against Pillow and against each model's own reference transform; the per-stage
profile that every commit record carries and `precompute status` shows.

The hostile-image cases (truncated, CMYK, 16-bit, palettes, bombs...) run through both decoders in
tests/test_sources.py.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image, ImageDraw, ImageFilter
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg
from torchvision.transforms.functional import pil_to_tensor

from cache_schema import PROFILE_STAGES, CacheWriter
from precompute.decode import decode_image, decode_image_tensor
from precompute.engine import commit_shard, plan_split
from precompute.experts import get_expert
from precompute.experts.base import timm_tensor_transform
from precompute.experts.labels import frame_image, frame_tensor
from precompute.experts.vit_cls import VitClsExpert
from precompute.sources import get_source
from test_hostile_precompute import run_main


def photo(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """Gradients, noise and blurred shapes: resizes of it disagree where photos' do (edges, texture)."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 255 / (width + height)], axis=-1)
    image = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.ellipse([x0, y0, x0 + 40, y0 + 30], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image.filter(ImageFilter.GaussianBlur(1))


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def count_torchvision_decodes(monkeypatch) -> list[int]:
    """Count calls of torchvision's JPEG decoder (decode_image_tensor imports it at call time)."""
    calls = []
    real = torchvision.io.decode_jpeg

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", counting)
    return calls


# --- the decoder ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["baseline", "progressive", "grayscale", "cmyk", "subsampled 4:4:4"])
def test_jpeg_through_torchvision_has_pillows_pixels(monkeypatch, case):
    image = photo(0)
    data = {"baseline": lambda: jpeg(image), "progressive": lambda: jpeg(image, progressive=True),
            "grayscale": lambda: jpeg(image.convert("L")), "cmyk": lambda: jpeg(image.convert("CMYK")),
            "subsampled 4:4:4": lambda: jpeg(image, subsampling=0)}[case]()
    calls = count_torchvision_decodes(monkeypatch)
    tensor = decode_image_tensor(data)
    assert calls, "a JPEG should go through torchvision"
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 120, 160)
    assert torch.equal(tensor, pil_to_tensor(decode_image(data)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_matches_pillow(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(photo(1, (40, 24)), exif=exif)
    tensor = decode_image_tensor(data)
    assert torch.equal(tensor, pil_to_tensor(decode_image(data)))
    assert tensor.shape[1:] == ((40, 24) if orientation >= 5 else (24, 40))


def test_png_and_other_formats_go_through_pillow(tmp_path, monkeypatch):
    rgba = Image.new("RGBA", (6, 4), (0, 0, 255, 128))
    rgba.save(tmp_path / "half.png")
    photo(2, (12, 10)).save(tmp_path / "photo.webp", lossless=True)
    calls = count_torchvision_decodes(monkeypatch)
    for name in ("half.png", "photo.webp"):
        assert torch.equal(decode_image_tensor(tmp_path / name), pil_to_tensor(decode_image(tmp_path / name)))
    assert not calls


@pytest.mark.parametrize("damage", ["truncated", "corrupt scan"])
def test_a_damaged_jpeg_is_refused_with_pillows_reason(damage):
    data = jpeg(photo(3))
    if damage == "truncated":
        broken = data[: len(data) // 2]
    else:  # the entropy-coded data after the header overwritten with markers no decoder accepts
        broken = data[:400] + b"\xff\xd9" * 200 + data[800:]
    with pytest.raises(Exception) as pillow:
        decode_image(broken)
    with pytest.raises(Exception) as tensor:
        decode_image_tensor(broken)
    assert type(tensor.value).__name__ == type(pillow.value).__name__ == "MediaError"
    assert str(tensor.value) == str(pillow.value)


def test_the_size_limit_holds_before_torchvision_decodes(monkeypatch):
    calls = count_torchvision_decodes(monkeypatch)
    with pytest.raises(Exception, match="too large"):
        decode_image_tensor(jpeg(photo(4, (20, 20))), max_pixels=100)
    assert not calls


# --- what the tensor resizes change ---------------------------------------------------------------

def test_rgb_frame_differs_from_pillows_by_at_most_one_level():
    """`rgb` resizes with torch's antialiased bicubic; Pillow's bicubic (the same a = -0.5 filter)
    rounds differently on a few pixels: never more than one level, under 1% of values."""
    for seed in range(3):
        image = photo(seed, (200, 150))
        ours = frame_tensor(pil_to_tensor(image), 64).numpy().astype(int)
        pillows = np.asarray(frame_image(image, 64)).transpose(2, 0, 1).astype(int)
        difference = np.abs(ours - pillows)
        assert difference.max() <= 1 and difference.mean() < 0.01, (difference.max(), difference.mean())


def test_vit_cls_tensor_transform_against_timms_reference():
    """vit-cls's default model's own eval transform (bicubic resize to 248, centre crop 224, mean and
    std 0.5), applied by timm to a PIL image, against the same transform over the uint8 tensor: the
    inputs differ by at most two uint8 levels (2/255 before normalising, 4/255 after, at std 0.5),
    on under 1% of values (measured: 0.5% differ, 0.001% by two levels)."""
    data_config = resolve_data_config(pretrained_cfg=get_pretrained_cfg(VitClsExpert.default_model).to_dict())
    assert data_config["crop_pct"] == 0.9 and data_config["interpolation"] == "bicubic"
    reference, ours = create_transform(**data_config, is_training=False), timm_tensor_transform(data_config)
    for seed in range(2):
        data = jpeg(photo(seed, (320, 240)))
        expected, got = reference(decode_image(data)), ours(decode_image_tensor(data))
        assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape == (3, 224, 224)
        levels = (got - expected).abs() * 0.5 * 255  # back to uint8 levels: x = (v / 255 - 0.5) / 0.5
        assert levels.max() <= 2 + 1e-4 and (levels > 0.5).float().mean() < 0.01, (levels.max(), levels.mean())


def test_the_preprocessing_hash_says_the_pixels_changed(tiny_vit_dir):
    """Features made through Pillow and through tensors are different features: a rerun into a cache
    made before is refused as a changed spec (as for any preprocessing change) unless --overwrite."""
    from cache_schema import config_hash

    rgb = get_expert("rgb").spec("rgb")
    assert rgb.preprocess_hash != config_hash({"resolution": 224, "resample": "bicubic"})
    vit = get_expert("vit-cls", model=str(tiny_vit_dir))
    vit.load()
    assert vit.spec("vit-cls").preprocess_hash != config_hash({"data_config": vit.data_config})


# --- the pipeline: gaps, profile, status ------------------------------------------------------------

def test_a_shard_of_jpeg_png_and_a_truncated_jpeg_commits_with_a_gap_and_a_profile(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg(photo(5)))
    photo(6).save(images / "b.png")
    (images / "c.jpg").write_bytes(jpeg(photo(7))[:900])
    expert = get_expert("rgb", resolution=32)
    expert.load()
    spec = expert.spec("rgb")
    source = get_source("images", str(images), "all")
    plan, samples = plan_split(source, "images", 8, None)
    writer = CacheWriter(str(tmp_path / "cache"))
    writer.prepare_split(plan)
    writer.prepare_feature(plan, spec)
    with ThreadPoolExecutor(max_workers=2) as decoder:
        record = commit_shard(expert, spec, writer, "images", source, 0, 0, samples, 2, {}, decoder, "cpu")
    assert record.num_valid == 2 and list(record.invalid) == ["c"] and "truncated" in record.invalid["c"]
    assert set(record.profile) == set(PROFILE_STAGES) and all(v >= 0 for v in record.profile.values())
    assert record.profile["decode"] > 0 and record.profile["write"] > 0
    assert record.seconds >= record.profile["write"]

    status = run_main(capsys, "status", "--cache", str(tmp_path / "cache"), "--profile")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].split()[-2:] == ["bound", "by"]
    row = next(line for line in lines[1:] if line.startswith("images/all"))
    assert row.split()[-2] in ("decode", "forward", "write") and row.endswith("%")
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["split", "feature", "shards"])
    assert [f"{stage}" for stage in PROFILE_STAGES] == lines[header].split()[3::2]
    values = lines[header + 1].split()
    assert values[:3] == ["images/all", "rgb", "1"]
    # status sums each stage to 3 decimals (as in --json), then prints 2: 0.00496 s is 0.005, printed 0.01
    assert values[3:] == [f"{round(record.profile[stage], 3):.2f}" for stage in PROFILE_STAGES]

    [entry] = json.loads(run_main(capsys, "status", "--cache", str(tmp_path / "cache"), "--json").stdout)
    assert entry["profiled_shards"] == 1 and entry["profile"] == {s: round(record.profile[s], 3) for s in PROFILE_STAGES}
    assert entry["bound_by"]["stage"] in ("decode", "forward", "write") and 0 < entry["bound_by"]["share"] <= 1

