"""The shapes worlds' language models: a tiny OPT and a tiny RoBERTa that have only read the
worlds' text (eP-ALM's and Prismer's frozen language models on these worlds).

- **LM** (`OPTForCausalLM`, 6 layers, word-level tokenizer): trained on captions and on
  `question: {q} answer: {a}` lines, the trainer's prompt format, of both `shapes` and
  `shapes-video` (one LM for every modality, as eP-ALM's OPT). It knows the vocabulary, the
  formats and the answer priors, but cannot see images, so it answers like a blind guesser.
- **RoBERTa** (`RobertaForCausalLM`, `is_decoder=True`, 4 layers, RoBERTa's special tokens): the
  same text plus `a picture of {caption}` lines, Prismer's captioning prefix. It stands in for
  roberta-base, which Prismer runs as a causal decoder with new cross-attention layers; the trainer
  adds those at load time (`add_cross_attention=True`), so none are saved here.

Both are written with `save_pretrained` and loaded by path with `AutoTokenizer` /
`OPTForCausalLM` / `RobertaForCausalLM`, like published checkpoints.
"""

from __future__ import annotations

import json
import math
import string
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForCausalLM,
)

from precompute.sources.shapes import ShapesWorld
from precompute.sources.tabletop import TabletopWorld
from worldmodels.gates import Bar
from worldmodels.loop import EVAL_RESULTS, check_budget, train


@dataclass
class LmConfig:
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    ffn_dim: int = 512
    max_positions: int = 128
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    val_scenes: int = 200


@dataclass
class RobertaLmConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_length: int = 64  # tokens per text, <s> and </s> included; the world's longest has 37
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    val_scenes: int = 100  # 2,000 texts


# Held-out perplexity over the worlds' text (a uniform guess over the ~90-word vocabulary scores
# ~90). Default run, seed 0: OPT 1.81, RoBERTa 1.78; the bar is a little over that.
LM_BAR = Bar("val_perplexity", 2.0, "val perplexity", higher_is_better=False)
ROBERTA_BAR = Bar("val_perplexity", 2.0, "val perplexity", higher_is_better=False)


PROMPT_WORDS = ("question", "answer")  # the trainer's prompt: f"question: {q} answer:" + f" {a}"
CAPTION_PREFIX = "a picture of"  # Prismer's captioning prompt: f"{CAPTION_PREFIX} {caption}"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3 in OPT and RoBERTa alike: pad 1, eos 2


@dataclass(frozen=True)
class SpecialTokenLayout:
    """How a model family frames a text: which token begins it, and the post-processor templates."""

    bos_token: str
    single: str
    pair: str


