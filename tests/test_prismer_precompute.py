"""Prismer's experts end to end through `precompute run`: shapes and a COCO-layout folder, tiny
weights loaded by path (HED and CRAFT with their real offline weights), dependency order,
validation, determinism and the preview."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from cache_schema import SplitReader, read_table, validate_cache
from precompute.cli import main
from precompute.experts.labels import frame_tensor
from precompute.sources.shapes import SEG_CLASSES, ShapesWorld
from tiny_depth import TINY_NORMAL_ENCODER, save_tiny_dpt, save_tiny_normal
from tiny_edge import hed_weights_path
from tiny_ocr import easyocr_models_dir
from tiny_seg import save_tiny_detector, save_tiny_mask2former, save_tiny_text_encoder

RESOLUTION = 48
LABELS = {  # feature -> {array: (dtype, per-sample shape)}
    "rgb": {"rgb": ("uint8", (3, RESOLUTION, RESOLUTION))},
    "depth": {"depth": ("uint8", (1, RESOLUTION, RESOLUTION))},
    "normal": {"normal": ("uint8", (3, RESOLUTION, RESOLUTION))},
    "edge": {"edge": ("uint8", (1, RESOLUTION, RESOLUTION))},
    "seg-coco": {"seg": ("uint8", (1, RESOLUTION, RESOLUTION))},
    "objdet": {"instances": ("uint8", (1, RESOLUTION, RESOLUTION))},
    "ocrdet": {"words": ("uint8", (1, RESOLUTION, RESOLUTION))},
}


@pytest.fixture(scope="module")
def prismer_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prismer-models")
    return {
        "depth": save_tiny_dpt(root / "depth"),
        "normal": save_tiny_normal(root / "normal"),
        "seg-coco": save_tiny_mask2former(root / "seg", num_labels=len(SEG_CLASSES), id2label=dict(enumerate(SEG_CLASSES))),
        "objdet": save_tiny_detector(root / "objdet"),
        "text_encoder": save_tiny_text_encoder(root / "text"),
    }


def prismer_args(cache: Path, models: dict[str, Path], *extra: str) -> list[str]:
    return [
        "run", "--expert", "prismer", "--cache", str(cache), "--shard-size", "4", "--batch-size", "3", "--no-progress",
        "--model", f"depth={models['depth']}", "--model", f"seg-coco={models['seg-coco']}",
        "--model", f"objdet={models['objdet']}", "--model", f"edge={hed_weights_path()}",
        "--model", f"ocrdet={easyocr_models_dir()}",
        "--expert-opt", f"resolution={RESOLUTION}", "--expert-opt", f"text_encoder={models['text_encoder']}",
        "--expert-opt", "normal.mode=from-depth", "--expert-opt", "objdet.threshold=0.0",
        "--expert-opt", "ocrdet.detect_size=128", *extra,
    ]


def check_labels(cache: Path, source: str, split: str, count: int) -> SplitReader:
    reader = SplitReader(cache, source, split)
    assert set(LABELS) <= set(reader.feature_names)
    for feature_name, arrays in LABELS.items():
        feature = reader.feature(feature_name)
        assert feature.usable.sum() == count, feature_name
        assert feature.spec.params["resolution"] == RESOLUTION
        for array, (dtype, shape) in arrays.items():
            data = feature.read(array)
            assert str(data.dtype) == dtype and data.shape == (count, *shape), (feature_name, array)
    seg = reader.feature("seg-coco").read("seg")
    assert seg.max() < len(SEG_CLASSES)
    assert len(read_table(cache, "seg-coco").names) == len(SEG_CLASSES)
    objdet = reader.feature("objdet")
    for i in range(count):
        sample = objdet.get(i)
        ids = set(np.unique(sample["instances"]).tolist()) - {255}
        assert ids <= set(range(len(sample["classes"])))  # every painted index names an instance
        assert sample["classes"].dtype == np.uint16 and len(sample["scores"]) == len(sample["classes"])
        ocr = reader.feature("ocrdet").get(i)
        words = [w for w in ocr["text"].split("\n") if w]
        assert ocr["embeddings"].shape == (len(words), 64) and ocr["embeddings"].dtype == np.float16
        assert set(np.unique(ocr["words"]).tolist()) - {255} <= set(range(len(words)))
    normal = reader.feature("normal").read("normal").astype(np.float32) / 255 * 2 - 1
    assert np.allclose(np.linalg.norm(normal, axis=1), 1, atol=0.02) and (normal[:, 2] > 0).all()  # unit, facing the camera
    return reader


@pytest.mark.slow
def test_prismer_on_shapes_end_to_end(tmp_path, prismer_models, ray_local):
    """All of Prismer's experts in dependency order through the engine; valid and previewable. Each expert's
    determinism is tested in its own test_expert_* file, and a rerun's bytes through the engine in
    test_engine's kill -9 test, so this runs the experts once."""
    cache = tmp_path / "cache"
    args = prismer_args(cache, prismer_models, "--shards", "shapes", "--split", "val", "--source-opt", "num=6")
    assert main(args) == 0
    reader = check_labels(cache, "shapes", "val", 6)
    assert validate_cache(cache)[1] == []
    rgb = reader.feature("rgb").get(0)["rgb"].transpose(1, 2, 0)
    world = ShapesWorld()
    image = world.render(world.scene("val", 0))
    expected = frame_tensor(pil_to_tensor(image), RESOLUTION).permute(1, 2, 0).numpy()  # rgb resizes uint8 tensors
    np.testing.assert_array_equal(rgb, expected)
    pillows = np.asarray(image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC))
    assert np.abs(rgb.astype(int) - pillows).max() <= 1

    png = tmp_path / "preview.png"
    assert main(["preview", "--cache", str(cache), "--key", "shapes-val-000001", "--out", str(png)]) == 0
    grid = Image.open(png)
    assert grid.size[0] >= 4 * 200 and grid.size[1] >= 2 * 200


