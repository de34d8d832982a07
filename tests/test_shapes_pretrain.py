"""The shapes world's own pretrained models: trained briefly, saved, and loaded back by path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, OPTForCausalLM, PreTrainedTokenizerBase, RobertaForCausalLM

from precompute.shapes_pretrain import (
    VitConfig,
    build_vit,
    encode_texts,
    pretrain_all,
    pretrain_lm,
    save_vit,
    vit_transform,
)
from precompute.experts.video_audio import TimesformerClsExpert
from precompute.sources.shapes import ShapesWorld
from precompute.sources.shapes_video import ShapesVideoSource, ShapesVideoWorld


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out_dir = tmp_path_factory.mktemp("shapes-pretrain")
    paths = pretrain_all(out_dir, seed=0, fast=True)
    return {
        "vit": Path(paths["vit"]),
        "lm": Path(paths["lm"]),
        "roberta": Path(paths["roberta"]),
        "timesformer": Path(paths["timesformer"]),
        "report": out_dir / "pretrain.json",
    }


def world_texts(num_scenes: int = 20, world: ShapesWorld | None = None) -> list[str]:
    world = world or ShapesWorld(seed=0)
    texts = []
    for index in range(num_scenes):
        scene = world.scene("val", index)
        texts += world.captions(scene)
        texts += [q["question"] for q in world.questions(scene)]
    return texts


def test_saved_vit_loads_by_path_with_its_preprocessing(tmp_path: Path) -> None:
    world = ShapesWorld(seed=0, image_size=64)
    model = build_vit(world.image_size, VitConfig(), seed=1).eval()
    save_vit(model, tmp_path / "vit")

    loaded = timm.create_model(f"local-dir:{tmp_path / 'vit'}", pretrained=True).eval()

    cfg = loaded.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 64, 64)
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    assert repr(vit_transform(loaded)) == repr(vit_transform(model))  # same resize, crop, normalise
    assert (len(loaded.blocks), loaded.embed_dim, loaded.num_classes) == (6, VitConfig().embed_dim, 0)
    transform = vit_transform(loaded)
    pixels = torch.stack([transform(world.render(world.scene("val", i))) for i in range(4)])
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(pixels), model.forward_features(pixels))


def test_bad_sizes_fail_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size 60 is not a multiple of patch_size 8"):
        build_vit(60, VitConfig())
    with pytest.raises(ValueError, match="num_scenes >= 1"):
        pretrain_lm(tmp_path / "lm", [ShapesWorld()], num_scenes=0)
    assert not (tmp_path / "lm").exists()


def test_report_shows_both_models_learned(pretrained: dict[str, Path]) -> None:
    report = json.loads(pretrained["report"].read_text())
    vit, lm = report["vit"], report["lm"]
    assert vit["color_presence_accuracy"] > vit["color_presence_chance"] + 0.05
    assert vit["presence_exact_match"] > vit["presence_exact_match_chance"]
    assert vit["count_accuracy"] > vit["count_chance"] + 0.2
    vocab_size = len(AutoTokenizer.from_pretrained(pretrained["lm"]))
    assert 1 < lm["val_perplexity"] < vocab_size / 4  # a uniform guesser scores vocab_size
    assert report["seconds"] > 0 and math.isfinite(lm["train_loss"])


def test_fast_trained_vit_loads_by_path(pretrained: dict[str, Path]) -> None:
    model = timm.create_model(f"local-dir:{pretrained['vit']}", pretrained=True).eval()
    world = ShapesWorld(seed=0)
    transform = vit_transform(model)
    pixels = torch.stack([transform(world.render(world.scene("test", i))) for i in range(2)])
    with torch.no_grad():
        cls = model.forward_features(pixels)[:, 0]
    assert cls.shape == (2, 64) and torch.isfinite(cls).all()
    assert not torch.allclose(cls[0], cls[1])  # different scenes, different [CLS]


def test_tokenizer_round_trips_world_text_without_unknowns(pretrained: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pretrained["lm"])
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "</s>", "</s>", "<pad>", "<unk>"
    )
    assert tokenizer.padding_side == "left"
    for text in world_texts() + world_texts(world=ShapesVideoWorld(seed=0)):  # one LM reads both worlds
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    prompt = tokenizer("Question: Is there a RED circle? answer: yes")["input_ids"]
    assert prompt == tokenizer("question: is there a red circle? answer: yes")["input_ids"]
    assert tokenizer.unk_token_id in tokenizer("a zebra")["input_ids"]


def test_lm_loads_by_path_and_answers_with_a_world_answer(pretrained: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pretrained["lm"])
    model = OPTForCausalLM.from_pretrained(pretrained["lm"]).eval()
    world = ShapesWorld(seed=0)
    questions = [q for i in range(4) for q in world.questions(world.scene("test", i))]
    answer_words = {a for i in range(200) for q in world.questions(world.scene("train", i)) for a in q["answers"]}
    batch = tokenizer([f"question: {q['question']} answer:" for q in questions], return_tensors="pt", padding=True)

    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    replies = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(reply.split()[0] in answer_words for reply in replies), replies


def load_prismer_decoder(path: Path) -> RobertaForCausalLM:
    """As Prismer's trainer loads roberta-base: a causal decoder given new cross-attention layers."""
    return RobertaForCausalLM.from_pretrained(path, is_decoder=True, add_cross_attention=True).eval()