OPT_LAYOUT = SpecialTokenLayout(bos_token="</s>", single="</s> $A", pair="</s> $A </s> $B")
ROBERTA_LAYOUT = SpecialTokenLayout(bos_token="<s>", single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>")


def build_tokenizer(
    worlds: Sequence[ShapesWorld],
    max_length: int = 128,
    layout: SpecialTokenLayout = OPT_LAYOUT,
    extra_words: tuple[str, ...] = (),
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the worlds' vocabularies (and `extra_words`) with a model family's
    special-token conventions.

    Every word is one token, so the LM's vocabulary is ~90 rows, not OPT's or RoBERTa's 50k. Both
    layouts pad on the left (for batched generation): RoBERTa numbers positions from its non-pad
    tokens, OPT from its attention mask, so neither sees a shifted text. Decoding uses the
    WordPiece decoder only for its clean-up, which glues punctuation back on ("circle ?" -> "circle?").
    """
    words = sorted({word for world in worlds for word in world.vocabulary()} | set(PROMPT_WORDS) | set(extra_words))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for token in [*words, *string.punctuation]:
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    framing = [token for token in SPECIAL_TOKENS if token in layout.pair.split()]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=layout.single, pair=layout.pair, special_tokens=[(token, vocab[token]) for token in framing]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=layout.bos_token,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=max_length,
    )


def world_texts(world: ShapesWorld | TabletopWorld, split: str, num_scenes: int, caption_prefix: str | None = None) -> list[str]:
    """Every caption, and every `question: {q} answer: {a}` line (most common answer) of a split,
    both on its own and after one of the scene's captions; with `caption_prefix`, every caption
    once more after it.

    The grounded copies teach the LM what a real LM knows from its corpus: that an answer can be read
    from earlier context. That circuit is what eP-ALM's injected visual token plugs into; an LM that
    only ever saw context-free questions has no reason to look back at anything. The prefixed
    captions make the prompt a captioning trainer starts from familiar text.
    """
    texts = []
    for index in range(num_scenes):
        scene = world.scene(split, index)
        captions = world.captions(scene)
        texts.extend(captions)
        if caption_prefix is not None:
            texts.extend(f"{caption_prefix} {caption}" for caption in captions)
        for number, question in enumerate(world.questions(scene)):
            answer = max(set(question["answers"]), key=question["answers"].count)
            qa = f"question: {question['question']} answer: {answer}"
            texts.extend([qa, f"{captions[number % len(captions)]} {qa}"])
    return texts


def encode_texts(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS text EOS, left-padded into one tensor, and its attention mask.

    Framed here rather than by the tokenizer's template, because OPT's template adds no EOS.
    """
    framed = [
        [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]
    width = max(len(ids) for ids in framed)
    if width > tokenizer.model_max_length:
        raise ValueError(f"a world text has {width} tokens, more than the LM's {tokenizer.model_max_length} positions")
    input_ids = torch.full((len(framed), width), tokenizer.pad_token_id)
    for row, ids in enumerate(framed):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
    return input_ids, (input_ids != tokenizer.pad_token_id).long()


def build_lm(tokenizer: PreTrainedTokenizerFast, config: LmConfig, seed: int = 0) -> OPTForCausalLM:
    """OPT's own architecture at toy size: pre-LayerNorm, ReLU, learned positions, tied embeddings."""
    torch.manual_seed(seed)
    return OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            ffn_dim=config.ffn_dim,
            max_position_embeddings=config.max_positions,
            word_embed_proj_dim=config.hidden_size,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def build_roberta(tokenizer: PreTrainedTokenizerFast, config: RobertaLmConfig, seed: int = 0) -> RobertaForCausalLM:
    """RoBERTa's own architecture at toy size, as a causal decoder without cross-attention.

    RoBERTa numbers positions from padding_idx + 1 (= pad id + 1 = 2), so a text of max_length
    tokens needs max_length + 2 position rows (roberta-base: 512 + 2 = 514).
    """
    torch.manual_seed(seed)
    return RobertaForCausalLM(
        RobertaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_length + tokenizer.pad_token_id + 1,
            type_vocab_size=1,
            is_decoder=True,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def lm_loss(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over real tokens (padding masked out of inputs and labels)."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


@torch.no_grad()
def perplexity(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """exp of the token-weighted mean next-token loss."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(input_ids), 256):
        ids, mask = input_ids[start : start + 256], attention_mask[start : start + 256]
        predicted_tokens = int(mask[:, 1:].sum())
        total_loss += lm_loss(model, ids, mask).item() * predicted_tokens
        total_tokens += predicted_tokens
    return math.exp(total_loss / total_tokens)


def train_lm(
    out_dir: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    worlds: Sequence[ShapesWorld],
    num_scenes: int,
    steps: int,
    seed: int,
    config: LmConfig | RobertaLmConfig,
    desc: str,
    caption_prefix: str | None = None,
) -> Path:
    """Train a causal LM on the worlds' text (`num_scenes` of each) with the shared loop;
    tokenizer, model and held-out metrics (val perplexity, final train loss, text count, seconds)
    saved to `out_dir`."""
    started = time.perf_counter()

    def texts(split: str, count: int) -> list[str]:
        return [text for world in worlds for text in world_texts(world, split, count, caption_prefix)]

    train_ids, train_mask = encode_texts(tokenizer, texts("train", num_scenes))
    val_ids, val_mask = encode_texts(tokenizer, texts("val", config.val_scenes))

    def batch_loss(indices: torch.Tensor) -> torch.Tensor:
        mask = train_mask[indices]
        keep = mask.any(dim=0)  # drop columns that are padding in every row of this batch
        return lm_loss(model, train_ids[indices][:, keep], mask[:, keep])

    train_loss = train(model, batch_loss, len(train_ids), steps=steps, batch_size=config.batch_size,
                       learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                       warmup_steps=config.warmup_steps, seed=seed, desc=desc)
    metrics = {
        "val_perplexity": perplexity(model, val_ids, val_mask),
        "train_loss": train_loss,
        "num_texts": len(train_ids),
        "num_scenes": num_scenes,
        "steps": steps,
        "seconds": time.perf_counter() - started,
        "config": asdict(config),
    }
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    (out_dir / EVAL_RESULTS).write_text(json.dumps(metrics, indent=2))
    return out_dir


def pretrain_lm(
    out_dir: Path,
    worlds: Sequence[ShapesWorld],
    num_scenes: int = 1000,
    steps: int = 240,
    seed: int = 0,
    config: LmConfig | None = None,
) -> Path:
    """Train a tiny OPT on the worlds' text alone; tokenizer + model saved to `out_dir`.

    One LM for every world, as eP-ALM adapts one OPT to images, video and audio: `shapes` and
    `shapes-video` together teach it both worlds' words and question formats.
    """
    check_budget(num_scenes, steps)
    config = config or LmConfig()
    tokenizer = build_tokenizer(worlds, config.max_positions)
    model = build_lm(tokenizer, config, seed)
    return train_lm(out_dir, model, tokenizer, worlds, num_scenes, steps, seed, config, desc="pretrain lm")


def pretrain_roberta(
    out_dir: Path,
    world: ShapesWorld | TabletopWorld,
    num_scenes: int = 1000,
    steps: int = 200,
    seed: int = 0,
    config: RobertaLmConfig | None = None,
) -> Path:
    """Train a tiny RoBERTa causal decoder on the world's text and Prismer's captioning prompt;
    tokenizer + model saved to `out_dir`, loadable like roberta-base.
    """
    check_budget(num_scenes, steps)
    config = config or RobertaLmConfig()
    tokenizer = build_tokenizer([world], config.max_length, ROBERTA_LAYOUT, extra_words=tuple(CAPTION_PREFIX.split()))
    model = build_roberta(tokenizer, config, seed)
    return train_lm(out_dir, model, tokenizer, [world], num_scenes, steps, seed, config, desc="pretrain roberta",
                    caption_prefix=CAPTION_PREFIX)
