"""eP-ALM: a frozen OPT steered by cached [CLS] tokens of a frozen vision encoder.

Shukor et al., "eP-ALM: Efficient Perceptual Augmentation of Language Models" (ICCV 2023).
The vision encoder ran once, upstream; what arrives here is `visual` [B, K, Dv]: the [CLS] token
(after the encoder's final LayerNorm) of each of its last K blocks, shallowest first. The OPT stays
frozen; what trains is small:

* connections: level k's [CLS] -> Linear(Dv, d_model), one per level, or one shared by all levels;
* a soft prompt (variants "pt", "default"): `prompt_length` learned input vectors before the text;
* adapters (variant "ada", which has them INSTEAD of the soft prompt, as the paper's Fig. 7; or
  `adapters: true` on another variant): a bottleneck MLP after attention and after the FFN of every block.

How the visual token travels through the L decoder layers (numbered from 0), over the injection
layers [start, end) (default: the last 12 layers, as the authors' configs for the 24- and 32-layer
OPTs, layers 20-31 of OPT-2.7B; the last half of an LM with fewer than 24 layers):

    layers [0, start)         prompt + text                     the LM's own computation
    layer  start              [vis_0] + prompt + text           one position prepended
    later injection layers    [vis_k] written over position 0   same length
    layers [end, L)           carry the last written token

The K levels split [start, end) evenly: layer i belongs to level floor((i - start) * K / (end -
start)), so 6 levels over 12 layers give each level two consecutive layers (the paper's setting)
and one level over 12 layers is "one token into many layers" (Table 9's first row). By default
(`write_every_layer`) every injection layer writes its level's token afresh, as the authors' code
does; with `write_every_layer: false` each level is written once, at the first of its layers, and
the layers after it carry what the LM made of it. `injection_start: 0, injection_end: 1` is
Table 9's "into the input only": the token is prepended to the embeddings, then carried.

Causality. The published code lets the visual token's row attend to every text position, so each
text token can read later tokens through it from the next layer on. Here the visual token sits at
position 0 under an ordinary causal mask: it attends only to itself, and every later position may
attend to it. This also makes a KV cache exact: the visual token's keys and values depend on the
image alone, so the ones computed at prefill stay valid for every generated token (the published
code recomputes the whole sequence at every generation step instead).

Positions. OPT adds learned positions at the embedding. Text keeps the positions the pretrained LM
gives it (counted over non-padding tokens, so left padding changes nothing). As in the published
code, the soft prompt and the visual token get no positional embedding: the prompt vectors are free
to learn whatever order they need, and the visual token is not part of the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor, nn
from transformers import DynamicCache, OPTForCausalLM
from transformers.models.opt.modeling_opt import OPTDecoderLayer

from trainer.config import OPTIONS, NonNegative, Positive
from trainer.methods.text import IGNORE_INDEX


class EPALMConfig(BaseModel):
    """What to adapt and how. `variant` picks the paper's model family:

    lin      one shared connection, nothing else
    pt       one shared connection + soft prompt
    default  one connection per level (unless `shared_connector`) + soft prompt
    ada      one connection per level + adapters in every block, no soft prompt (the paper's Fig. 7:
             adapters instead of the prompt)

