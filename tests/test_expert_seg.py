"""`seg-coco` / `seg-ade` (Mask2Former) and `objdet` (RT-DETR / DETR / OWLv2 + Prismer's instance map).

Tiny random checkpoints are saved to disk and loaded back by path through the experts' real
code; the box -> instance-map rules are checked on hand-made boxes and depth maps; the shapes
world's stand-in trainers (fast mode) must write checkpoints those experts load.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from precompute.experts import ExpertError, get_expert
from precompute.experts.labels import BACKGROUND_ID
from precompute.experts.objdet import box_instance_map
from precompute.experts.vocab import ADE20K_CLASSES, COCO_PANOPTIC_CLASSES
from tests.tiny_seg import (
    TINY_DETECTOR_CLASSES,
    TINY_OWLV2_INPUT_SIZE,
    save_tiny_detector,
    save_tiny_mask2former,
    save_tiny_owlv2,
    save_tiny_text_encoder,
)

R = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("seg-models")
    return {
        "text": str(save_tiny_text_encoder(root / "text")),
        "coco": str(save_tiny_mask2former(root / "m2f-coco", num_labels=133)),
        "ade": str(save_tiny_mask2former(root / "m2f-ade", num_labels=150)),
        "named": str(save_tiny_mask2former(root / "m2f-named", num_labels=3,
                                           id2label={0: "sky", 1: "tree", 2: "road"})),
        "rt_detr": str(save_tiny_detector(root / "rt-detr")),
        "detr": str(save_tiny_detector(root / "detr", kind="detr")),
        "owlv2": str(save_tiny_owlv2(root / "owlv2")),
    }


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)),
        Image.new("RGB", (64, 64), (255, 255, 255)),  # nothing in it
        Image.fromarray(rng.integers(0, 255, (30, 70, 3), dtype=np.uint8)).convert("L"),  # grey, odd aspect
    ]


def loaded(name: str, model: str, text: str, resolution: int = R, **options):
    expert = get_expert(name, model=model, resolution=resolution, text_encoder=text, **options)
    expert.load()
    return expert


# --- segmentation -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "model", "vocabulary"), [("seg-coco", "coco", COCO_PANOPTIC_CLASSES),
                                                            ("seg-ade", "ade", ADE20K_CLASSES)])
def test_seg_label_dtype_shape_range_and_table(models, name, model, vocabulary):
    expert = loaded(name, models[model], models["text"])
    batch = torch.stack([expert.preprocess(image) for image in images()])
    seg = expert.predict(batch, {})["seg"]
    spec = expert.spec(name)
    assert seg.dtype == np.uint8 and seg.shape == (3, 1, R, R) == (3, *spec.array("seg").shape)
    assert seg.max() < len(vocabulary)
    # LABEL_i configs with 133 / 150 classes are named from the standard vocabularies
    table = expert.tables()[name]
    assert table.names == list(vocabulary)
    assert table.embeddings.shape == (len(vocabulary), 64) and table.embeddings.dtype == np.float16
    assert spec.params["num_classes"] == len(vocabulary)
    assert spec.params["table"] == name and spec.params["table_digest"] == table.digest


def test_seg_is_deterministic_and_batch_independent(models):
    expert = loaded("seg-coco", models["coco"], models["text"])
    batch = torch.stack([expert.preprocess(image) for image in images()])
    first = expert.predict(batch, {})["seg"]
    again = loaded("seg-coco", models["coco"], models["text"]).predict(batch, {})["seg"]
    assert first.tobytes() == again.tobytes()
    alone = expert.predict(batch[1:2], {})["seg"]
    assert np.array_equal(alone[0], first[1])


def test_seg_names_from_config_and_input_size(models):
    expert = loaded("seg-ade", models["named"], models["text"], input_size=96)
    assert expert.names == ["sky", "tree", "road"]
    assert expert.preprocess(images()[0]).shape == (3, 96, 96)
    assert expert.spec("seg-ade").params["input_size"] == 96
    assert expert.predict(torch.stack([expert.preprocess(images()[1])]), {})["seg"].max() < 3
    assert loaded("seg-ade", models["named"], models["text"]).input_size == 64  # the processor config's square
    with pytest.raises(ExpertError, match="input_size 32 is too small"):
        loaded("seg-ade", models["named"], models["text"], input_size=32)


def test_seg_bad_models_raise(models, tmp_path):
    with pytest.raises(ExpertError, match="no such model directory"):
        loaded("seg-coco", str(tmp_path / "missing"), models["text"])
    with pytest.raises(ExpertError, match="not Mask2Former"):
        loaded("seg-coco", models["rt_detr"], models["text"])
    generic = save_tiny_mask2former(tmp_path / "generic", num_labels=5)
    with pytest.raises(ExpertError, match="no class names"):
        loaded("seg-coco", str(generic), models["text"])
    with pytest.raises(ExpertError, match="text encoder"):
        loaded("seg-coco", models["coco"], str(tmp_path / "no-encoder"))


# --- detection: boxes -> Prismer's instance map --------------------------------------------------


def paint(boxes, scores, classes, depth):
    return box_instance_map(np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(scores, dtype=np.float32),
                            np.array(classes), np.asarray(depth, dtype=np.float32))


def test_contained_box_is_in_front_even_when_depth_says_otherwise():
    depth = np.zeros((20, 20))
    depth[:, :] = 200  # the big box is nearer on average ...
    depth[6:9, 6:9] = 10  # ... than the small box inside it
    instance_map, classes, scores = paint([[5, 5, 10, 10], [0, 0, 20, 20]], [0.9, 0.8], [7, 3], depth)
    assert classes.tolist() == [3, 7]  # container first (index 0), contained on top (index 1)
    assert (instance_map[5:10, 5:10] == 1).all()
    assert (instance_map[0:5] == 0).all()
    assert scores.dtype == np.float16 and classes.dtype == np.uint16 and instance_map.dtype == np.uint8


@pytest.mark.parametrize("left_is_nearer", [True, False])
def test_overlapping_boxes_are_ordered_far_to_near_by_inverse_depth(left_is_nearer):
    depth = np.zeros((20, 20))
    depth[:, :10] = 250 if left_is_nearer else 20  # inverse depth: larger is nearer
    depth[:, 10:] = 20 if left_is_nearer else 250
    instance_map, classes, _ = paint([[0, 0, 12, 10], [8, 0, 20, 10]], [0.9, 0.9], [1, 2], depth)
    nearer = 1 if left_is_nearer else 2
    assert classes[-1] == nearer  # painted last, highest index
    assert instance_map[5, 9] == len(classes) - 1  # the overlap shows the nearer box
    assert (instance_map[10:] == BACKGROUND_ID).all()


def test_duplicates_keep_the_higher_score_and_distinct_boxes_survive():
    depth = np.ones((40, 40))
    # IoU([0,0,20,20],[0,0,20,21]) = 400/420 = 0.952 > 0.95: duplicate; [0,0,20,22] has 0.909: kept
    instance_map, classes, scores = paint([[0, 0, 20, 21], [0, 0, 20, 20], [0, 0, 20, 22]], [0.6, 0.9, 0.7], [1, 2, 3],
                                          depth)
    assert sorted(classes.tolist()) == [2, 3]
    assert np.allclose(sorted(scores.astype(float)), [0.7, 0.9], atol=1e-3)
    assert set(np.unique(instance_map)) == {0, 1, BACKGROUND_ID}


def test_more_than_255_boxes_keep_the_best_255_without_wrapping():
    depth = np.zeros((40, 40))
    cells = [(x, y) for y in range(0, 40, 2) for x in range(0, 40, 2)][:300]  # 300 disjoint 2x2 boxes
    boxes = [[x, y, x + 2, y + 2] for x, y in cells]
    scores = np.linspace(0.99, 0.5, 300)
    instance_map, classes, kept_scores = paint(boxes, scores, list(range(300)), depth)
    assert len(classes) == len(kept_scores) == 255
    assert set(classes.tolist()) == set(range(255))  # the 45 lowest scores were dropped
    assert instance_map.max() == BACKGROUND_ID and np.unique(instance_map[instance_map != BACKGROUND_ID]).size == 255
    assert (instance_map == BACKGROUND_ID).sum() == 40 * 40 - 255 * 4


def test_no_boxes_and_empty_boxes_give_an_all_background_map():
    for boxes in ([], [[3, 3, 3, 9], [-5, -5, -1, -1]]):  # zero area; wholly outside the frame
        instance_map, classes, scores = paint(boxes, [0.9] * len(boxes), [1] * len(boxes), np.zeros((16, 16)))
        assert (instance_map == BACKGROUND_ID).all() and instance_map.shape == (16, 16)
        assert classes.shape == (0,) and classes.dtype == np.uint16
        assert scores.shape == (0,) and scores.dtype == np.float16


# --- detection: the expert ----------------------------------------------------------------------


def depth_inputs(batch_size: int, resolution: int = R) -> dict:
    rng = np.random.default_rng(1)
    return {"depth": {"depth": rng.integers(0, 256, (batch_size, 1, resolution, resolution), dtype=np.uint8)}}


@pytest.mark.parametrize("kind", ["rt_detr", "detr"])
def test_objdet_labels_dtype_shape_range(models, kind):
    expert = loaded("objdet", models[kind], models["text"], threshold=0.0)  # random weights: keep everything
    assert expert.requires() == ("depth",)
    batch = torch.stack([expert.preprocess(image) for image in images()])
    out = expert.predict(batch, depth_inputs(3))
    spec = expert.spec("objdet")
    assert out["instances"].dtype == np.uint8 and out["instances"].shape == (3, *spec.array("instances").shape)
    assert len(out["classes"]) == len(out["scores"]) == 3
    for instance_map, classes, scores in zip(out["instances"], out["classes"], out["scores"]):
        assert classes.dtype == np.uint16 and scores.dtype == np.float16
        assert 1 <= len(classes) == len(scores) <= 255
        assert classes.max() < len(TINY_DETECTOR_CLASSES)
        ids = np.unique(instance_map)
        assert set(ids[ids != BACKGROUND_ID].tolist()) <= set(range(len(classes)))
    table = expert.tables()["objdet"]
    assert table.names == list(TINY_DETECTOR_CLASSES.values()) and table.embeddings.shape == (3, 64)
    assert spec.params["table_digest"] == table.digest


def test_objdet_is_deterministic_and_reads_depth_at_any_resolution(models):
    expert = loaded("objdet", models["rt_detr"], models["text"], threshold=0.0)
    batch = torch.stack([expert.preprocess(image) for image in images()])
    first = expert.predict(batch, depth_inputs(3))
    again = loaded("objdet", models["rt_detr"], models["text"], threshold=0.0).predict(batch, depth_inputs(3))
    assert first["instances"].tobytes() == again["instances"].tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first["classes"], again["classes"]))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first["scores"], again["scores"]))
    assert expert.predict(batch, depth_inputs(3, resolution=64))["instances"].shape == (3, 1, R, R)


def test_objdet_without_detections_gives_a_valid_empty_label(models):
    expert = loaded("objdet", models["rt_detr"], models["text"], threshold=1.0)
    out = expert.predict(torch.stack([expert.preprocess(images()[1])] * 2), depth_inputs(2))
    assert (out["instances"] == BACKGROUND_ID).all()
    assert [c.shape for c in out["classes"]] == [(0,), (0,)] and out["classes"][0].dtype == np.uint16
    assert [s.shape for s in out["scores"]] == [(0,), (0,)] and out["scores"][0].dtype == np.float16


def test_objdet_bad_inputs_raise(models, tmp_path):
    with pytest.raises(ExpertError, match="no such model directory"):
        loaded("objdet", str(tmp_path / "missing"), models["text"])
    with pytest.raises(ExpertError, match="cannot load an object detector"):
        loaded("objdet", models["coco"], models["text"])
    bare = save_tiny_detector(tmp_path / "bare")
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(ExpertError, match="preprocessor_config.json"):
        loaded("objdet", str(bare), models["text"])
    with pytest.raises(ExpertError, match="threshold"):
        get_expert("objdet", threshold=1.5)
    expert = loaded("objdet", models["rt_detr"], models["text"])
    with pytest.raises(ExpertError, match="depth"):
        expert.predict(torch.stack([expert.preprocess(images()[0])]), {})


def test_owlv2_detects_the_given_classes(models):
    expert = loaded("objdet", models["owlv2"], models["text"], classes="circle, square", threshold=0.0)
    assert expert.names == ["circle", "square"]
    batch = torch.stack([expert.preprocess(image) for image in images()[:2]])
    assert batch.shape == (2, 3, TINY_OWLV2_INPUT_SIZE, TINY_OWLV2_INPUT_SIZE)  # squashed, not padded
    out = expert.predict(batch, depth_inputs(2))
    spec = expert.spec("objdet")
    assert out["instances"].dtype == np.uint8 and out["instances"].shape == (2, *spec.array("instances").shape)
    for instance_map, classes, scores in zip(out["instances"], out["classes"], out["scores"]):
        assert classes.dtype == np.uint16 and scores.dtype == np.float16
        assert 1 <= len(classes) == len(scores) <= 255 and classes.max() < 2
        ids = np.unique(instance_map)
        assert set(ids[ids != BACKGROUND_ID].tolist()) <= set(range(len(classes)))
    table = expert.tables()["objdet"]
    assert table.names == ["circle", "square"] and table.embeddings.shape == (2, 64)
    assert spec.params["classes"] == "circle,square" and spec.params["table_digest"] == table.digest

    again = loaded("objdet", models["owlv2"], models["text"], classes="circle,square", threshold=0.0)
    repeat = again.predict(batch, depth_inputs(2))
    assert out["instances"].tobytes() == repeat["instances"].tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out["classes"], repeat["classes"]))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out["scores"], repeat["scores"]))
    assert again.spec("objdet") == spec
    swapped = loaded("objdet", models["owlv2"], models["text"], classes="square,circle", threshold=0.0)
    assert swapped.spec("objdet").preprocess_hash != spec.preprocess_hash


def test_classes_are_required_by_owlv2_and_refused_by_closed_set_detectors(models):
    with pytest.raises(ExpertError, match="needs the classes option"):
        loaded("objdet", models["owlv2"], models["text"])
    with pytest.raises(ExpertError, match="classes option is for open-vocabulary"):
        loaded("objdet", models["rt_detr"], models["text"], classes="circle,square")
    with pytest.raises(ExpertError, match="repeats a name"):
        get_expert("objdet", classes="circle,circle")
    with pytest.raises(ExpertError, match="over OWLv2's 32"):
        loaded("objdet", models["owlv2"], models["text"], classes="circle,an extraordinarily long class name")


# --- the shapes world's stand-ins ---------------------------------------------------------------


def test_fast_seg_standin_writes_a_checkpoint_seg_loads(models, tmp_path):
    from precompute.sources.shapes import SEG_CLASSES, ShapesWorld
    from worldmodels.seg import pretrain_seg

    world = ShapesWorld()
    metrics = pretrain_seg(tmp_path / "seg", world, resolution=64, fast=True)
    assert 0.0 <= metrics["miou"] <= 1.0 and (tmp_path / "seg" / "eval_results.json").exists()
    expert = loaded("seg-coco", str(tmp_path / "seg"), models["text"], resolution=64)
    assert expert.names == list(SEG_CLASSES) and expert.input_size == 64
    seg = expert.predict(torch.stack([expert.preprocess(world.render(world.scene("val", 0)))]), {})["seg"]
    assert seg.shape == (1, 1, 64, 64) and seg.max() < len(SEG_CLASSES)


def test_fast_objdet_standin_writes_a_checkpoint_objdet_loads(models, tmp_path):
    from precompute.sources.shapes import DETECTION_CLASSES, ShapesWorld
    from worldmodels.objdet import pretrain_objdet

    world = ShapesWorld()
    metrics = pretrain_objdet(tmp_path / "objdet", world, resolution=64, fast=True)
    assert 0.0 <= metrics["recall"] <= 1.0 and (tmp_path / "objdet" / "eval_results.json").exists()
    expert = loaded("objdet", str(tmp_path / "objdet"), models["text"], resolution=64, threshold=0.0)
    assert expert.names == list(DETECTION_CLASSES) and expert.input_size == 64
    out = expert.predict(torch.stack([expert.preprocess(world.render(world.scene("val", 0)))]), depth_inputs(1, 64))
    assert out["instances"].shape == (1, 1, 64, 64) and len(out["classes"][0]) >= 1


def test_a_text_encoder_path_that_is_not_there_is_named_not_looked_up_on_the_hub():
    """seg-coco's, objdet's and ocrdet's `text_encoder` option: a missing directory is that, in one line
    (it was "Repo id must be in the form 'repo_name' ..." from the hub client)."""
    from precompute.experts.class_embed import TextEmbedder

    with pytest.raises(ExpertError, match=r"^text encoder: /no/such/minilm: no such model directory$"):
        TextEmbedder("/no/such/minilm")
