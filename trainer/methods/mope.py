"""Conditional prompt tuning with a mixture of prompt experts (MoPE, Jiang et al.), as one model.

A frozen main-modality encoder (a timm Swin or ViT over the image, or a BERT-family encoder over
the text) classifies; the other modality arrives only as one cached global embedding ψ (the text's
[CLS], or the image's pooled embedding) and steers the encoder through prompts in every layer:

    static prompt   l learned tokens per layer, the same for every sample (VPT-deep);
    dynamic prompt  l tokens per layer, Σ_k r_k E_k over k prompt experts E_k ∈ R^{l×C}, with the
                    router r = softmax(W ψ / τ + ε) (τ = 0.1; noise ε while training only);
    mapped prompt   one token per layer, an MLP of ψ (Linear → LayerNorm → GELU → Linear per stage).

Only prompts, routers, the mapper and a linear head train. The importance loss keeps the router
from collapsing onto a few experts, as the paper's Eq. 5-6 define it: per layer, importance_k =
Σ_batch softmax(W ψ / τ)_k, the routing scores WITHOUT the noise ε (the noise only mixes the
prompt), and the loss is the squared coefficient of variation of the importances, stopped (zero,
no gradient) while the coefficient of variation itself (std / mean, std over the k experts with
divisor k) is below γ (paper: 0.05): it pushes only against real imbalance, not towards exact
uniformity. The paper thresholds the CV, not its square; the std's divisor it does not give.

Where the prompts go:
- ViT and BERT: after [CLS] (and any other prefix tokens), replaced by fresh ones at every layer;
  their outputs are dropped, so the classifier reads [CLS] (or the encoder's own pooling) exactly as
  the frozen model would. Prompts carry no position embedding.
- Swin: attention is windowed, so every window attends to [its tokens; the prompts] (the relative
  position bias is zero towards and from prompts) and a prompt's output is the mean of its outputs
  over the windows. Fresh prompts enter every block except the first block of stages 2-4, which
  continues with the previous stage's output prompts. Those survive patch merging as a 2x2 patch of
  copies of themselves, through the stage's own frozen PatchMerging (norm + reduction): that lands
  them in the next stage's feature space, where repeating their channels (the authors' way) would
  not. Swin's own LayerNorm + average pool over the image tokens feeds the head.

Baselines of the paper's table are configurations of this model: P-ImgOnly / P-TextOnly = static
prompts only and no ψ; P-SequentialFuse = static + mapped prompts (Table 2's static + mapped row
reproduces Table 1's P-SequentialFuse); P-LateConcat = static prompts and ψ concatenated to the
pooled features before the head (the paper also prompt-tunes the complementary encoder there; here
ψ is cached from a frozen encoder, so this baseline is weaker than the paper's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from timm.models.swin_transformer import SwinTransformer, window_partition, window_reverse
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from trainer.config import OPTIONS, NonNegative, NonNegativeFloat, Positive, PositiveFloat

PROMPT_KINDS = ("static", "dynamic", "mapped")


class PromptConfig(BaseModel):
    """The prompts and their router: what a user chooses (`model.*` of `trainer fit --method mope`,
    listed by `trainer config --method mope`); each field typed and ranged when a config is made."""

    model_config = OPTIONS

    # YAML gives a list: the field takes one (strict=False), its items stay checked
    prompts: tuple[Literal["static", "dynamic", "mapped"], ...] = Field(
        PROMPT_KINDS, strict=False, description="which prompts every layer gets: static, dynamic (the mixture of "
                                                "prompt experts), mapped")
    prompt_length: NonNegative = Field(6, description="l: tokens of the static and of the dynamic prompt, each")
    num_experts: Positive = Field(16, description="k: prompt experts of the dynamic prompt")
    temperature: PositiveFloat = Field(0.1, description="tau: the router's softmax temperature")
    routing: Literal["dense", "top1"] = Field("dense", description="dense (every expert, weighted) | top1 (the "
                                                                   "winner, at its score)")
    router_noise: NonNegativeFloat = Field(1.0, description="std of the noise added to the router's logits / tau "
                                                            "while training")
    importance_weight: NonNegativeFloat = Field(0.01, description="weight of the importance loss")
    importance_threshold: NonNegativeFloat = Field(0.05, description="gamma: the importance loss is off while the "
                                                                     "importances' coefficient of variation is below this")
    mapper_dim: Positive = Field(256, description="hidden width of the mapped prompt's MLP")
    late_concat: bool = Field(False, description="P-LateConcat: [pooled; the complementary embedding] -> head")


class MoPEConfig(PromptConfig):
    """The prompts, and what the data decides: the classes and the complementary embedding's width."""

    num_classes: int = Field(ge=2)
    multi_label: bool = False  # sigmoid + binary cross-entropy per class (MM-IMDB) instead of softmax
    complementary_dim: Positive | None = None  # width of ψ; None: no complementary modality

    @model_validator(mode="after")
    def complementary_when_needed(self) -> MoPEConfig:
        if ({"dynamic", "mapped"} & set(self.prompts) or self.late_concat) and not self.complementary_dim:
            raise ValueError("dynamic/mapped prompts and late_concat need a complementary embedding (complementary_dim)")
        return self


