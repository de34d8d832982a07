"""Prismer: a frozen ViT and a frozen RoBERTa decoder, joined by small trained parts that read expert labels.

Liu et al., "Prismer: A Vision-Language Model with Multi-Task Experts" (TMLR 2024). The experts
(depth, normals, edges, segmentation, detection, OCR) ran once, upstream; what arrives here is each
label as a map over the same frame as the RGB image, already augmented alongside it:

    continuous labels  [B, C, S, S] in [-1, 1]      depth 1, normal 3, edge 1 channels
    id labels          ids [B, S, S] + vocab [B, V, 64]: the 64-d vector of every id in that sample
                       (a class name's embedding for segmentation and detection, a word's for OCR)

How the parts connect (S = the ViT's input size, G = S / patch, D = the ViT's width):

    rgb ── patch_embed + [CLS] + positions ───────────────────────────────────────┐
    label ── expert stem (strided convs to G x G) + patch positions ─┐            │
    label ── expert stem ...                                         ├─► Experts Resampler ─► 64 tokens
    (detection: + a random instance embedding per instance)          ┘   (perceiver, 4 layers)   │
                                                                                                    ▼
    frozen ViT blocks, two streams through the same frozen weights, a trained adaptor between
        attention and MLP:
          rgb tokens    attend to rgb tokens exactly as the pretrained ViT does, PLUS a trained
                        read-out (a Linear that starts at zero, one per block) of their attention
                        over the latents' keys (its own softmax, the block's frozen qkv), before
                        the block's frozen output projection
          latent tokens attend to [rgb ; latents] (Prismer's joint attention), ungated
        ── final norm of both streams ── (Linear to the LM's width when the two differ) ── vision tokens
           [rgb ; latents]
    text ── frozen RoBERTa layers run causally; in every layer (all trained): new cross-attention to
        the rgb tokens, PLUS a latent reader (its own attention over the latents, output through a
        Linear that starts at zero), then an adaptor ── LM head

The Experts Resampler always returns `num_latents` tokens, however many experts feed it, so the
cost of the frozen ViT and decoder does not grow with the number of experts. With no experts it
still runs (`baseline_latents`, the default): its learned latents, attending to themselves only,
travel through the ViT and are read out in the same way, so the RGB-only baseline trains the same
parts (less the expert stems) and the only difference between the arms is the expert input. With
`baseline_latents=False` and no experts it is left out: the bare ViT plus adaptors.

Why the zero read-out: the question "do experts help?" is only fair if both arms start from the
same model. Ungated, the untrained latents would enter every block's softmax at step 0 and perturb
the frozen ViT's RGB tokens, while the baseline began exactly as pretrained. With the read-out at
zero both arms start as the pretrained ViT + RoBERTa (the same logits, given the same shared
weights). It is a full D x D matrix rather than a scalar tanh gate (Flamingo's) on purpose: a
scalar gate at 0 passes no gradient to the resampler, and its own gradient is the correlation of
the loss with what untrained latents say, which is noise; on the tabletop world such gates stayed
within 0.04 of zero for a whole run (5 epochs, 10x learning rate) and the experts were never read.
A zero matrix, like LoRA's zero B or an adaptor's zero up-projection, learns a linear read of the
latents' (random but informative) features from the first step, after which the resampler and
stems get gradient too.

Why the decoder reads the latents as well (`decoder_reads_latents`, the default), as the release's
does: through the ViT alone, what reaches the decoder is what the RGB tokens chose to read from the
latents with the frozen ViT's own queries and keys. On the tabletop world that route barely
carried the printed word: trained on sign questions alone (OCR expert, 300 steps, seed 0, held-out
accuracy, chance 2.5%) the route through the ViT alone reached 10%, the same model with this
reader 49% (a decoder reading the OCR stem tokens directly, bypassing the resampler: 86.5%). The
decoder's reader starts at zero like the ViT's read-outs, so both arms still start identical.

Departures from the released code, each on purpose: every adaptor's up-projection starts at zero,
so each adaptor starts as the identity and the frozen models begin exactly as pretrained (the
release initialises them randomly and perturbs both models from the first step); what the latents
add to the RGB tokens passes the zero-initialised read-out above, and the decoder reads the latents
through a reader of its own that starts at zero (in the release the latents join the RGB tokens
in one softmax from the first step, in the ViT and in the decoder's cross-attention; the
zero-started read-outs are what make the two arms start identical); the RGB-only baseline keeps the resampler's latents (the
release's baseline has no resampler, so the arms differ in trainable parts as well as in input);
the decoder adaptor is pre-norm like the vision one; the vision
tokens keep the ViT's [CLS] (timm's CLIP ViTs have one); the ViT may be narrower than the LM (a
trained Linear joins them). Freezing follows the release: `freeze: pretrain` trains what its
pre-training trains (stems, resampler, adaptors, cross-attention), `finetune` the decoder too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
import transformers
from pydantic import BaseModel, Field, model_validator
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from transformers import DynamicCache, EncoderDecoderCache, RobertaForCausalLM

from cache_schema import load_timm_model
from trainer.config import OPTIONS, Float, Positive
from trainer.methods.text import IGNORE_INDEX

EMBEDDING_DIM = 64  # id labels: the class-table / word-embedding width (cache_schema tables)
NUM_IDS = 256  # uint8 id maps; id 255 is "nothing here" and reads as the zero vector


@dataclass
class ExpertInput:
    """One label the model reads: `channels` of a continuous map, or an id map (`ids=True`, 64-d vectors)."""

    name: str
    channels: int = EMBEDDING_DIM
    ids: bool = False
    instances: bool = False  # detection: add a random instance embedding per instance id


class PrismerParts(BaseModel):
    """The frozen models, the trained parts' sizes and what trains: all of the model's config but the
    expert inputs. Each field typed and ranged when a config is made (`trainer config --method
    prismer` lists them with their descriptions)."""

    model_config = OPTIONS

    vision: str = Field("vit_base_patch16_clip_224.openai", description="the frozen ViT: a timm name or a save_for_hf directory")
    lm: str = Field("FacebookAI/roberta-base", description="the frozen RoBERTa decoder: hub id or local path")
    lm_revision: str | None = Field(None, description="hub revision of lm; null: its default branch")
    num_latents: Positive = Field(64, description="Experts Resampler: latent tokens it returns")
    resampler_layers: Positive = Field(4, description="Experts Resampler: perceiver layers")
    resampler_heads: Positive = Field(8, description="Experts Resampler: attention heads")
    num_instance_embeddings: Positive = Field(128, description="detection: random instance embeddings to draw from")
    freeze: Literal["pretrain", "finetune"] = Field(
        "pretrain", description="pretrain: stems, resampler, adaptors and cross-attention train (Prismer's "
                                "pre-training); finetune: the whole decoder too")
    label_smoothing: Annotated[Float, Field(ge=0, le=1)] = Field(0.1, description="of the caption / answer loss")
    baseline_latents: bool = Field(True, description="with no experts, keep the resampler's latents (the same "
                                                     "trained parts as with experts)")
    decoder_reads_latents: bool = Field(True, description="the decoder also reads the ViT's latent tokens, through "
                                                          "its own attention whose output starts at zero")


class PrismerConfig(PrismerParts):
    """The model's config: its parts and the expert labels it reads."""

    experts: list[ExpertInput] = Field(default_factory=list)

    @model_validator(mode="after")
    def distinct_experts(self) -> PrismerConfig:
        names = [expert.name for expert in self.experts]
        if len(set(names)) != len(names):
            raise ValueError(f"experts must be distinct, got {names}")
        return self


