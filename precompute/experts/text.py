"""`text-cls` and `text-tokens`: a sample's text, for conditional prompt tuning (MoPE).

MoPE conditions the prompts of a frozen main-modality encoder on a global embedding of the other
modality. When the image encoder is prompted, that embedding is the text's [CLS]: the last-layer
hidden state at position 0 of a frozen BERT, not the pooler output (the pooler is a tanh layer
trained for next-sentence prediction, which MoPE does not use). `text-cls` stores it.

When the text encoder is the one being prompted, the trainer runs it itself, so the cache holds
its input instead: `text-tokens` stores the same tokenization, and names the tokenizer's model so
the trainer can check the cache was tokenized for the encoder it loads.

Both read one annotation string per sample (`field`, default "text") and tokenize it to a fixed
[2, max_length] (input ids, attention mask; right-padded, so [CLS] is at position 0 and a batch
can be trimmed to its longest row before the forward).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from cache_schema import ArraySpec, FeatureSpec, config_hash, model_revision
from precompute.decode import MediaError
from precompute.experts import ExpertError
from precompute.experts.base import Expert, pretrained_source
from precompute.sources import Sample, Source


class TokenizedTextExpert(Expert):
    """What both text experts share: which annotation they read and how it becomes token ids."""

    options: ClassVar[dict[str, Any]] = {"max_length": 128, "field": "text"}
    option_help: ClassVar[dict[str, str]] = {"max_length": "tokens per text, padded or cut (special tokens included)",
                                             "field": "annotation field holding the text"}
    default_model = "bert-base-uncased"

    def __init__(self, model: str | None = None, device: str = "cpu", **options: Any):
        super().__init__(model=model, device=device, **options)
        if self.max_length < 1:
            raise ExpertError(f"{self.name}: max_length must be positive, got {self.max_length}")

    @property
    def max_length(self) -> int:
        return int(self.config["max_length"])

    @property
    def field(self) -> str:
        return str(self.config["field"])

    def load_tokenizer(self) -> None:
        ref = self.model_ref
        self.model_source = pretrained_source(self.name, ref, model_config=False)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_source)
        except (OSError, ValueError) as e:
            raise ExpertError(f"{self.name}: cannot load a tokenizer from {ref!r}: {e}") from e
        try:
            self.model_id, self.revision = model_revision(ref)
        except ValueError as e:  # a local directory with a tokenizer but no encoder weights
            raise ExpertError(f"{self.name}: {e}; pass the encoder's own directory, which the cache names as the model") from e
        if self.tokenizer.pad_token_id is None:
            raise ExpertError(f"{self.name}: the tokenizer of {ref} has no pad token; fixed-length token rows need one")
        self.tokenizer.padding_side = "right"  # [CLS] stays at position 0 and trailing padding can be trimmed
        special = self.tokenizer.num_special_tokens_to_add()
        if not special < self.max_length <= self.tokenizer.model_max_length:
            raise ExpertError(f"{self.name}: max_length={self.max_length} must exceed the tokenizer's {special} special "
                              f"tokens and be at most its model_max_length {self.tokenizer.model_max_length} ({ref})")

    def tokenization(self) -> dict[str, Any]:
        """Everything besides the tokenizer's model that decides the token ids (part of the spec's identity)."""
        return {"field": self.field, "max_length": self.max_length, "padding": "max_length, right",
                "truncation_side": self.tokenizer.truncation_side}

    def text_spec(self, feature: str, arrays: tuple[ArraySpec, ...], **params: Any) -> FeatureSpec:
        """The spec both text experts write: the tokenizer's model, the tokenization, their arrays."""
        return FeatureSpec(name=feature, expert=self.name, model_id=self.model_id, revision=self.revision,
                           preprocess_hash=config_hash(self.tokenization()), arrays=arrays,
                           params={"field": self.field, "max_length": self.max_length, **params})

    def read_input(self, source: Source, sample: Sample) -> str:
        text = sample.annotations.get(self.field)
        if not isinstance(text, str):
            found = "missing" if text is None else f"a {type(text).__name__}, not a string"
            raise MediaError(f"{self.name}: annotation field {self.field!r}: {found}")
        return text

    def preprocess(self, text: str) -> torch.Tensor:
        """[2, max_length] int64: input ids, then the attention mask."""
        tokens = self.tokenizer(text, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt")
        return torch.cat([tokens["input_ids"], tokens["attention_mask"]]).long()


class TextClsExpert(TokenizedTextExpert):
    name = "text-cls"
    description = ("last-layer [CLS] hidden state (not the pooler) of a frozen transformers text encoder (BERT family) "
                   "over annotation `field`, float16 [N, D] (MoPE's complementary text embedding)")

    def load(self) -> None:
        self.load_tokenizer()
        try:
            self.model = AutoModel.from_pretrained(self.model_source)
        except (OSError, ValueError) as e:
            raise ExpertError(f"{self.name}: cannot load a text encoder from {self.model_ref!r}: {e}") from e
        self.model.eval().requires_grad_(False).to(self.device, self.dtype)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and self.max_length > positions:
            raise ExpertError(f"{self.name}: max_length={self.max_length} exceeds the {positions} positions of {self.model_ref}")

    def spec(self, feature: str) -> FeatureSpec:
        width = self.model.config.hidden_size
        return self.text_spec(feature, (ArraySpec("cls", "float16", (width,)),), width=width)

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        input_ids, attention_mask = batch.unbind(dim=1)
        longest = int(attention_mask.sum(dim=1).max())  # right padding: columns past the longest row are all padding
        hidden_states = self.model(input_ids=input_ids[:, :longest].to(self.device),
                                   attention_mask=attention_mask[:, :longest].to(self.device)).last_hidden_state
        return {"cls": hidden_states[:, 0].to(torch.float16).cpu().numpy()}


class TextTokensExpert(TokenizedTextExpert):
    name = "text-tokens"
    description = ("annotation `field` tokenized for a text encoder (right-padded to max_length): input_ids int32 [N, L] "
                   "+ attention_mask uint8 [N, L]; tokenizer only, no forward (MoPE with the text encoder prompted)")

    def load(self) -> None:
        self.load_tokenizer()

    def spec(self, feature: str) -> FeatureSpec:
        length = self.max_length
        return self.text_spec(feature, (ArraySpec("input_ids", "int32", (length,)), ArraySpec("attention_mask", "uint8", (length,))),
                              vocab_size=len(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id)

    def predict(self, batch: torch.Tensor, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        input_ids, attention_mask = batch.unbind(dim=1)
        return {"input_ids": input_ids.to(torch.int32).numpy(), "attention_mask": attention_mask.to(torch.uint8).numpy()}