@dataclass
class PromptedLayer:
    """One encoder layer that receives fresh prompts: its width, and the stage its width belongs to."""

    width: int
    stage: int


class PromptGenerator(nn.Module):
    """All trainable prompt parameters: static tokens, prompt experts + routers, the ψ mapper."""

    def __init__(self, config: MoPEConfig, layers: list[PromptedLayer]):
        super().__init__()
        self.config = config
        self.layers = layers
        l, k = config.prompt_length, config.num_experts
        self.static = (nn.ParameterList([prompt_tokens(l, layer.width) for layer in layers])
                       if "static" in config.prompts else None)
        if "dynamic" in config.prompts:
            self.experts = nn.ParameterList([prompt_tokens(k, l, layer.width) for layer in layers])
            self.routers = nn.ModuleList([nn.Linear(config.complementary_dim, k) for _ in layers])
        else:
            self.experts = self.routers = None
        if "mapped" in config.prompts:
            self.mapper = nn.Sequential(nn.Linear(config.complementary_dim, config.mapper_dim),
                                        nn.LayerNorm(config.mapper_dim), nn.GELU())
            stage_widths = {layer.stage: layer.width for layer in layers}
            self.stage_maps = nn.ModuleDict({str(s): nn.Linear(config.mapper_dim, w) for s, w in stage_widths.items()})
        else:
            self.mapper = self.stage_maps = None

    def route(self, index: int, complementary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s routing scores [B, k] that mix the experts, softmax(W ψ / τ + ε) (top-1
        keeps the winner's score), and the clean scores softmax(W ψ / τ) that the importance loss
        sums (Eq. 5: no noise); the same tensor where no noise is drawn (evaluation)."""
        logits = self.routers[index](complementary) / self.config.temperature
        clean = logits.softmax(dim=-1)
        scores = clean
        if self.training and self.config.router_noise > 0:
            scores = (logits + torch.randn_like(logits) * self.config.router_noise).softmax(dim=-1)
        if self.config.routing == "top1":
            winner = F.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(scores.dtype)
            scores = scores * winner  # the winner's score, not 1, so the router still gets a gradient
        return scores, clean

    def forward(self, index: int, complementary: torch.Tensor | None, batch_size: int,
                mapped_trunk: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer `index`'s prompt tokens [B, P, C] and its noise-free routing scores [B, k] (None
        without dynamic prompts): what the importance loss and the routing statistics read."""
        tokens, clean = [], None
        if self.static is not None:
            tokens.append(self.static[index].unsqueeze(0).expand(batch_size, -1, -1))
        if self.experts is not None:
            scores, clean = self.route(index, complementary)
            tokens.append(torch.einsum("bk,klc->blc", scores, self.experts[index].to(scores.dtype)))
        if self.mapper is not None:
            tokens.append(self.stage_maps[str(self.layers[index].stage)](mapped_trunk).unsqueeze(1))
        return torch.cat(tokens, dim=1), clean


def prompt_tokens(*shape: int) -> nn.Parameter:
    """Learned prompt tokens, initialised small (VPT's scale) so they start as a mild perturbation."""
    return nn.Parameter(torch.randn(*shape) * 0.02)


def importance_loss(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eq. 5-6: (std / mean)² of the experts' importance (`scores` [B, k], the noise-free routing
    scores, summed over the batch); 0, with no gradient, while std / mean is below `threshold` (γ)."""
    importance = scores.sum(dim=0)
    cv = importance.std(unbiased=False) / importance.mean().clamp_min(1e-12)
    return torch.where(cv < threshold, torch.zeros_like(cv), cv.square())


class PromptedViT(nn.Module):
    """A frozen timm ViT whose layers read fresh prompts placed after the prefix ([CLS]) tokens."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        self.prefix = vit.num_prefix_tokens
        self.output_dim = vit.num_features

    def prompted_layers(self) -> list[PromptedLayer]:
        return [PromptedLayer(self.vit.embed_dim, 0) for _ in self.vit.blocks]

    def forward(self, pixel_values: torch.Tensor, prompts) -> torch.Tensor:
        vit = self.vit
        hidden_states = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixel_values))))
        num_prompts = 0
        for index, block in enumerate(vit.blocks):
            tokens = prompts(index, len(hidden_states))
            hidden_states = torch.cat([hidden_states[:, : self.prefix], tokens.to(hidden_states.dtype),
                                       hidden_states[:, self.prefix + num_prompts :]], dim=1)
            num_prompts = tokens.shape[1]
            hidden_states = block(hidden_states)
        hidden_states = torch.cat([hidden_states[:, : self.prefix], hidden_states[:, self.prefix + num_prompts :]], dim=1)
        return vit.forward_head(vit.norm(hidden_states), pre_logits=True)