class SquaredReLU(nn.Module):
    def forward(self, hidden_states: Tensor) -> Tensor:
        return F.relu(hidden_states).square()


class Adaptor(nn.Module):
    """x + up(squared_relu(down(layer_norm(x)))): Prismer's residual adaptor, starting as the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, width)
        self.activation = SquaredReLU()
        self.up = nn.Linear(width, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return hidden_states + self.up(self.activation(self.down(self.norm(hidden_states))))


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


class ExpertStem(nn.Module):
    """A label map -> one D-wide token per ViT patch, as Prismer's expert encoders.

    Continuous labels are resized to 16 G and halved four times; 64-d id maps, already rich per
    pixel, are resized to 4 G and halved twice, then two stride-1 convs. Widths D/8, D/4, D/2, D,
    then a 1x1 conv.
    """

    def __init__(self, expert: ExpertInput, width: int, grid: int) -> None:
        super().__init__()
        self.input_size = grid * (4 if expert.ids else 16)
        strides = (2, 2, 1, 1) if expert.ids else (2, 2, 2, 2)
        widths = (expert.channels, width // 8, width // 4, width // 2, width)
        layers = [layer for i, stride in enumerate(strides) for layer in conv_bn_relu(widths[i], widths[i + 1], stride)]
        self.convs = nn.Sequential(*layers, nn.Conv2d(width, width, 1, bias=False))

    def forward(self, label: Tensor) -> Tensor:
        label = F.interpolate(label, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.convs(label)


class PerceiverBlock(nn.Module):
    """Latents attend to [latents; expert tokens], then a squared-ReLU MLP; pre-norm residuals."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.latent_norm = nn.LayerNorm(width)
        self.input_norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), SquaredReLU(), nn.Linear(4 * width, width))

    def forward(self, latents: Tensor, expert_tokens: Tensor) -> Tensor:
        queries = self.latent_norm(latents)
        keys = torch.cat([queries, self.input_norm(expert_tokens)], dim=1) if expert_tokens.shape[1] else queries
        latents = latents + self.attention(queries, keys, keys, need_weights=False)[0]
        return latents + self.mlp(self.mlp_norm(latents))