`adapters: true` adds the adapters to lin, pt or default (default + adapters is the soft prompt and
the adapters together, what a tiny LM may need).

    Each field's type and range is checked when a config is made (`trainer config --method epalm`
    lists them with their descriptions).
    """

    model_config = OPTIONS

    lm: str = Field(description="the frozen OPT: hub id or local path")
    lm_revision: str | None = Field(None, description="hub revision of lm; null: its default branch")
    variant: Literal["lin", "pt", "default", "ada"] = Field(
        "default", description="lin (shared connection) | pt (+ soft prompt) | default (a connection per level + "
                               "prompt) | ada (a connection per level + adapters instead of the prompt)")
    visual_dim: Positive = Field(768, description="width of the visual [CLS] tokens")
    num_levels: Positive = Field(6, description="visual levels the LM reads: the deepest of the cached [CLS] tokens")
    shared_connector: bool = Field(False, description="one connection for every level (lin and pt always share)")
    injection_start: NonNegative | None = Field(None, description="first decoder layer given a visual token; "
                                                                  "null: the last 12 layers (the authors' configs "
                                                                  "for 24- and 32-layer OPTs), the last half of a "
                                                                  "shallower LM: max(L - 12, L // 2)")
    injection_end: NonNegative | None = Field(None, description="the levels are spread over layers [start, end); "
                                                                "null: the LM's depth")
    write_every_layer: bool = Field(True, description="every injection layer writes its level's token afresh (the "
                                                      "authors' code; one level over many layers is 'one token into "
                                                      "many layers'); false: each level once, then carried")
    prompt_length: NonNegative = Field(10, description="soft prompt tokens (pt, default)")
    prompt_mlp: bool = Field(False, description="reparametrise the soft prompt by Linear-Tanh-Linear")
    adapters: bool = Field(False, description="adapters in every block on lin, pt or default too (ada always has "
                                              "them): default + adapters trains prompt and adapters together")
    adapter_factor: Positive = Field(8, description="adapter bottleneck: hidden size / adapter_factor")

    @property
    def uses_shared_connector(self) -> bool:
        return self.shared_connector or self.variant in ("lin", "pt")

    @property
    def uses_prompt(self) -> bool:
        return self.variant in ("pt", "default") and self.prompt_length > 0

    @property
    def uses_adapters(self) -> bool:
        return self.variant == "ada" or self.adapters


def default_injection_start(num_layers: int) -> int:
    """The authors' injection start: the last 12 layers of the 24- and 32-layer OPTs (12 and 20),
    the last half of a shallower LM (whose last 12 layers would be more than half of it)."""
    return max(num_layers - 12, num_layers // 2)


@dataclass
class EPALMOutput:
    loss: Tensor | None
    logits: Tensor  # [B, new text tokens, vocab]: text positions only, prefix positions dropped
    past_key_values: DynamicCache | None = None


class SoftPrompt(nn.Module):
    """`length` learned input vectors, optionally reparametrised by Linear-Tanh-Linear.

    Initialised from randomly chosen rows of the LM's token embeddings (Lester et al., 2021), so the
    prompt starts at the scale the LM expects rather than at N(0, 1).
    """

    def __init__(self, length: int, token_embeddings: Tensor, mlp: bool) -> None:
        super().__init__()
        vocab_size, dim = token_embeddings.shape
        self.embedding = nn.Embedding(length, dim)
        with torch.no_grad():
            self.embedding.weight.copy_(token_embeddings[torch.randint(vocab_size, (length,))])
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim)) if mlp else None

    def forward(self, batch_size: int) -> Tensor:
        prompt = self.embedding.weight
        if self.mlp is not None:
            prompt = self.mlp(prompt)
        return prompt.unsqueeze(0).expand(batch_size, -1, -1)


class Adapter(nn.Module):
    """x + up(relu(down(x))). Weights and biases start at N(0, 1e-3) clipped to +-2e-3 (as MAGMA and
    the eP-ALM release do), so at first each adapter adds only ~1e-3 per feature: near the identity,
    and the frozen LM begins close to its pretrained behaviour."""

    def __init__(self, dim: int, factor: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, max(dim // factor, 1))
        self.up = nn.Linear(max(dim // factor, 1), dim)
        for tensor in (self.down.weight, self.down.bias, self.up.weight, self.up.bias):
            nn.init.trunc_normal_(tensor, std=1e-3, a=-2e-3, b=2e-3)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.up(F.relu(self.down(hidden)))


def causal_attention_bias(text_is_real: Tensor, num_prefix: int, num_queries: int, dtype: torch.dtype) -> Tensor:
    """Additive mask [B, 1, Q, K] over keys = `num_prefix` prefix positions + the text so far.

    The queries are the last `num_queries` keys. A query sees a key when the key is not later than
    it and is not padding; prefix positions (visual token, soft prompt) are never padding. Every
    query also sees itself, so a padding row is never fully masked: an all-masked row can turn into
    NaN in half precision, and NaN leaks through the zero weights other rows give that position.
    """
    batch_size = text_is_real.shape[0]
    prefix_is_real = text_is_real.new_ones(batch_size, num_prefix)
    key_is_real = torch.cat([prefix_is_real, text_is_real], dim=1)
    num_keys = key_is_real.shape[1]
    key_index = torch.arange(num_keys, device=text_is_real.device)
    query_index = key_index[num_keys - num_queries :, None]
    visible = (key_index <= query_index) & key_is_real[:, None, :]
    visible = visible | (key_index == query_index)
    bias = torch.zeros(visible.shape, dtype=dtype, device=text_is_real.device)
    return bias.masked_fill(~visible, torch.finfo(dtype).min).unsqueeze(1)


def load_lm(ref: str, revision: str | None = None) -> OPTForCausalLM:
    """The frozen OPT, in float32 with SDPA attention (eP-ALM passes its own 4D mask)."""
    return OPTForCausalLM.from_pretrained(ref, revision=revision, dtype=torch.float32, attn_implementation="sdpa")


class EPALM(nn.Module):
    """A frozen `OPTForCausalLM` with eP-ALM's visual injection, soft prompt and adapters.

    The decoder layers are run here, one by one, because the sequence grows by one position at the
    first injection layer; the frozen OPT modules are called as they are.
    """

    def __init__(self, config: EPALMConfig, lm: OPTForCausalLM | None = None) -> None:
        super().__init__()
        if lm is None:
            lm = load_lm(config.lm, config.lm_revision)
        if not isinstance(lm, OPTForCausalLM):
            raise TypeError(f"eP-ALM adapts an OPTForCausalLM, got {type(lm).__name__}")
        if lm.config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError(
                f"the LM's attention implementation must be 'eager' or 'sdpa' (eP-ALM passes its own 4D "
                f"attention mask), got {lm.config._attn_implementation!r}"
            )
        lm.requires_grad_(False)
        self.config = config
        self.lm = lm

        num_layers = lm.config.num_hidden_layers
        start = default_injection_start(num_layers) if config.injection_start is None else config.injection_start
        end = num_layers if config.injection_end is None else config.injection_end
        if not 0 <= start < end <= num_layers:
            raise ValueError(
                f"injection layers [{start}, {end}) must be a non-empty range within the LM's {num_layers} layers"
            )
        if config.num_levels > end - start:
            raise ValueError(
                f"num_levels={config.num_levels} visual levels cannot each get a layer of the "
                f"{end - start} injection layers [{start}, {end})"
            )
        span, levels = end - start, config.num_levels
        if config.write_every_layer:
            self.level_at_layer = {layer: (layer - start) * levels // span for layer in range(start, end)}
        else:
            self.level_at_layer = {start + level * span // levels: level for level in range(levels)}
        self.first_injection_layer = start

        d_model = lm.config.hidden_size
        num_connectors = 1 if config.uses_shared_connector else config.num_levels
        self.connectors = nn.ModuleList(nn.Linear(config.visual_dim, d_model) for _ in range(num_connectors))
        self.soft_prompt = (
            SoftPrompt(config.prompt_length, lm.model.decoder.embed_tokens.weight, config.prompt_mlp)
            if config.uses_prompt
            else None
        )
        if config.uses_adapters:
            self.attention_adapters = nn.ModuleList(Adapter(d_model, config.adapter_factor) for _ in range(num_layers))
            self.ffn_adapters = nn.ModuleList(Adapter(d_model, config.adapter_factor) for _ in range(num_layers))
        else:
            self.attention_adapters = self.ffn_adapters = None
        self.to(lm.device)

    def injection_layers(self) -> list[tuple[int, int]]:
        """(decoder layer, level) for each layer that writes a visual token: the first prepends it,
        the others overwrite it; layers without one carry it unchanged."""
        return sorted(self.level_at_layer.items())

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        visual: Tensor | None,
        labels: Tensor | None = None,
        past_key_values: DynamicCache | None = None,
    ) -> EPALMOutput:
        """Logits for `input_ids`; with `labels`, the mean next-token loss over labels != -100.

        Without a cache (or with an empty one, which this call fills: prefill) the prompt and the
        visual token are added here; `visual=None` is the blind baseline (same LM and prompt, no
        visual token). With a filled cache, `input_ids` holds only the new tokens, `attention_mask`
        covers all text so far, and `visual` must be None: prompt and visual token already sit in the
        cache, with whatever prefix the prefill gave each layer.
        """
        batch_size, num_new = input_ids.shape
        if attention_mask.shape[0] != batch_size or attention_mask.shape[1] < num_new:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must be [batch, text so far] "
                f"for input_ids {tuple(input_ids.shape)}"
            )
        num_past = attention_mask.shape[1] - num_new
        prefilling = past_key_values is None or past_key_values.get_seq_length() == 0
        if prefilling and num_past:
            raise ValueError("attention_mask is longer than input_ids, but no filled cache holds the earlier tokens")
        if not prefilling and (visual is not None or num_past == 0):
            raise ValueError(
                "continuing from a filled cache takes only the new tokens, a mask over all text so far, and visual=None"
            )
        if visual is not None and visual.shape != (batch_size, self.config.num_levels, self.config.visual_dim):
            raise ValueError(
                f"visual must be [batch={batch_size}, levels={self.config.num_levels}, dim={self.config.visual_dim}], "
                f"got {tuple(visual.shape)}"
            )
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")

        decoder = self.lm.model.decoder
        project_in = decoder.project_in if decoder.project_in is not None else nn.Identity()
        hidden = project_in(decoder.embed_tokens(input_ids)) + decoder.embed_positions(attention_mask.long(), num_past)
        if prefilling and self.soft_prompt is not None:
            prompt = project_in(self.soft_prompt(batch_size).to(hidden.dtype))
            hidden = torch.cat([prompt, hidden], dim=1)

        text_is_real = attention_mask.bool()
        masks: dict[int, Tensor] = {}
        for index, layer in enumerate(decoder.layers):
            if prefilling and visual is not None and index in self.level_at_layer:
                hidden = self._write_visual_token(hidden, visual, self.level_at_layer[index],
                                                  prepend=index == self.first_injection_layer)
            num_cached = past_key_values.get_seq_length(index) if past_key_values is not None else 0
            num_keys = num_cached + hidden.shape[1]
            if num_keys not in masks:
                num_prefix = num_keys - text_is_real.shape[1]
                masks[num_keys] = causal_attention_bias(text_is_real, num_prefix, hidden.shape[1], hidden.dtype)
            hidden = self._decoder_layer(index, layer, hidden, masks[num_keys], past_key_values)

        hidden = hidden[:, -num_new:]
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        logits = self.lm.lm_head(hidden)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        return EPALMOutput(loss=loss, logits=logits, past_key_values=past_key_values)

    def _write_visual_token(self, hidden: Tensor, visual: Tensor, level: int, prepend: bool) -> Tensor:
        """The projected [CLS] of `level`, prepended at the first injection layer, written over
        position 0 at the later ones (out of place, for autograd)."""
        connector = self.connectors[0 if self.config.uses_shared_connector else level]
        token = connector(visual[:, level].to(connector.weight.dtype)).to(hidden.dtype).unsqueeze(1)
        rest = hidden if prepend else hidden[:, 1:]
        return torch.cat([token, rest], dim=1)

    def _decoder_layer(
        self, index: int, layer: OPTDecoderLayer, hidden: Tensor, attention_bias: Tensor, cache: DynamicCache | None
    ) -> Tensor:
        """`OPTDecoderLayer.forward` (transformers 5.23) with the "ada" adapters slotted in sequentially,
        MAGMA-style: on the attention output and on the FFN output, before dropout and the residual."""
        residual = hidden
        if layer.do_layer_norm_before:
            hidden = layer.self_attn_layer_norm(hidden)
        hidden, _ = layer.self_attn(hidden_states=hidden, attention_mask=attention_bias, past_key_values=cache)
        if self.attention_adapters is not None:
            hidden = self.attention_adapters[index](hidden)
        hidden = residual + F.dropout(hidden, p=layer.dropout, training=layer.training)
        if not layer.do_layer_norm_before:
            hidden = layer.self_attn_layer_norm(hidden)

        residual = hidden
        if layer.do_layer_norm_before:
            hidden = layer.final_layer_norm(hidden)
        hidden = layer.fc2(layer.activation_fn(layer.fc1(hidden)))
        if self.ffn_adapters is not None:
            hidden = self.ffn_adapters[index](hidden)
        hidden = residual + F.dropout(hidden, p=layer.dropout, training=layer.training)
        if not layer.do_layer_norm_before:
            hidden = layer.final_layer_norm(hidden)
        return hidden

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        visual: Tensor | None,
        max_new_tokens: int = 10,
        num_beams: int = 3,
    ) -> list[list[int]]:
        """New token ids per row (eos not included), by beam search over the KV cache.

        Prefill runs once per row; the cache is then repeated per beam and reordered after each step.
        A beam that emitted eos stays in the beam with a frozen score (it can only continue with eos,
        at no cost), so the search is fixed-width and compact; it ends when every beam has finished
        or after `max_new_tokens`. Beams compete on summed log-probability during the search; the
        answer is the beam with the best mean log-probability per token (eos counted), i.e. Hugging
        Face's default length_penalty=1.0, which the eP-ALM release used. num_beams=1 is greedy.
        Call `eval()` first: dropout follows the module's mode, as everywhere else.
        """
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError(f"max_new_tokens and num_beams must be >= 1, got {max_new_tokens} and {num_beams}")
        eos = self.lm.config.eos_token_id
        if not isinstance(eos, int):
            raise ValueError(f"the LM config needs a single integer eos_token_id, got {eos!r}")
        batch_size = input_ids.shape[0]
        cache = DynamicCache()
        logits = self(input_ids, attention_mask, visual, past_key_values=cache).logits[:, -1]
        cache.batch_repeat_interleave(num_beams)
        logits = logits.repeat_interleave(num_beams, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_beams, dim=0)

        # all beams of a row start identical: only the first may expand at the first step
        beam_scores = torch.full((batch_size, num_beams), float("-inf"), device=input_ids.device)
        beam_scores[:, 0] = 0.0
        tokens = input_ids.new_empty(batch_size * num_beams, 0)
        finished = torch.zeros(batch_size * num_beams, dtype=torch.bool, device=input_ids.device)
        lengths = torch.zeros(batch_size * num_beams, dtype=torch.long, device=input_ids.device)
        row_offset = torch.arange(batch_size, device=input_ids.device).unsqueeze(1) * num_beams
        for _ in range(max_new_tokens):
            log_probs = logits.float().log_softmax(dim=-1)
            log_probs[finished] = float("-inf")
            log_probs[finished, eos] = 0.0
            vocab_size = log_probs.shape[-1]
            candidates = (beam_scores.view(-1, 1) + log_probs).view(batch_size, num_beams * vocab_size)
            beam_scores, best = candidates.topk(num_beams, dim=1)
            source = (row_offset + best // vocab_size).view(-1)
            next_tokens = (best % vocab_size).view(-1, 1)
            tokens = torch.cat([tokens[source], next_tokens], dim=1)
            lengths = lengths[source] + (~finished[source]).long()
            finished = finished[source] | (next_tokens.squeeze(1) == eos)
            if finished.all():
                break
            cache.reorder_cache(source)
            attention_mask = torch.cat([attention_mask[source], attention_mask.new_ones(len(source), 1)], dim=1)
            logits = self(next_tokens, attention_mask, None, past_key_values=cache).logits[:, -1]

        mean_log_probs = beam_scores / lengths.view(batch_size, num_beams)
        winners = (row_offset.squeeze(1) + mean_log_probs.argmax(dim=1)).tolist()
        results = []
        for winner in winners:
            row = tokens[winner].tolist()
            results.append(row[: row.index(eos)] if eos in row else row)
        return results