class PromptedSwin(nn.Module):
    """A frozen timm Swin whose windows all attend to the prompts (see the module docstring)."""

    def __init__(self, swin: SwinTransformer):
        super().__init__()
        self.swin = swin
        self.output_dim = swin.num_features

    def prompted_layers(self) -> list[PromptedLayer]:
        return [PromptedLayer(block.dim, s) for s, stage in enumerate(self.swin.layers)
                for b, block in enumerate(stage.blocks) if s == 0 or b > 0]

    def forward(self, pixel_values: torch.Tensor, prompts) -> torch.Tensor:
        swin = self.swin
        hidden_states = swin.patch_embed(pixel_values)  # [B, H, W, C]
        batch_size = len(hidden_states)
        index, tokens = 0, None
        for s, stage in enumerate(swin.layers):
            hidden_states = stage.downsample(hidden_states)
            if tokens is not None and not isinstance(stage.downsample, nn.Identity):
                tokens = merge_prompts(stage.downsample, tokens)
            for b, block in enumerate(stage.blocks):
                if s == 0 or b > 0:
                    tokens = prompts(index, batch_size).to(hidden_states.dtype)
                    index += 1
                hidden_states, tokens = prompted_swin_block(block, hidden_states, tokens)
        return swin.forward_head(swin.norm(hidden_states), pre_logits=True)


def merge_prompts(merging: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Prompts through PatchMerging as if each were a 2x2 patch of itself: [B, P, C] -> [B, P, 2C]."""
    return merging.reduction(merging.norm(tokens.repeat(1, 1, 4)))


def prompted_swin_block(block: nn.Module, hidden_states: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's SwinTransformerBlock.forward with prompt tokens [B, P, C] joining every window."""
    batch_size, height, width, channels = hidden_states.shape
    attended, attended_tokens = prompted_window_attention(block, block.norm1(hidden_states), block.norm1(tokens))
    hidden_states = hidden_states + block.drop_path1(attended)
    tokens = tokens + attended_tokens
    hidden_states = hidden_states.reshape(batch_size, -1, channels)
    hidden_states = hidden_states + block.drop_path2(block.mlp(block.norm2(hidden_states)))
    tokens = tokens + block.mlp(block.norm2(tokens))
    return hidden_states.reshape(batch_size, height, width, channels), tokens


def prompted_window_attention(block: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Shifted) window attention over [window tokens; prompts]; prompt outputs averaged over windows."""
    batch_size, height, width, channels = x.shape
    shift = block.shift_size
    has_shift = any(shift)
    if has_shift:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    window_h, window_w = block.window_size
    pad_h, pad_w = (window_h - height % window_h) % window_h, (window_w - width % window_w) % window_w
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    _, padded_h, padded_w, _ = x.shape
    windows = window_partition(x, block.window_size).view(-1, block.window_area, channels)
    num_windows = len(windows) // batch_size
    num_prompts = tokens.shape[1]
    window_tokens = tokens.unsqueeze(1).expand(-1, num_windows, -1, -1).reshape(len(windows), num_prompts, channels)
    sequence = torch.cat([windows, window_tokens], dim=1)

    attention, area, heads = block.attn, block.window_area, block.attn.num_heads
    length = area + num_prompts
    qkv = attention.qkv(sequence).reshape(batch_size, num_windows, length, 3, heads, -1).permute(3, 0, 1, 4, 2, 5)
    query, key, value = qkv.unbind(0)  # [B, windows, heads, N+P, d]
    bias = F.pad(attention._get_rel_pos_bias(), (0, num_prompts, 0, num_prompts)).unsqueeze(1)  # [1, 1, heads, N+P, N+P]
    mask = block.get_attn_mask(x) if getattr(block, "dynamic_mask", False) else block.attn_mask
    if mask is not None:  # the shifted windows' mask: prompts are seen from, and see, every position
        bias = bias + F.pad(mask, (0, num_prompts, 0, num_prompts)).unsqueeze(1).unsqueeze(0)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype))
    output = attention.proj(output.transpose(2, 3).reshape(len(sequence), length, -1))

    windows_out = output[:, :area].reshape(-1, window_h, window_w, channels)
    x = window_reverse(windows_out, block.window_size, padded_h, padded_w)[:, :height, :width].contiguous()
    if has_shift:
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    tokens_out = output[:, area:].reshape(batch_size, num_windows, num_prompts, channels).mean(dim=1)
    return x, tokens_out


class PromptedText(nn.Module):
    """A frozen BERT-family encoder (transformers) whose layers read fresh prompts after [CLS]."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.output_dim = encoder.config.hidden_size

    def prompted_layers(self) -> list[PromptedLayer]:
        return [PromptedLayer(self.output_dim, 0) for _ in self.encoder.encoder.layer]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts) -> torch.Tensor:
        hidden_states = self.encoder.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        mask, num_prompts = attention_mask, 0
        for index, layer in enumerate(self.encoder.encoder.layer):
            tokens = prompts(index, len(hidden_states)).to(hidden_states.dtype)
            hidden_states = torch.cat([hidden_states[:, :1], tokens, hidden_states[:, 1 + num_prompts :]], dim=1)
            num_prompts = tokens.shape[1]
            mask = torch.cat([attention_mask[:, :1], attention_mask.new_ones(len(attention_mask), num_prompts), attention_mask[:, 1:]], dim=1)
            additive = (1.0 - mask[:, None, None, :].to(hidden_states.dtype)) * torch.finfo(hidden_states.dtype).min
            hidden_states = layer(hidden_states, attention_mask=additive)
        return hidden_states[:, 0]