class ExpertsResampler(nn.Module):
    """Any number of expert tokens [B, N, D] -> `num_latents` tokens [B, num_latents, D]."""

    def __init__(self, width: int, num_latents: int, layers: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"the resampler's {heads} heads must divide the ViT width {width}")
        self.latents = nn.Parameter(width**-0.5 * torch.randn(num_latents, width))
        self.blocks = nn.ModuleList(PerceiverBlock(width, heads) for _ in range(layers))

    def forward(self, expert_tokens: Tensor) -> Tensor:
        """`expert_tokens` may hold no tokens ([B, 0, D]): the latents then attend to themselves only."""
        latents = self.latents.unsqueeze(0).expand(expert_tokens.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, expert_tokens)
        return latents


class PrismerVision(nn.Module):
    """The frozen timm ViT with expert stems, the Experts Resampler and an adaptor in every block."""

    def __init__(self, vit: VisionTransformer, config: PrismerConfig) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer) or not all(type(block) is Block for block in vit.blocks):
            raise TypeError(f"Prismer needs a timm VisionTransformer of plain Blocks, got {type(vit).__name__}")
        grid_height, grid_width = vit.patch_embed.grid_size
        if grid_height != grid_width:
            raise ValueError(f"Prismer needs a square patch grid, {config.vision} has {grid_height} x {grid_width}")
        vit.requires_grad_(False)
        self.vit = vit
        self.experts = {expert.name: expert for expert in config.experts}
        width = vit.embed_dim
        self.stems = nn.ModuleDict({name: ExpertStem(expert, width, grid_height) for name, expert in self.experts.items()})
        self.resampler = (
            ExpertsResampler(width, config.num_latents, config.resampler_layers, config.resampler_heads)
            if self.experts or config.baseline_latents else None
        )
        # what the RGB tokens read from the latents in each block, through a Linear that starts at zero
        self.readouts = nn.ModuleList(zero_linear(width) for _ in vit.blocks) if self.resampler is not None else None
        has_instances = any(expert.instances for expert in config.experts)
        self.instance_embedding = (
            nn.Parameter(width**-0.5 * torch.randn(config.num_instance_embeddings, width)) if has_instances else None
        )
        self.adaptors = nn.ModuleList(Adaptor(width) for _ in vit.blocks)

    @property
    def image_size(self) -> int:
        return self.vit.patch_embed.img_size[0]

    def patch_positions(self) -> Tensor:
        """[1, G*G, D]: the ViT's position embeddings of its patches (no [CLS]), shared by every expert."""
        start = 0 if self.vit.no_embed_class else self.vit.num_prefix_tokens
        return self.vit.pos_embed[:, start:]

    def expert_tokens(self, expert_labels: dict[str, Any]) -> Tensor:
        tokens = []
        for name, expert in self.experts.items():
            if expert.ids:
                ids, vocab = expert_labels[name]
                features = self.stems[name](embed_ids(ids, vocab))
                if expert.instances:
                    features = features + self.instance_features(ids, features.shape[-1])
            else:
                features = self.stems[name](expert_labels[name])
            tokens.append(features.flatten(2).transpose(1, 2) + self.patch_positions())
        return torch.cat(tokens, dim=1)

    def instance_features(self, ids: Tensor, grid: int) -> Tensor:
        """[B, D, G, G]: each instance's embedding where it is, at the token grid.

        Instance ids carry no meaning across images, so training draws a random embedding row per
        instance (Prismer's scheme): the model learns "same instance, different instance", never
        "instance 3". Evaluation uses row = id modulo the table, a fixed draw from the same set.
        """
        ids = F.interpolate(ids.unsqueeze(1).float(), size=(grid, grid), mode="nearest-exact").squeeze(1).long()
        num_rows = self.instance_embedding.shape[0]
        if self.training:
            rows = torch.randint(num_rows, (ids.shape[0], NUM_IDS), device=ids.device)
        else:
            rows = torch.arange(NUM_IDS, device=ids.device).remainder(num_rows).expand(ids.shape[0], -1)
        embedded = self.instance_embedding[rows.gather(1, ids.flatten(1))]  # [B, G*G, D]
        embedded = embedded * (ids.flatten(1) != NUM_IDS - 1).unsqueeze(-1)
        return embedded.transpose(1, 2).reshape(ids.shape[0], -1, grid, grid)

    def latents(self, batch_size: int, expert_labels: dict[str, Any], like: Tensor) -> Tensor | None:
        """[B, num_latents, D]: the resampler's output (over no expert tokens in the baseline), or None."""
        if self.resampler is None:
            return None
        tokens = self.expert_tokens(expert_labels) if self.experts else like.new_zeros(batch_size, 0, like.shape[-1])
        return self.resampler(tokens)

    def forward(self, rgb: Tensor, expert_labels: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """([B, 1 + G*G, D] the ViT's output over its [CLS] and the RGB patches, informed by the latents;
        [B, num_latents, D] the latents after the ViT's blocks and final norm, or None without a resampler).

        The RGB tokens and the latents are kept as two streams through the same frozen block
        weights, so the RGB stream is, operation for operation, the pretrained ViT's forward
        (plus adaptors and the read-out of the latents, both zero at the start)."""
        vit = self.vit
        hidden_states = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(rgb))))
        latents = self.latents(rgb.shape[0], expert_labels, hidden_states)
        if latents is not None:
            latents = vit.norm_pre(latents)
        for index, (block, adaptor) in enumerate(zip(vit.blocks, self.adaptors)):
            if latents is None:
                hidden_states = hidden_states + block.drop_path1(block.ls1(block.attn(block.norm1(hidden_states))))
            else:
                rgb_update, latent_update = two_stream_attention(block.attn, block.norm1(hidden_states),
                                                                 block.norm1(latents), self.readouts[index])
                hidden_states = hidden_states + block.drop_path1(block.ls1(rgb_update))
                latents = adaptor(latents + block.drop_path1(block.ls1(latent_update)))
                latents = latents + block.drop_path2(block.ls2(block.mlp(block.norm2(latents))))
            hidden_states = adaptor(hidden_states)
            hidden_states = hidden_states + block.drop_path2(block.ls2(block.mlp(block.norm2(hidden_states))))
        return vit.norm(hidden_states), None if latents is None else vit.norm(latents)


