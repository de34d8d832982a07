"""`trainer fit/eval --method mope` on caches the real engine writes: shapes' fusion task (image main
modality with text-cls, text main modality with image-pooled) and an MM-IMDb-layout dataset
(multi-label F1), with tiny real ViT / BERT models saved to disk and loaded by path."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cache_schema import SplitReader
from conftest import save_tiny_bert
from precompute.engine import RunConfig, run
from precompute.sources.mmimdb import GENRES
from precompute.sources.shapes import MATERIAL_TEMPLATES, MATERIALS
from trainer.config import ConfigError, TrainConfig
from trainer.data import pick_view, train_batches, training_examples
from trainer.loop import evaluate_checkpoint, fit
from trainer.methods import MethodError, get_method

MAX_LENGTH = 16


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    words = " ".join(MATERIAL_TEMPLATES).replace("{material}", " ".join(MATERIALS)).split()
    return save_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert", words + ["plot", "movie", "love", "war"])


def precompute(cache: Path, source: str, split: str, experts: str, models: dict[str, Path], data_root: Path | None = None,
               **source_options) -> None:
    summaries = run(RunConfig(experts=experts.split(","), source=source, split=split, cache=str(cache), data_root=data_root,
                              models={k: str(v) for k, v in models.items()}, shard_size=32, batch_size=16,
                              source_options=source_options,
                              expert_options={"rgb": {"resolution": 32}, "text-cls": {"max_length": MAX_LENGTH},
                                              "text-tokens": {"max_length": MAX_LENGTH}, "image-pooled": {"views": 2}}),
              progress=False)
    assert all(not s.shards_failed for s in summaries)


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory, tiny_vit_dir, bert_dir, ray_local) -> Path:
    cache = tmp_path_factory.mktemp("mope") / "cache"
    models = {"text-cls": bert_dir, "text-tokens": bert_dir, "image-pooled": tiny_vit_dir}
    for split, num in (("train", 64), ("val", 32)):
        precompute(cache, "shapes", split, "rgb,text-cls,text-tokens,image-pooled", models, num=num, image_size=32)
    return cache


def make_config(cache: Path, out: Path, encoder: Path, eval_every: int = 4, **model) -> TrainConfig:
    return TrainConfig(method="mope", cache=str(cache), out=str(out), batch_size=16, epochs=2, lr=1e-2, warmup_steps=2,
                       num_workers=0, eval_every=eval_every, log_every=2, save_every=100,
                       model={"encoder": str(encoder), "prompt_length": 2, "num_experts": 4, **model})


def test_fit_trains_only_prompts_routers_mapper_head_and_eval_reproduces(shapes_cache, tiny_vit_dir, tmp_path, caplog):
    out = tmp_path / "run"
    config = make_config(shapes_cache, out, tiny_vit_dir)
    config.log_to = ["jsonl", "tensorboard"]
    with caplog.at_level(logging.INFO, logger="trainer"):
        metrics = fit(config, progress=False)
    assert "trainable parameters" in caplog.text
    assert set(metrics) >= {"accuracy", "routing_entropy", "importance_cv", "expert_importance"}
    assert 0 <= metrics["accuracy"] <= 100 and len(metrics["expert_importance"]) == 4
    assert sum(metrics["expert_importance"]) == pytest.approx(1.0, abs=1e-3)
    checkpoint = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert checkpoint["method_state"]["classes"][0] == "one wood" and len(checkpoint["method_state"]["classes"]) == 9
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoint" / "model.safetensors")
    assert saved and all(name.startswith(("prompts.", "head.")) for name in saved)
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals) >= 2 and all("expert_importance" in record["eval"] for record in evals)
    assert (out / "importance.png").stat().st_size > 5_000
    assert_tensorboard_holds_the_run(out / "tensorboard", evals)
    again = evaluate_checkpoint(str(shapes_cache), out / "checkpoint", "val", [])
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    assert again["expert_importance"] == pytest.approx(metrics["expert_importance"], abs=1e-4)


def assert_tensorboard_holds_the_run(directory: Path, evals: list[dict]) -> None:
    """The event files, read back by TensorBoard's own reader: the scalars log.jsonl has, the config, the figure."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/examples_per_s", "eval/accuracy", "eval/routing_entropy"} <= set(tags["scalars"])
    logged = [json.loads(line) for line in (directory.parent / "log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == losses
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [
        (r["step"], pytest.approx(r["eval"]["accuracy"])) for r in evals]
    assert [e.step for e in events.Images("importance")] == [r["step"] for r in evals]
    assert events.Images("importance")[-1].encoded_image_string.startswith(b"\x89PNG")
    [text] = [e for e in events.Tensors("config/text_summary")]
    assert b"method: mope" in text.tensor_proto.string_val[0]


def test_frozen_encoder_is_bit_identical_after_training_steps(shapes_cache, tiny_vit_dir, tmp_path):
    """The loop's own pieces (method.param_groups, AdamW with weight decay, method.loss) for a few steps."""
    config = make_config(shapes_cache, tmp_path / "run", tiny_vit_dir)
    method = get_method(config)
    reader = SplitReader(shapes_cache, "shapes", "train")
    method.check_cache(reader)
    method.restore_state(method.derive_state(reader))
    model = method.build_model(reader).train()
    frozen_before = {name: t.clone() for name, t in model.encoder.state_dict().items()}
    trained_before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(method.param_groups(model), weight_decay=0.1)
    examples = reader.torch_dataset(method.feature_fields(), lambda a: method.expand(a, train=True))
    for batch in list(DataLoader(examples, batch_size=16, collate_fn=method.collate))[:3]:
        method.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(t, frozen_before[name]) for name, t in model.encoder.state_dict().items())
    changed = [name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trained_before[name])]
    assert any(name.startswith("prompts.static") for name in changed) and any(name.startswith("prompts.experts") for name in changed)
    assert any(name.startswith("prompts.routers") for name in changed) and "head.weight" in changed


