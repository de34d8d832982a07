"""`trainer fit/eval --method prismer` on a real (small) cache of RGB + every Prismer label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from cache_schema import ArraySpec, CacheWriter, ClassTable, FeatureSpec, SplitPlan, SplitReader, write_table
from cache_schema.torch_data import CacheDataset
from precompute.sources.shapes import DETECTION_CLASSES, SEG_CLASSES, ShapesSource, ShapesWorld
from trainer.cli import main as trainer_main
from trainer.config import ConfigError, TrainConfig
from trainer.loop import evaluate_checkpoint, fit
from trainer.methods import MethodError, get_method

R = 32  # the frame: the tiny ViT's input size, so no resize
ALL = ["depth", "normal", "edge", "seg-coco", "objdet", "ocrdet"]


def label_specs() -> dict[str, tuple[ArraySpec, ...]]:
    return {
        "rgb": (ArraySpec("rgb", "uint8", (3, R, R)),),
        "depth": (ArraySpec("depth", "uint8", (1, R, R)),),
        "normal": (ArraySpec("normal", "uint8", (3, R, R)),),
        "edge": (ArraySpec("edge", "uint8", (1, R, R)),),
        "seg-coco": (ArraySpec("seg", "uint8", (1, R, R)),),
        "objdet": (ArraySpec("instances", "uint8", (1, R, R)), ArraySpec("classes", "uint16", (255,), ragged=True),
                   ArraySpec("scores", "float16", (255,), ragged=True)),
        "ocrdet": (ArraySpec("words", "uint8", (1, R, R)), ArraySpec("text", "str", ()),
                   ArraySpec("embeddings", "float16", (255, 64), ragged=True)),
    }


def labels_of(world: ShapesWorld, split: str, index: int) -> dict[str, object]:
    """What the experts would have cached for one scene, from the world's exact truth."""
    scene = world.scene(split, index)
    truth = world.truth(scene, R)
    image = np.asarray(world.render(scene).resize((R, R), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    depth = (truth["inverse_depth"] * 255).astype(np.uint8)[None]
    words = np.full((1, R, R), 255, np.uint8)
    if truth["words"]:
        x0, y0, x1, y1 = (truth["word_boxes"][0] * R).astype(int)
        words[0, y0 : y1 + 1, x0 : x1 + 1] = 0
    rng = np.random.default_rng(index)
    return {
        "rgb": {"rgb": image},
        "depth": {"depth": depth},
        "normal": {"normal": np.full((3, R, R), 128, np.uint8)},
        "edge": {"edge": (255 - 255 * truth["edges"]).astype(np.uint8)[None]},
        "seg-coco": {"seg": truth["classes"][None]},
        "objdet": {"instances": truth["instances"][None], "classes": truth["box_classes"].astype(np.uint16),
                   "scores": np.ones(len(truth["box_classes"]), np.float16)},
        "ocrdet": {"words": words, "text": "\n".join(truth["words"]),
                   "embeddings": rng.standard_normal((len(truth["words"]), 64)).astype(np.float16)},
    }


def write_prismer_cache(root: Path, split: str, num: int, features=("rgb", *ALL), resolution: dict | None = None,
                        annotate=None) -> None:
    """`annotate(world, split, index, annotations)`, when given, returns the annotations to cache for a sample."""
    source = ShapesSource(None, split, num=num)
    samples = source.samples()
    annotations = [s.annotations if annotate is None else annotate(source.world, split, i, s.annotations)
                   for i, s in enumerate(samples)]
    plan = SplitPlan("shapes", split, [s.key for s in samples], annotations, shard_size=8)
    writer = CacheWriter(root)
    writer.prepare_split(plan)
    per_sample = [labels_of(source.world, split, i) for i in range(num)]
    for feature in features:
        params = {"resolution": (resolution or {}).get(feature, R)}
        if feature == "objdet":
            params["table"] = "objdet"
        spec = FeatureSpec(feature, feature, f"test-{feature}", "r0", "p0", label_specs()[feature], params)
        writer.prepare_feature(plan, spec)
        for shard in range(plan.num_shards):
            start, stop = plan.shard_range(shard)
            arrays = {}
            for array in spec.arrays:
                values = [per_sample[i][feature][array.name] for i in range(start, stop)]
                arrays[array.name] = np.stack(values) if not array.ragged and array.dtype != "str" else values
            writer.write_shard("shapes", split, spec, shard, start, plan.shard_keys(shard), arrays,
                               np.ones(stop - start, bool), {}, 0.1, "cpu")
    rng = np.random.default_rng(0)
    for name, classes in (("seg-coco", SEG_CLASSES), ("objdet", DETECTION_CLASSES)):
        table = ClassTable(list(classes), rng.standard_normal((len(classes), 64)).astype(np.float16),
                           np.zeros(8, np.float32), np.zeros((64, 8), np.float32), {"text_encoder": "test"})
        write_table(root, name, table)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("prismer") / "cache"
    write_prismer_cache(root, "train", 24)
    write_prismer_cache(root, "val", 8)
    return root


def make_config(cache: Path, out: Path, vit: Path, lm: Path, **model) -> TrainConfig:
    options = {"vision": str(vit), "lm": str(lm), "experts": ALL, "num_latents": 8, "resampler_heads": 4,
               "num_candidates": 4, "max_new_tokens": 3, "num_beams": 2, **model}
    return TrainConfig(method="prismer", cache=str(cache), out=str(out), batch_size=8, max_steps=3, warmup_steps=1,
                       lr=1e-3, num_workers=0, save_every=2, log_every=1, max_eval_examples=16, model=options)


def test_batches_carry_aligned_rgb_and_every_label(cache, tiny_vit_dir, tiny_roberta_dir, tmp_path):
    method = get_method(make_config(cache, tmp_path, tiny_vit_dir, tiny_roberta_dir))
    reader = SplitReader(cache, "shapes", "train")
    method.check_cache(reader)
    method.build_model(reader)
    examples = reader.torch_dataset(method.feature_fields(), lambda a: method.expand(a, train=False))
    batch = method.collate([examples[i] for i in range(5)])
    assert batch["rgb"].shape == (5, 3, R, R)
    labels = batch["expert_labels"]
    assert labels["depth"].shape == (5, 1, R, R) and labels["normal"].shape == (5, 3, R, R)
    assert labels["depth"].min() >= -1 and labels["depth"].max() <= 1
    ids, vocab = labels["objdet"]
    assert ids.shape == (5, R, R) and vocab.shape == (5, 256, 64)
    world = ShapesWorld()
    scene = world.scene("train", 0)
    # instance i of scene 0 reads the table row of its detection class; background reads zeros
    table = method.vocabularies["objdet"]
    for i, obj in enumerate(scene.objects):
        assert np.allclose(vocab[0, i].numpy(), table[DETECTION_CLASSES.index(f"{obj.color} {obj.shape}")])
    assert vocab[0, 255].abs().sum() == 0
    seg_ids, seg_vocab = labels["seg-coco"]
    assert seg_ids.max() < len(SEG_CLASSES) and seg_vocab[0, 255].abs().sum() == 0
    assert batch["items"][0]["prompts"][0].startswith("question: ") and batch["image_index"].tolist() == [0, 1, 2, 3, 4]
    train = method.collate([reader.torch_dataset(method.feature_fields(), lambda a: method.expand(a, train=True))[0]])
    assert train["image_index"].tolist() == [0] * 5 and train["input_ids"].shape[0] == 5  # five questions, one image


def test_fit_trains_small_parts_and_eval_reproduces_from_the_checkpoint(cache, tiny_vit_dir, tiny_roberta_dir, tmp_path):
    out = tmp_path / "run"
    metrics = fit(make_config(cache, out, tiny_vit_dir, tiny_roberta_dir), progress=False)
    assert 0 <= metrics["vqa_accuracy"] <= 100
    checkpoint = out / "checkpoint"
    tensors = load_file(checkpoint / "model.safetensors")
    trained_parts = ("vision.stems.", "vision.resampler.", "vision.adaptors.", "vision.instance_embedding",
                     "vision.readouts.", "vision_projection.")
    assert all(name.startswith(trained_parts) or ".crossattention." in name for name in tensors)
    assert any(name.startswith("vision.resampler.") for name in tensors) and not any("vision.vit." in n for n in tensors)
    # the stems' BatchNorm statistics are trained state: eval mode normalises with them
    assert any(name.startswith("vision.stems.") and name.endswith(".running_var") for name in tensors)
    info = json.loads((checkpoint / "checkpoint.json").read_text())
    assert set(info["backbones"]) == {"vision", "lm"}
    answers = info["method_state"]["answer_list"]
    assert "yes" in answers and len(answers) == len(set(answers))
    again = evaluate_checkpoint(str(cache), checkpoint, "val", [])
    assert again == metrics
    predictions = [json.loads(line) for line in (checkpoint / "predictions-val.jsonl").read_text().splitlines()]
    assert len(predictions) == 16 and all(p["prediction"] in answers for p in predictions)


def test_no_experts_is_the_rgb_only_baseline_with_the_same_latents(cache, tiny_vit_dir, tiny_roberta_dir, tmp_path):
    """The baseline trains the resampler's latents and read-outs too (no stems: no expert input); the
    trainable count of each run is in checkpoint.json. baseline_latents=false is the bare ViT."""
    out = tmp_path / "run"
    fit(make_config(cache, out, tiny_vit_dir, tiny_roberta_dir, experts=[]), progress=False)
    tensors = load_file(out / "checkpoint" / "model.safetensors")
    assert not any(name.startswith("vision.stems.") for name in tensors)
    assert "vision.readouts.0.weight" in tensors and "vision.resampler.latents" in tensors
    info = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert info["trainable_parameters"] == sum(t.numel() for t in tensors.values())
    bare = tmp_path / "bare"
    fit(make_config(cache, bare, tiny_vit_dir, tiny_roberta_dir, experts=[], baseline_latents=False), progress=False)
    assert not any(name.startswith(("vision.resampler.", "vision.readouts.")) for name in load_file(bare / "checkpoint" / "model.safetensors"))


def test_expert_lr_gives_the_expert_side_its_own_rate(cache, tiny_vit_dir, tiny_roberta_dir, tmp_path):
    """model.expert_lr: stems, resampler, read-outs, the decoder's latent readers and instance embeddings in one group at that rate,
    every other trained part at `lr`; together exactly the trainable parameters. A bad value is refused."""
    method = get_method(make_config(cache, tmp_path, tiny_vit_dir, tiny_roberta_dir, expert_lr=5e-3))
    model = method.build_model(SplitReader(cache, "shapes", "train"))
    rest, expert_side = method.param_groups(model)
    assert (rest["lr"], expert_side["lr"]) == (1e-3, 5e-3)
    expert_ids = {id(p) for p in expert_side["params"]}
    assert expert_ids == {id(p) for p in [*model.vision.stems.parameters(), *model.vision.resampler.parameters(),
                                          *model.vision.readouts.parameters(), model.vision.instance_embedding,
                                          *(p for layer in model.lm.roberta.encoder.layer
                                            for p in layer.crossattention.latent_reader.parameters())]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert expert_ids | {id(p) for p in rest["params"]} == trainable and not expert_ids & {id(p) for p in rest["params"]}
    assert len(get_method(make_config(cache, tmp_path, tiny_vit_dir, tiny_roberta_dir)).param_groups(model)) == 1
    with pytest.raises(ConfigError, match="model.expert_lr: should be a valid number"):
        get_method(make_config(cache, tmp_path, tiny_vit_dir, tiny_roberta_dir, expert_lr="fast"))


def test_shuffled_experts_read_another_samples_labels_deterministically(cache, tiny_vit_dir, tiny_roberta_dir, tmp_path):
    """model.shuffle_experts: every expert field comes from one other usable sample (the same one for
    all of a sample's labels), a function of the seed; RGB and questions stay the sample's own."""
    reader = SplitReader(cache, "shapes", "train")

    def examples(seed: int, shuffle: bool) -> CacheDataset:
        config = make_config(cache, tmp_path, tiny_vit_dir, tiny_roberta_dir, shuffle_experts=shuffle)
        config.seed = seed
        method = get_method(config)
        return reader.torch_dataset(method.feature_fields(), lambda a: method.expand(a, train=True),
                                    sources=method.feature_sources)

    own, shuffled, again, other_seed = examples(0, False), examples(0, True), examples(0, True), examples(1, True)
    assert set(shuffled.sources) == set(own.arrays) - {"rgb"}
    sources = shuffled.sources["depth"]
    assert sorted(sources.tolist()) == list(range(reader.num_samples))  # a permutation ...
    assert all(sources[i] != i for i in range(reader.num_samples))  # ... with no sample reading itself
    assert np.array_equal(sources, again.sources["depth"]) and not np.array_equal(sources, other_seed.sources["depth"])
    for i in range(reader.num_samples):
        mine, theirs = shuffled[i], own[int(sources[i])]
        assert np.array_equal(mine["rgb"], own[i]["rgb"]) and mine["prompts"] == own[i]["prompts"]
        for name in ("depth", "normal", "seg-coco", "objdet", "objdet:classes", "ocrdet", "ocrdet:embeddings"):
            assert np.array_equal(mine[name], theirs[name]), name
    assert sum(not np.array_equal(shuffled[i]["depth"], own[i]["depth"]) for i in range(reader.num_samples)) > 0.8 * reader.num_samples
    # evaluation reads through the same hook: the run's eval split is deranged by the same seed
    out = tmp_path / "shuffled"
    metrics = fit(make_config(cache, out, tiny_vit_dir, tiny_roberta_dir, shuffle_experts=True), progress=False)
    assert 0 <= metrics["vqa_accuracy"] <= 100
    with pytest.raises(ConfigError, match="shuffle_experts needs experts"):
        get_method(make_config(cache, tmp_path, tiny_vit_dir, tiny_roberta_dir, experts=[], shuffle_experts=True))


def test_captioning_and_open_ended_vqa_generate(cache, tiny_vit_dir, tiny_roberta_dir, tmp_path):
    captions = fit(make_config(cache, tmp_path / "caption", tiny_vit_dir, tiny_roberta_dir, experts=["depth"],
                               task="caption", caption_prompt="a picture of"), progress=False)
    assert {"BLEU-4", "CIDEr"} <= set(captions)
    generated = fit(make_config(cache, tmp_path / "generate", tiny_vit_dir, tiny_roberta_dir, experts=["seg-coco"],
                                inference="generate"), progress=False)
    assert 0 <= generated["vqa_accuracy"] <= 100


def test_bad_experts_or_models_are_refused_before_training(tmp_path, tiny_vit_dir, tiny_roberta_dir, tiny_lm_dir):
    root = tmp_path / "cache"
    write_prismer_cache(root, "train", 8, features=("rgb", "depth", "edge"), resolution={"edge": 16})
    with pytest.raises(MethodError, match=r"no cached 'normal'.*precompute run --expert normal"):
        fit(make_config(root, tmp_path / "a", tiny_vit_dir, tiny_roberta_dir, experts=["depth", "normal"]), progress=False)
    with pytest.raises(MethodError, match="edge labels are 16 px but rgb is 32 px"):
        fit(make_config(root, tmp_path / "b", tiny_vit_dir, tiny_roberta_dir, experts=["edge"]), progress=False)
    with pytest.raises(ConfigError, match=r"model.experts: unknown expert\(s\) \[.sonar.\]"):
        get_method(make_config(root, tmp_path / "c", tiny_vit_dir, tiny_roberta_dir, experts=["sonar"]))
    with pytest.raises(MethodError, match=r"model.vision: .*no-vit does not exist \(a local path"):
        fit(make_config(root, tmp_path / "e", tmp_path / "no-vit", tiny_roberta_dir, experts=["depth"]), progress=False)
    with pytest.raises(MethodError, match=r"model.lm: .*no-lm does not exist \(a local path"):
        get_method(make_config(root, tmp_path / "f", tiny_vit_dir, tmp_path / "no-lm"))
    with pytest.raises(MethodError, match="not a RoBERTa checkpoint"):
        fit(make_config(root, tmp_path / "g", tiny_vit_dir, tiny_lm_dir, experts=["depth"]), progress=False)
    assert not (tmp_path / "a" / "checkpoint").exists()
    code = trainer_main(["fit", "--cache", str(root), "--method", "prismer", "--out", str(tmp_path / "d"),
                         f"model.vision={tiny_vit_dir}", f"model.lm={tiny_roberta_dir}", "model.experts=[depth,normal]"])
    assert code == 2