def zero_linear(width: int) -> nn.Linear:
    linear = nn.Linear(width, width)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def two_stream_attention(attention: nn.Module, rgb: Tensor, latents: Tensor, readout: nn.Module) -> tuple[Tensor, Tensor]:
    """A frozen timm Attention over two streams: (rgb update, latent update).

    RGB queries: softmax over the RGB keys (exactly the pretrained block, computed on the RGB rows
    alone) + `readout` of a separate softmax over the latent keys (heads merged). Latent queries:
    one softmax over [RGB ; latent] keys. Both through the block's own qkv, norms and output projection.
    """
    heads, head_dim = attention.num_heads, attention.head_dim
    dropout = attention.attn_drop.p if attention.training else 0.0

    def project(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = attention.qkv(x).reshape(x.shape[0], x.shape[1], 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return attention.q_norm(q), attention.k_norm(k), v

    def merge(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], heads * head_dim)

    def output(x: Tensor, states: Tensor) -> Tensor:
        x = attention.norm(x)
        if getattr(attention, "gate", None) is not None:
            x = x * attention.gate(states).sigmoid()
        return attention.proj_drop(attention.proj(x))

    rgb_q, rgb_k, rgb_v = project(rgb)
    latent_q, latent_k, latent_v = project(latents)
    rgb_out = F.scaled_dot_product_attention(rgb_q, rgb_k, rgb_v, dropout_p=dropout)
    from_latents = F.scaled_dot_product_attention(rgb_q, latent_k, latent_v, dropout_p=dropout)
    latent_out = F.scaled_dot_product_attention(latent_q, torch.cat([rgb_k, latent_k], 2), torch.cat([rgb_v, latent_v], 2),
                                                dropout_p=dropout)
    return output(merge(rgb_out) + readout(merge(from_latents)), rgb), output(merge(latent_out), latents)


def embed_ids(ids: Tensor, vocab: Tensor) -> Tensor:
    """ids [B, S, S] (0..255) + vocab [B, 256, E] -> the [B, E, S, S] map of each pixel's vector."""
    batch_size, height, width = ids.shape
    index = ids.long().flatten(1).unsqueeze(-1).expand(-1, -1, vocab.shape[-1])
    return vocab.gather(1, index).transpose(1, 2).reshape(batch_size, -1, height, width)


class LatentReader(nn.Module):
    """What a decoder layer reads from the latents: its own attention over them, whose output Linear
    starts at zero (the vision side's read-out, for the same reason: both arms start identical)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.readout = zero_linear(width)

    def forward(self, hidden_states: Tensor, latents: Tensor) -> Tensor:
        return self.readout(self.attention(self.norm(hidden_states), latents, latents, need_weights=False)[0])


class CrossAttentionWithAdaptor(nn.Module):
    """A RoBERTa layer's cross-attention block (over the RGB tokens), plus, with a `latent_reader`,
    what it reads from the latents that end the encoder states, then Prismer's adaptor (the same
    call signature as the block it wraps)."""

    def __init__(self, attention: nn.Module, width: int, latent_reader: LatentReader | None = None,
                 num_latents: int = 0) -> None:
        super().__init__()
        self.attention = attention
        self.latent_reader = latent_reader
        self.num_latents = num_latents if latent_reader is not None else 0
        self.adaptor = Adaptor(width)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None, encoder_hidden_states: Tensor,
                *args: Any, **kwargs: Any) -> tuple[Tensor, Any]:
        if not self.num_latents:
            output, weights = self.attention(hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs)
            return self.adaptor(output), weights
        rgb, latents = encoder_hidden_states[:, : -self.num_latents], encoder_hidden_states[:, -self.num_latents :]
        output, weights = self.attention(hidden_states, attention_mask, rgb, *args, **kwargs)
        return self.adaptor(output + self.latent_reader(hidden_states, latents)), weights


def load_decoder(ref: str, revision: str | None = None) -> RobertaForCausalLM:
    """A RoBERTa checkpoint as a causal decoder with new cross-attention layers.

    The cross-attention weights are the only ones a RoBERTa checkpoint lacks, by design, so the
    load report that would list them is silenced; any other missing weight means `ref` is not a
    RoBERTa checkpoint, and is an error rather than a randomly initialised "frozen" model.
    """
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        lm, info = RobertaForCausalLM.from_pretrained(ref, revision=revision, is_decoder=True, add_cross_attention=True,
                                                      dtype=torch.float32, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = [key for key in info["missing_keys"] if ".crossattention." not in key]
    if missing:
        raise ValueError(f"{ref} is not a RoBERTa checkpoint: it has no {', '.join(sorted(missing)[:3])}, ...")
    return lm


@dataclass
class PrismerOutput:
    loss: Tensor | None
    logits: Tensor


class Prismer(nn.Module):
    def __init__(self, config: PrismerConfig, vit: VisionTransformer | None = None,
                 lm: RobertaForCausalLM | None = None) -> None:
        super().__init__()
        self.config = config
        if vit is None:
            vit = load_timm_model(config.vision)
        if lm is None:
            lm = load_decoder(config.lm, config.lm_revision)
        if not (lm.config.is_decoder and lm.config.add_cross_attention):
            raise ValueError("the decoder must be loaded with is_decoder=True and add_cross_attention=True")
        self.vision = PrismerVision(vit, config)
        lm.requires_grad_(config.freeze == "finetune")
        width = lm.config.hidden_size
        reads_latents = config.decoder_reads_latents and self.vision.resampler is not None
        for layer in lm.roberta.encoder.layer:
            layer.crossattention.requires_grad_(True)
            reader = LatentReader(width, lm.config.num_attention_heads) if reads_latents else None
            layer.crossattention = CrossAttentionWithAdaptor(layer.crossattention, width, reader, config.num_latents)
        self.lm = lm
        self.reads_latents = reads_latents
        self.vision_projection = nn.Linear(vit.embed_dim, width) if vit.embed_dim != width else nn.Identity()

    def encode_image(self, rgb: Tensor, expert_labels: dict[str, Any]) -> Tensor:
        """[B, T, d_lm]: what the decoder reads: the RGB tokens, then the latents when it reads them."""
        rgb_tokens, latents = self.vision(rgb, expert_labels)
        tokens = torch.cat([rgb_tokens, latents], dim=1) if self.reads_latents else rgb_tokens
        return self.vision_projection(tokens)

    def forward(self, rgb: Tensor, expert_labels: dict[str, Any], input_ids: Tensor, attention_mask: Tensor,
                labels: Tensor | None = None, image_index: Tensor | None = None,
                vision_tokens: Tensor | None = None) -> PrismerOutput:
        """Logits for `input_ids`; with `labels` (token ids, -100 where not scored), the label-smoothed
        next-token loss. Text row i reads image `image_index[i]` (default: image i), so the vision side
        runs once per image however many questions or captions it has; `vision_tokens` from
        `encode_image` skip the vision side altogether."""
        if vision_tokens is None:
            vision_tokens = self.encode_image(rgb, expert_labels)
        if image_index is not None:
            vision_tokens = vision_tokens[image_index]
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=vision_tokens,
                         use_cache=False).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX, label_smoothing=self.config.label_smoothing)
        return PrismerOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def rank_answers(self, rgb: Tensor, expert_labels: dict[str, Any], input_ids: Tensor, attention_mask: Tensor,
                     answer_ids: Tensor, answer_mask: Tensor, num_candidates: int) -> Tensor:
        """Prismer's closed-ended VQA: the index into the answer list of each question's answer.

        `input_ids` are the left-padded prompts; `answer_ids` [A, L] every answer's tokens and eos,
        right-padded. The `num_candidates` answers whose first token the model finds likeliest after
        the prompt are each scored by their mean per-token log-likelihood (eos included); the best wins.
        """
        vision_tokens = self.encode_image(rgb, expert_labels)
        first_logits = self(rgb, expert_labels, input_ids, attention_mask, vision_tokens=vision_tokens).logits[:, -1]
        first_token_scores = first_logits.log_softmax(-1)[:, answer_ids[:, 0]]  # [B, A]
        k = min(num_candidates, answer_ids.shape[0])
        candidates = first_token_scores.topk(k, dim=1).indices  # [B, k]
        flat = candidates.flatten()
        sequence_ids = torch.cat([input_ids.repeat_interleave(k, 0), answer_ids[flat]], dim=1)
        sequence_mask = torch.cat([attention_mask.repeat_interleave(k, 0), answer_mask[flat]], dim=1)
        logits = self(rgb, expert_labels, sequence_ids, sequence_mask,
                      vision_tokens=vision_tokens.repeat_interleave(k, 0)).logits
        prompt_length = input_ids.shape[1]
        answer_logits = logits[:, prompt_length - 1 : -1].float().log_softmax(-1)
        token_log_probs = answer_logits.gather(-1, answer_ids[flat].unsqueeze(-1)).squeeze(-1)
        mask = answer_mask[flat].float()
        mean_log_probs = (token_log_probs * mask).sum(1) / mask.sum(1)
        best = mean_log_probs.view(-1, k).argmax(dim=1)
        return candidates.gather(1, best.unsqueeze(1)).squeeze(1)

    @torch.no_grad()
    def generate(self, rgb: Tensor, expert_labels: dict[str, Any], input_ids: Tensor, attention_mask: Tensor,
                 max_new_tokens: int, min_new_tokens: int = 0, num_beams: int = 3) -> list[list[int]]:
        """New tokens per row (eos dropped), by the decoder's own beam search over a KV cache."""
        lm = self.lm
        output = lm.generate(
            input_ids=input_ids, attention_mask=attention_mask,
            encoder_hidden_states=self.encode_image(rgb, expert_labels),
            # RoBERTa's cross-attention expects an encoder-decoder cache; generate() would make a plain one
            past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()),
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams, do_sample=False,
            eos_token_id=lm.config.eos_token_id, pad_token_id=lm.config.pad_token_id,
        )
        results = []
        for row in output[:, input_ids.shape[1] :].tolist():
            results.append(row[: row.index(lm.config.eos_token_id)] if lm.config.eos_token_id in row else row)
        return results