def test_routing_statistics_are_what_evaluate_returns_not_state_kept_on_the_method(shapes_cache, tiny_vit_dir, tmp_path):
    """`evaluate` returns the routing statistics of the split it just ran over; `score` over records
    alone has none, whatever was evaluated before it: the method keeps nothing between calls."""
    method = get_method(make_config(shapes_cache, tmp_path / "run", tiny_vit_dir))
    reader = SplitReader(shapes_cache, "shapes", "val")
    method.check_cache(reader)
    method.restore_state(method.derive_state(SplitReader(shapes_cache, "shapes", "train")))
    model = method.build_model(reader).eval()
    examples = reader.torch_dataset(method.feature_fields(), lambda a: method.expand(a, train=False))
    attributes = set(vars(method))
    with torch.no_grad():
        metrics, predictions = method.evaluate(model, DataLoader(examples, batch_size=16, collate_fn=method.collate))
        first_eight = torch.utils.data.Subset(examples, range(8))
        few, _ = method.evaluate(model, DataLoader(first_eight, batch_size=8, collate_fn=method.collate))
    assert {"routing_entropy", "importance_cv", "expert_importance"} <= set(metrics) and len(predictions) == 32
    assert few["expert_importance"] != metrics["expert_importance"]  # each call's own split
    assert method.score(predictions) == {"accuracy": metrics["accuracy"]}  # not the last call's routing
    assert set(vars(method)) == attributes


def test_text_main_modality_prompts_the_text_encoder_with_the_image_embedding(shapes_cache, bert_dir, tmp_path):
    metrics = fit(make_config(shapes_cache, tmp_path / "run", bert_dir, modality="text", eval_every=0), progress=False)
    assert "accuracy" in metrics and "routing_entropy" in metrics


def test_text_main_modality_trains_on_the_image_embeddings_cached_views(shapes_cache, bert_dir, tmp_path):
    """`model.views=true` with image-pooled views=2 (the fixture's): each epoch, each sample's
    complementary embedding is its clean one or one of its 2 views, `pick_view`'s draw; evaluation
    reads the clean one; and it trains."""
    config = make_config(shapes_cache, tmp_path / "run", bert_dir, modality="text", eval_every=0, views=True)
    method = get_method(config)
    reader = SplitReader(shapes_cache, "shapes", "train")
    method.check_cache(reader)
    stored = reader.feature("image-pooled")
    state = {"epoch": 0, "batch_in_epoch": 0}
    views = set()
    for batch in train_batches(training_examples(reader, method, config), method, config, state):
        if state["epoch"] == 2:
            break
        for item, embedding in zip(batch["items"], batch["complementary"]):
            view = pick_view(config.seed, item["key"], state["epoch"], 3)
            row = stored.get_by_key(item["key"])
            torch.testing.assert_close(embedding, torch.from_numpy(row["pooled"] if view == 0 else row["views"][view - 1]).float())
            views.add(view)
    assert views == {0, 1, 2}
    assert "complementary" in method.feature_fields() and method.feature_fields()["complementary"] == "image-pooled/pooled"
    metrics = fit(config, progress=False)
    assert "accuracy" in metrics


