"""eP-ALM model: injection schedule, freezing, causality, KV-cache generation, beam search, padding.

Every test runs on a tiny real OPT saved with save_pretrained and loaded back by path.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DynamicCache, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from trainer.checkpoint import load_trainable, trainable_state
from trainer.methods import MethodError
from trainer.methods.epalm import EPALM, EPALMConfig
from trainer.methods.text import encode_batch

VOCAB_SIZE = 100
VISUAL_DIM = 8
PAD, EOS = 1, 2


def tiny_opt_config(num_layers: int = 4, **overrides) -> OPTConfig:
    settings = dict(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=num_layers, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, dropout=0.0, init_std=0.1, pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS,
    )
    settings.update(overrides)
    return OPTConfig(**settings)


def save_tiny_opt(path: Path, config: OPTConfig) -> str:
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def opt_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Pre-LayerNorm OPT, like opt-125m and opt-2.7b."""
    return save_tiny_opt(tmp_path_factory.mktemp("models") / "tiny-opt", tiny_opt_config())


@pytest.fixture(scope="session")
def opt_350m_like_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Post-LayerNorm OPT with project_in/project_out, like opt-350m."""
    config = tiny_opt_config(word_embed_proj_dim=16, do_layer_norm_before=False)
    return save_tiny_opt(tmp_path_factory.mktemp("models") / "tiny-opt-350m-like", config)


def make_model(lm_path: str, seed: int = 0, **overrides) -> EPALM:
    torch.manual_seed(seed)
    settings = dict(lm=lm_path, visual_dim=VISUAL_DIM, num_levels=2, prompt_length=3)
    settings.update(overrides)
    return EPALM(EPALMConfig(**settings)).eval()


def random_visual(batch_size: int, num_levels: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, num_levels, VISUAL_DIM, generator=torch.Generator().manual_seed(seed))


def random_ids(batch_size: int, length: int, seed: int = 2) -> torch.Tensor:
    """Token ids that are neither pad nor eos."""
    return torch.randint(3, VOCAB_SIZE, (batch_size, length), generator=torch.Generator().manual_seed(seed))


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = row
        attention_mask[index, width - len(row) :] = 1
    return input_ids, attention_mask


def greedy_by_recompute(model: EPALM, input_ids, attention_mask, visual, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding that re-runs the whole sequence each step, without a cache."""
    for _ in range(max_new_tokens):
        logits = model(input_ids, attention_mask, visual).logits[:, -1]
        input_ids = torch.cat([input_ids, logits.argmax(-1, keepdim=True)], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    results = []
    for row in input_ids[:, -max_new_tokens:].tolist():
        results.append(row[: row.index(EOS)] if EOS in row else row)
    return results


@pytest.mark.parametrize("lm_fixture", ["opt_dir", "opt_350m_like_dir"])
def test_without_prompt_or_visual_it_is_the_plain_lm(lm_fixture, request):
    """The hand-run decoder loop reproduces OPTForCausalLM exactly, padding included."""
    lm_path = request.getfixturevalue(lm_fixture)
    model = make_model(lm_path, variant="lin")
    input_ids, attention_mask = left_padded([random_ids(1, 5)[0], random_ids(1, 8, seed=3)[0]])
    ours = model(input_ids, attention_mask, visual=None).logits
    theirs = model.lm(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_injection_schedule_spreads_levels_evenly(opt_dir):
    assert make_model(opt_dir).injection_layers() == [(2, 0), (3, 1)]
    # the authors' configs: the last 12 layers, each level into two consecutive ones (OPT-350M: 12-23,
    # OPT-2.7B / 6.7B: 20-31), every layer writing its level afresh
    for num_layers, start in ((24, 12), (32, 20)):
        lm = OPTForCausalLM(tiny_opt_config(num_layers=num_layers))
        model = EPALM(EPALMConfig(lm="unused", visual_dim=VISUAL_DIM), lm=lm)
        assert model.injection_layers() == [(start + i, i // 2) for i in range(12)]
        carried = EPALM(EPALMConfig(lm="unused", visual_dim=VISUAL_DIM, write_every_layer=False), lm=lm)
        assert carried.injection_layers() == [(start + 2 * i, i) for i in range(6)]
    lm = OPTForCausalLM(tiny_opt_config(num_layers=24))
    # Table 9's rows: one level into the last 12 layers; 6 levels into all 24; the input only
    one_token = EPALM(EPALMConfig(lm="unused", visual_dim=VISUAL_DIM, num_levels=1), lm=lm)
    assert one_token.injection_layers() == [(layer, 0) for layer in range(12, 24)]
    everywhere = EPALM(EPALMConfig(lm="unused", visual_dim=VISUAL_DIM, injection_start=0), lm=lm)
    assert everywhere.injection_layers() == [(layer, layer // 4) for layer in range(24)]
    into_input = EPALM(EPALMConfig(lm="unused", visual_dim=VISUAL_DIM, num_levels=1, injection_start=0,
                                   injection_end=1), lm=lm)
    assert into_input.injection_layers() == [(0, 0)]
    with pytest.raises(ValueError, match="num_levels=3"):
        make_model(opt_dir, num_levels=3)
    with pytest.raises(ValueError, match="injection layers"):
        make_model(opt_dir, injection_start=3, injection_end=3)


@pytest.mark.parametrize("write_every_layer", [False, True])
def test_visual_token_is_prepended_once_then_replaced(opt_dir, write_every_layer):
    """6 layers, 2 levels over [2, 6): level 0 owns layers 2-3, level 1 layers 4-5. Written at 2
    and 4 and carried through 3 and 5, or (every layer) written afresh at 3 and 5 too."""
    lm = OPTForCausalLM(tiny_opt_config(num_layers=6))
    config = EPALMConfig(lm="unused", visual_dim=VISUAL_DIM, num_levels=2, prompt_length=3, injection_start=2,
                         write_every_layer=write_every_layer)
    model = EPALM(config, lm=lm).eval()
    layer_inputs = []
    for layer in lm.model.decoder.layers:  # pre-LN: the attention LayerNorm sees the raw layer input
        layer.self_attn_layer_norm.register_forward_pre_hook(lambda module, args: layer_inputs.append(args[0]))
    input_ids, attention_mask = random_ids(2, 5), torch.ones(2, 5, dtype=torch.long)
    visual = random_visual(2)
    model(input_ids, attention_mask, visual)

    prompt_and_text = 3 + 5
    assert [hidden.shape[1] for hidden in layer_inputs] == [prompt_and_text] * 2 + [prompt_and_text + 1] * 4
    written = [model.connectors[level](visual[:, level]) for level in range(2)]
    assert torch.equal(layer_inputs[2][:, 0], written[0])
    assert torch.equal(layer_inputs[4][:, 0], written[1])
    for later, level in ((3, 0), (5, 1)):
        if write_every_layer:
            assert torch.equal(layer_inputs[later][:, 0], written[level])
        else:
            assert not any(torch.allclose(layer_inputs[later][:, 0], token) for token in written)


@pytest.mark.parametrize("variant, adapters", [("lin", False), ("pt", False), ("default", False), ("ada", False),
                                               ("default", True)])
def test_only_connections_prompt_and_adapters_train(opt_dir, variant, adapters):
    model = make_model(opt_dir, variant=variant, adapters=adapters, prompt_mlp=True).train()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == set(trainable_state(model))
    modules = {name.split(".")[0] for name in trainable}
    expected = {
        ("lin", False): {"connectors"},
        ("pt", False): {"connectors", "soft_prompt"},
        ("default", False): {"connectors", "soft_prompt"},
        ("ada", False): {"connectors", "attention_adapters", "ffn_adapters"},  # adapters INSTEAD of the prompt
        ("default", True): {"connectors", "soft_prompt", "attention_adapters", "ffn_adapters"},
    }[(variant, adapters)]
    assert modules == expected
    assert len(model.connectors) == (2 if variant in ("default", "ada") else 1)

    lm_before = {name: param.clone() for name, param in model.lm.named_parameters()}
    trainable_before = {name: param.clone() for name, param in trainable_state(model).items()}
    input_ids = random_ids(2, 6)
    labels = input_ids.clone()
    labels[:, :3] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(input_ids, torch.ones_like(input_ids), random_visual(2), labels=labels).loss.backward()
    optimizer.step()

    for name, param in model.lm.named_parameters():
        assert not param.requires_grad and param.grad is None, name
        assert torch.equal(param, lm_before[name]), name
    for name, param in trainable_state(model).items():
        assert not torch.equal(param, trainable_before[name]), name


@pytest.mark.parametrize("lm_fixture", ["opt_dir", "opt_350m_like_dir"])
@pytest.mark.parametrize("variant", ["lin", "pt", "default", "ada"])
def test_no_position_sees_a_later_text_token(lm_fixture, variant, request):
    """One level written at layer 2 and carried through layer 3: if the visual row could read the
    text, layer 3 would leak later tokens into earlier positions through it."""
    model = make_model(request.getfixturevalue(lm_fixture), variant=variant, num_levels=1)
    visual = random_visual(1, num_levels=1)
    input_ids = random_ids(1, 8)
    changed = input_ids.clone()
    changed[0, 5] = 3 if input_ids[0, 5] != 3 else 4
    attention_mask = torch.ones_like(input_ids)
    logits = model(input_ids, attention_mask, visual).logits
    logits_changed = model(changed, attention_mask, visual).logits
    torch.testing.assert_close(logits[:, :5], logits_changed[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(logits[:, 5:], logits_changed[:, 5:], atol=1e-4)


def test_left_padding_leaves_real_tokens_unchanged(opt_dir):
    model = make_model(opt_dir)
    short, long = random_ids(1, 4)[0], random_ids(1, 7, seed=3)[0]
    visual = random_visual(2)
    input_ids, attention_mask = left_padded([short, long])
    batch_logits = model(input_ids, attention_mask, visual).logits
    alone = model(short[None], torch.ones(1, 4, dtype=torch.long), visual[:1]).logits
    torch.testing.assert_close(batch_logits[0, -4:], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lm_fixture", ["opt_dir", "opt_350m_like_dir"])
@pytest.mark.parametrize("variant", ["pt", "ada"])
@pytest.mark.parametrize("with_visual", [True, False])
def test_cached_step_logits_match_full_recompute(lm_fixture, variant, with_visual, request):
    model = make_model(request.getfixturevalue(lm_fixture), variant=variant)
    visual = random_visual(2) if with_visual else None
    input_ids, attention_mask = left_padded([random_ids(1, 3)[0], random_ids(1, 6, seed=3)[0]])
    cache = DynamicCache()
    step_logits = model(input_ids, attention_mask, visual, past_key_values=cache).logits[:, -1]
    for _ in range(4):
        next_tokens = step_logits.argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_tokens], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)], dim=1)
        step_logits = model(next_tokens, attention_mask, None, past_key_values=cache).logits[:, -1]
        full_logits = model(input_ids, attention_mask, visual).logits[:, -1]
        torch.testing.assert_close(step_logits, full_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lm_fixture", ["opt_dir", "opt_350m_like_dir"])
@pytest.mark.parametrize("with_visual", [True, False])
def test_greedy_generation_with_cache_equals_recompute(lm_fixture, with_visual, request):
    model = make_model(request.getfixturevalue(lm_fixture))
    visual = random_visual(2) if with_visual else None
    input_ids, attention_mask = left_padded([random_ids(1, 3)[0], random_ids(1, 6, seed=3)[0]])
    expected = greedy_by_recompute(model, input_ids, attention_mask, visual, max_new_tokens=8)
    assert model.generate(input_ids, attention_mask, visual, max_new_tokens=8, num_beams=1) == expected
    assert [len(row) for row in expected] == [8, 8]


def test_generation_stops_at_eos(opt_dir):
    model = make_model(opt_dir)
    input_ids, attention_mask, visual = random_ids(1, 4), torch.ones(1, 4, dtype=torch.long), random_visual(1)
    free_run = model.generate(input_ids, attention_mask, visual, max_new_tokens=6, num_beams=1)[0]
    model.lm.config.eos_token_id = free_run[2]
    stopped = model.generate(input_ids, attention_mask, visual, max_new_tokens=6, num_beams=1)[0]
    assert stopped == free_run[: free_run.index(free_run[2])]


def test_beam_search_over_the_whole_vocabulary_is_exact(opt_dir):
    """With as many beams as tokens and two steps, beam search must return the best sequence of
    at most two tokens by mean log-probability (eos counted), found here by brute force."""
    model = make_model(opt_dir)
    input_ids, attention_mask, visual = random_ids(1, 4), torch.ones(1, 4, dtype=torch.long), random_visual(1)
    first = model(input_ids, attention_mask, visual).logits[0, -1].log_softmax(-1)
    all_firsts = torch.arange(VOCAB_SIZE)[:, None]
    extended = torch.cat([input_ids.expand(VOCAB_SIZE, -1), all_firsts], dim=1)
    second = model(extended, torch.ones_like(extended), visual.expand(VOCAB_SIZE, -1, -1)).logits[:, -1].log_softmax(-1)
    two_token_means = (first[:, None] + second) / 2
    two_token_means[EOS] = float("-inf")  # a sequence ends at its eos
    best_pair = divmod(two_token_means.argmax().item(), VOCAB_SIZE)
    if first[EOS] > two_token_means.max():
        expected = []
    else:
        expected = [best_pair[0]] if best_pair[1] == EOS else list(best_pair)
    assert model.generate(input_ids, attention_mask, visual, max_new_tokens=2, num_beams=VOCAB_SIZE) == [expected]


def beam_search_by_recompute(model: EPALM, input_ids, visual, num_beams: int, max_new_tokens: int) -> list[int]:
    """The same search for one unpadded row, written plainly: lists of beams, full recompute each step."""
    beams = [([], 0.0, False)]  # (tokens, summed log-probability, finished)
    for _ in range(max_new_tokens):
        candidates = []
        for tokens, score, finished in beams:
            if finished:
                candidates.append((tokens + [EOS], score, True))
                continue
            sequence = torch.cat([input_ids, torch.tensor([tokens], dtype=torch.long)], dim=1)
            log_probs = model(sequence, torch.ones_like(sequence), visual).logits[0, -1].log_softmax(-1)
            top = log_probs.topk(num_beams)
            for log_prob, token in zip(top.values.tolist(), top.indices.tolist()):
                candidates.append((tokens + [token], score + log_prob, token == EOS))
        beams = sorted(candidates, key=lambda beam: beam[1], reverse=True)[:num_beams]
        if all(finished for _, _, finished in beams):
            break

    def mean_log_prob(beam) -> float:
        tokens, score, _ = beam
        return score / (tokens.index(EOS) + 1 if EOS in tokens else len(tokens))

    tokens = max(beams, key=mean_log_prob)[0]
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


@pytest.mark.parametrize("lm_fixture", ["opt_dir", "opt_350m_like_dir"])
def test_cached_batched_beam_search_equals_recomputed_search_per_row(lm_fixture, request):
    """Left-padded rows, beams expanded from one prefill, cache reordered every step: the same
    answers as searching each row alone without a cache."""
    model = make_model(request.getfixturevalue(lm_fixture))
    rows = [random_ids(1, 3, seed=4)[0], random_ids(1, 6, seed=5)[0]]  # seeds whose beams swap lineages
    visual = random_visual(2)
    input_ids, attention_mask = left_padded(rows)
    batched = model.generate(input_ids, attention_mask, visual, max_new_tokens=6, num_beams=3)
    expected = [beam_search_by_recompute(model, row[None], visual[i : i + 1], 3, 6) for i, row in enumerate(rows)]
    assert batched == expected


def test_blind_baseline_runs_and_differs_from_seeing(opt_dir):
    model = make_model(opt_dir)
    input_ids, attention_mask = random_ids(2, 5), torch.ones(2, 5, dtype=torch.long)
    blind = model(input_ids, attention_mask, visual=None).logits
    seeing = model(input_ids, attention_mask, random_visual(2)).logits
    assert blind.shape == seeing.shape == (2, 5, VOCAB_SIZE)
    assert torch.isfinite(blind).all()
    assert not torch.allclose(blind, seeing, atol=1e-4)
    assert len(model.generate(input_ids, attention_mask, None, max_new_tokens=3)) == 2


def test_adapters_start_near_identity(opt_dir):
    """Same seed -> same connections and prompt; the adapters alone make default + adapters differ, slightly."""
    input_ids, attention_mask, visual = random_ids(2, 5), torch.ones(2, 5, dtype=torch.long), random_visual(2)
    default = make_model(opt_dir, variant="default")(input_ids, attention_mask, visual).logits
    ada = make_model(opt_dir, variant="default", adapters=True)(input_ids, attention_mask, visual).logits
    difference = (default - ada).abs().max().item()
    assert 0 < difference < 0.1 * default.std().item()


def test_trained_tensors_round_trip_through_the_checkpoint_file(opt_dir, tmp_path):
    trained = make_model(opt_dir, variant="default", adapters=True, prompt_mlp=True, seed=0).train()
    input_ids = random_ids(2, 6)
    attention_mask, visual = torch.ones_like(input_ids), random_visual(2)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    trained(input_ids, attention_mask, visual, labels=input_ids).loss.backward()
    optimizer.step()
    trained.eval()
    state = trainable_state(trained)
    save_file(state, tmp_path / "model.safetensors")

    expected = trained(input_ids, attention_mask, visual).logits
    fresh = make_model(opt_dir, variant="default", adapters=True, prompt_mlp=True, seed=1)
    assert not torch.equal(fresh(input_ids, attention_mask, visual).logits, expected)
    load_trainable(fresh, tmp_path)
    assert torch.equal(fresh(input_ids, attention_mask, visual).logits, expected)
    state.pop(next(iter(state)))
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(MethodError, match="missing"):
        load_trainable(fresh, tmp_path)


def test_bad_inputs_are_named(opt_dir):
    model = make_model(opt_dir)
    input_ids, attention_mask = random_ids(2, 5), torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="visual must be"):
        model(input_ids, attention_mask, random_visual(2, num_levels=3))
    with pytest.raises(ValueError, match="variant"):
        EPALMConfig(lm=opt_dir, variant="prefix")
    cache = DynamicCache()
    model(input_ids, attention_mask, None, past_key_values=cache)
    with pytest.raises(ValueError, match="visual=None"):
        model(input_ids[:, :1], torch.ones(2, 6, dtype=torch.long), random_visual(2), past_key_values=cache)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    words = ["question:", "answer:", "what", "color", "is", "the", "cat", "red", "a", "dog", "on", "grass"]
    vocab = {"<unk>": 0, "<pad>": PAD, "</s>": EOS, **{word: index + 3 for index, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_encode_batch_left_pads_and_labels_only_the_target(tokenizer):
    batch = encode_batch(tokenizer, ["question: what color is the cat answer:", ""], [" red", " a dog on grass"])
    ids = {word: tokenizer.convert_tokens_to_ids(word) for word in ("red", "a", "dog", "on", "grass")}
    assert batch["input_ids"].shape == (2, 10)
    assert batch["input_ids"][0].tolist()[:2] == [EOS, tokenizer.convert_tokens_to_ids("question:")]
    assert batch["labels"][0].tolist() == [-100] * 8 + [ids["red"], EOS]
    assert batch["input_ids"][1].tolist() == [PAD] * 4 + [EOS, ids["a"], ids["dog"], ids["on"], ids["grass"], EOS]
    assert batch["attention_mask"][1].tolist() == [0] * 4 + [1] * 6
    assert batch["labels"][1].tolist() == [-100] * 5 + [ids["a"], ids["dog"], ids["on"], ids["grass"], EOS]

    inference = encode_batch(tokenizer, ["question: what is the cat answer:", "question: what answer:"], None)
    assert set(inference) == {"input_ids", "attention_mask"}
    assert inference["input_ids"][:, -1].tolist() == [tokenizer.convert_tokens_to_ids("answer:")] * 2

    truncated = encode_batch(tokenizer, ["question:"], [" a dog on grass"], max_length=4)
    assert truncated["labels"][0].tolist() == [-100, -100, ids["a"], ids["dog"]]
    with pytest.raises(ValueError, match="prompt 0"):
        encode_batch(tokenizer, ["question: what color is the cat answer:"], [" red"], max_length=8)


def test_encoded_batch_trains_on_the_answer(opt_dir, tokenizer):
    """encode_batch output feeds forward directly; the loss ignores prompt and padding."""
    model = make_model(opt_dir)
    batch = encode_batch(tokenizer, ["question: what color is the cat answer:", "question: what answer:"],
                         [" red", " a dog"])
    visual = random_visual(2)
    loss = model(**batch, visual=visual).loss
    logits = model(batch["input_ids"], batch["attention_mask"], visual).logits
    target = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100,
                                                  reduction="none")
    torch.testing.assert_close(loss, per_token.sum() / (target != -100).sum())