@dataclass
class MoPEOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    # per prompted layer, the noise-free routing scores [B, k] (dynamic prompts only)
    routing: list[torch.Tensor] = field(default_factory=list)


class MoPE(nn.Module):
    """Frozen prompted encoder + trainable prompts, routers, mapper and head."""

    def __init__(self, config: MoPEConfig, encoder: PromptedViT | PromptedSwin | PromptedText):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.prompts = PromptGenerator(config, encoder.prompted_layers())
        head_in = encoder.output_dim + (config.complementary_dim if config.late_concat else 0)
        self.head = nn.Linear(head_in, config.num_classes)

    def train(self, mode: bool = True) -> MoPE:
        """The frozen encoder always runs in eval mode (no dropout, no drop-path), as it was trained."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, inputs: dict[str, torch.Tensor], complementary: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> MoPEOutput:
        """`inputs`: {"pixel_values"} or {"input_ids", "attention_mask"}; `labels`: [B] ids or [B, C] multi-hot."""
        routing: list[torch.Tensor] = []
        mapped_trunk = self.prompts.mapper(complementary) if self.prompts.mapper is not None else None

        def prompts(index: int, batch_size: int) -> torch.Tensor:
            tokens, scores = self.prompts(index, complementary, batch_size, mapped_trunk)
            if scores is not None:
                routing.append(scores)
            return tokens

        pooled = self.encoder(**inputs, prompts=prompts)
        if self.config.late_concat:
            pooled = torch.cat([pooled, complementary.to(pooled.dtype)], dim=-1)
        logits = self.head(pooled)
        loss = None
        if labels is not None:
            if self.config.multi_label:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels)
            if routing and self.config.importance_weight:
                balance = torch.stack([importance_loss(scores.float(), self.config.importance_threshold) for scores in routing])
                loss = loss + self.config.importance_weight * balance.mean()
        return MoPEOutput(logits=logits, loss=loss, routing=routing)


def prompted_encoder(model: nn.Module) -> PromptedViT | PromptedSwin | PromptedText:
    """Wrap a loaded frozen encoder; anything but a timm ViT/Swin or a BERT-like encoder is refused."""
    if isinstance(model, VisionTransformer):
        return PromptedViT(model)
    if isinstance(model, SwinTransformer):
        return PromptedSwin(model)
    if hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer"):
        return PromptedText(model)
    raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer / SwinTransformer or a BERT-family encoder")


def routing_statistics(routing: list[torch.Tensor]) -> dict[str, float | list[float]]:
    """What people look at for MoPE: each expert's share of the routing mass (mean over layers),
    its coefficient of variation, and the routing entropy in nats (log k = uniform, 0 = one expert)."""
    scores = torch.stack(routing).float()  # [layers, N, k]
    share = scores.sum(dim=1) / scores.sum(dim=(1, 2)).unsqueeze(-1)  # [layers, k]
    cv = share.std(dim=-1, unbiased=False) / share.mean(dim=-1)
    probabilities = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1).mean()
    return {"routing_entropy": float(entropy), "routing_entropy_max": math.log(scores.shape[-1]),
            "importance_cv": float(cv.mean()), "expert_importance": [round(float(v), 5) for v in share.mean(dim=0)]}