@pytest.mark.parametrize("variant, model", [
    ("P-ImgOnly", {"prompts": ["static"], "complementary": None}),
    ("P-SequentialFuse", {"prompts": ["static", "mapped"]}),
    ("P-LateConcat", {"prompts": ["static"], "late_concat": True}),
])
def test_the_papers_baselines_are_configurations_of_the_same_code(shapes_cache, tiny_vit_dir, tmp_path, variant, model):
    out = tmp_path / variant
    metrics = fit(make_config(shapes_cache, out, tiny_vit_dir, eval_every=0, **model), progress=False)
    assert "accuracy" in metrics and "routing_entropy" not in metrics  # no dynamic prompt, no router
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoint" / "model.safetensors")
    assert not any(name.startswith(("prompts.experts", "prompts.routers")) for name in saved)
    head_inputs = saved["head.weight"].shape[1]
    assert head_inputs == 32 + (32 if model.get("late_concat") else 0)  # ViT width (+ tiny BERT's [CLS] width)


@pytest.mark.parametrize("model, error, message", [
    ({"complementary": "vit-cls"}, MethodError, "no 'vit-cls' feature"),
    ({"complementary": "text-tokens"}, MethodError, "one embedding per sample"),
    ({"prompts": ["static", "deep"]}, ConfigError, "model.prompts: should be 'static', 'dynamic' or 'mapped', got 'deep'"),
    ({"num_experts_typo": 3}, ConfigError, "model.num_experts_typo: unknown key"),
    ({"modality": "audio"}, ConfigError, "model.modality: should be 'image' or 'text'"),
    ({"prompts": ["dynamic"], "complementary": None}, MethodError, "need a complementary embedding"),
])
def test_bad_configs_are_refused_before_training(shapes_cache, tiny_vit_dir, tmp_path, model, error, message):
    with pytest.raises(error, match=re.escape(message)):
        fit(make_config(shapes_cache, tmp_path / "run", tiny_vit_dir, **model), progress=False)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_text_tokens_from_another_tokenizer_are_refused(shapes_cache, tiny_vit_dir, tmp_path):
    other = save_tiny_bert(tmp_path / "other-bert", ["wood", "glass", "metal"], seed=1)
    with pytest.raises(MethodError, match="tokenizer"):
        fit(make_config(shapes_cache, tmp_path / "run", other, modality="text"), progress=False)


def test_a_source_without_classes_is_refused(shapes_cache, tiny_vit_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(shapes_cache, cache)
    split_json = cache / "shapes" / "train" / "split.json"
    header = json.loads(split_json.read_text())
    header["source_info"].pop("classes")  # what a captioning source (coco) records
    split_json.write_text(json.dumps(header))
    with pytest.raises(MethodError, match="records no classes"):
        fit(make_config(cache, tmp_path / "run", tiny_vit_dir), progress=False)


def write_mmimdb(root: Path, count: int = 48) -> None:
    """MM-IMDb's published layout (split.json, dataset/ID.json with plot + genres, dataset/ID.jpeg)."""
    rng = np.random.default_rng(0)
    ids = [f"{index:07d}" for index in range(count)]
    for movie_id in ids:
        genres = sorted({GENRES[i] for i in rng.choice(3, size=int(rng.integers(1, 3)), replace=False)})
        plot = " ".join(rng.choice(["plot", "movie", "love", "war"], size=6))
        (root / "dataset").mkdir(parents=True, exist_ok=True)
        (root / "dataset" / f"{movie_id}.json").write_text(json.dumps({"plot": [plot], "genres": genres}))
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(root / "dataset" / f"{movie_id}.jpeg")
    (root / "split.json").write_text(json.dumps({"train": ids[:32], "dev": ids[32:40], "test": ids[40:]}))


def test_multi_label_mmimdb_scores_f1(tmp_path, tiny_vit_dir, bert_dir, ray_local):
    root, cache = tmp_path / "mmimdb", tmp_path / "cache"
    write_mmimdb(root)
    for split in ("train", "val"):
        precompute(cache, "mmimdb", split, "rgb,text-cls", {"text-cls": bert_dir}, data_root=root)
    metrics = fit(make_config(cache, tmp_path / "run", tiny_vit_dir, eval_every=0), progress=False)
    assert set(metrics) >= {"f1_macro", "f1_micro"} and "accuracy" not in metrics
    predictions = [json.loads(line) for line in (tmp_path / "run" / "checkpoint" / "predictions-val.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and all(len(p["probabilities"]) == len(GENRES) for p in predictions)
    assert all(isinstance(p["label"], list) for p in predictions)