@pytest.mark.slow
def test_prismer_on_coco_layout_folder(tmp_path, prismer_models, ray_local):
    """A COCO-2017-layout folder with odd images: labels for the good ones, a recorded gap for the bad."""
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, captions = [], []
    for i in range(5):
        name = f"{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(root / "val2017" / name)
        images.append({"id": i, "file_name": name, "height": 40 + 8 * i, "width": 56})
        captions.append({"id": 100 + i, "image_id": i, "caption": f"picture {i}"})
    (root / "val2017" / images[3]["file_name"]).write_bytes(b"not a jpeg")
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": captions}))
    cache = tmp_path / "cache"
    args = prismer_args(cache, prismer_models, "--shards", "coco", "--data-root", str(root), "--split", "val")
    args[args.index("normal.mode=from-depth")] = "normal.mode=model"
    args += ["--model", f"normal={prismer_models['normal']}", "--expert-opt", "normal.input_size=64",
             "--expert-opt", f"normal.encoder={TINY_NORMAL_ENCODER}"]
    assert main(args) == 0
    reader = SplitReader(cache, "coco", "val")
    for feature in LABELS:
        usable = reader.feature(feature).usable
        assert usable.tolist() == [True, True, True, False, True], feature
    assert validate_cache(cache)[1] == []


@pytest.mark.slow
def test_dependent_expert_is_refused_without_its_input(tmp_path, prismer_models, ray_local, capsys):
    cache = tmp_path / "cache"
    common = ["--shards", "shapes", "--split", "val", "--source-opt", "num=6", "--cache", str(cache), "--shard-size", "4",
              "--no-progress", "--expert-opt", f"resolution={RESOLUTION}"]
    objdet = ["--expert-opt", f"objdet.text_encoder={prismer_models['text_encoder']}", "--expert-opt", "objdet.threshold=0.0"]
    assert main(["run", "--expert", "objdet", "--model", str(prismer_models["objdet"]), *common, *objdet]) == 2
    assert "objdet reads the 'depth' feature" in capsys.readouterr().err
    assert not (cache / "shapes" / "val" / "objdet").exists()

    assert main(["run", "--expert", "depth", "--model", str(prismer_models["depth"]), *common]) == 0
    (cache / "shapes" / "val" / "_commits" / "depth" / "00001.json").unlink()  # shard 1's depth is not done
    assert main(["run", "--expert", "objdet", "--model", str(prismer_models["objdet"]), *common, *objdet]) == 1
    failure = json.loads((cache / "shapes" / "val" / "_failures" / "objdet" / "00001.json").read_text())
    assert "depth not committed" in failure["error"]
    reader = SplitReader(cache, "shapes", "val")
    assert reader.feature("objdet").committed_shards() == [0]

    assert main(["run", "--expert", "depth,objdet", "--model", f"depth={prismer_models['depth']}",
                 "--model", f"objdet={prismer_models['objdet']}", *common, *objdet]) == 0  # depth first, then the rest of objdet
    assert reader.feature("objdet").committed_shards() == [0, 1]
    assert not (cache / "shapes" / "val" / "_failures" / "objdet" / "00001.json").exists()


def test_expert_options_are_scoped(tmp_path):
    cache = tmp_path / "cache"
    base = ["run", "--shards", "shapes", "--cache", str(cache), "--no-progress"]
    assert main([*base, "--expert", "rgb,depth", "--expert-opt", "levels=3"]) == 2  # nobody takes it
    assert main([*base, "--expert", "rgb", "--expert-opt", "depth.resolution=3"]) == 2  # depth not in the run
    assert main([*base, "--expert", "rgb,depth", "--model", "some/model"]) == 2  # which expert's model?
    assert not cache.exists()