def left_padded_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """<s> prompt, left-padded, with no </s>: the model is asked for the next word."""
    rows = [[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row)
    return input_ids, (input_ids != tokenizer.pad_token_id).long()


def test_roberta_loads_as_a_decoder_with_new_cross_attention(pretrained: dict[str, Path]) -> None:
    saved = load_file(pretrained["roberta"] / "model.safetensors")
    model = load_prismer_decoder(pretrained["roberta"])
    tokenizer = AutoTokenizer.from_pretrained(pretrained["roberta"])

    config = model.config
    assert config.is_decoder and config.add_cross_attention
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    assert config.max_position_embeddings == tokenizer.model_max_length + 2
    assert all(hasattr(layer, "crossattention") for layer in model.roberta.encoder.layer)
    state = model.state_dict()
    decoder = model.lm_head.decoder  # tied, so not saved: the output projection is the input embedding
    assert decoder.weight.data_ptr() == model.roberta.embeddings.word_embeddings.weight.data_ptr()
    assert decoder.bias.data_ptr() == model.lm_head.bias.data_ptr()
    new = {name for name in state if name not in saved} - {"lm_head.decoder.weight", "lm_head.decoder.bias"}
    assert new and all(".crossattention." in name for name in new)  # nothing else left at random
    assert not any(".crossattention." in name for name in saved)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name

    image_tokens = torch.randn(2, 5, config.hidden_size)
    prompts = ["a picture of", "question: is there a red circle? answer:"]
    input_ids, attention_mask = left_padded_prompts(tokenizer, prompts)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens).logits
    assert logits.shape == (*input_ids.shape, len(tokenizer)) and torch.isfinite(logits).all()


def test_roberta_tokenizer_has_robertas_special_tokens(pretrained: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pretrained["roberta"])
    special = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert special == (0, 1, 2, 3)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>") and tokenizer.padding_side == "left"
    question = "is there a red circle?"
    ids = tokenizer(question)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == question
    for text in [*world_texts(), "A picture of a red circle"]:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text
    input_ids, _ = encode_texts(tokenizer, [question])
    assert input_ids[0].tolist() == ids  # training texts are framed <s> ... </s> once, as the tokenizer does


def test_roberta_report_beats_a_uniform_guess(pretrained: dict[str, Path]) -> None:
    roberta = json.loads(pretrained["report"].read_text())["roberta"]
    vocab_size = len(AutoTokenizer.from_pretrained(pretrained["roberta"]))
    assert 1 < roberta["val_perplexity"] < vocab_size / 4  # a uniform guesser scores vocab_size
    assert math.isfinite(roberta["train_loss"]) and roberta["num_texts"] > 0


def test_roberta_puts_its_probability_on_answers(pretrained: dict[str, Path]) -> None:
    """Blind, it cannot know the answer, but it has learned that an answer word follows "answer:",
    and which answers are likely; left padding does not move its positions."""
    tokenizer = AutoTokenizer.from_pretrained(pretrained["roberta"])
    model = load_prismer_decoder(pretrained["roberta"])
    world = ShapesWorld(seed=0)
    questions = [q for i in range(10) for q in world.questions(world.scene("test", i))]
    answer_words = sorted(
        {a for i in range(200) for q in world.questions(world.scene("train", i)) for a in q["answers"]}
    )
    answer_ids = torch.tensor(tokenizer.convert_tokens_to_ids(answer_words))
    correct_ids = torch.tensor(
        tokenizer.convert_tokens_to_ids([max(set(q["answers"]), key=q["answers"].count) for q in questions])
    )
    prompts = [f"question: {q['question']} answer:" for q in questions]
    input_ids, attention_mask = left_padded_prompts(tokenizer, prompts)

    with torch.no_grad():
        next_word = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1].softmax(-1)
        unpadded = input_ids[0, attention_mask[0].bool()][None]
        alone = model(input_ids=unpadded).logits[0, -1].softmax(-1)

    assert attention_mask[0].sum() < attention_mask.shape[1]  # the first row really is padded
    torch.testing.assert_close(next_word[0], alone, atol=1e-5, rtol=1e-4)
    vocab_size = len(tokenizer)
    assert next_word[:, answer_ids].sum(-1).mean() > 2 * len(answer_words) / vocab_size
    assert next_word.gather(1, correct_ids[:, None]).mean() > 2 / vocab_size


def test_timesformer_standin_loads_in_its_expert_by_path(pretrained: dict[str, Path]) -> None:
    """The video stand-in is what `--expert timesformer-cls --model DIR` loads: its own processor
    config, its 8 trained frames, 6 levels of [CLS]; the report scores it against chance."""
    expert = TimesformerClsExpert(model=str(pretrained["timesformer"]))
    expert.load()
    source = ShapesVideoSource(None, "test", num=2)
    clips = torch.stack([expert.preprocess(expert.read_input(source, sample)) for sample in source.samples()])
    cls = expert.predict(clips, {})["cls"]
    assert cls.shape == (2, 6, 64) and np.isfinite(cls).all() and not np.allclose(cls[0], cls[1])
    params = expert.spec("timesformer-cls").params
    assert (params["image_processor"], params["trained_num_frames"], params["num_frames"]) == ("checkpoint", 8, 8)
    report = json.loads(pretrained["report"].read_text())["timesformer"]
    scores = ("direction_accuracy", "direction_chance", "color_presence_accuracy", "count_accuracy", "count_chance")
    assert all(0 <= report[name] <= 1 for name in scores), report  # fast: seconds of training, no promise beyond chance
