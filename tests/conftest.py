"""Shared fixtures: tiny real models saved to disk and loaded back by path, a local Ray."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def save_tiny_vit(path: Path, depth: int = 6, embed_dim: int = 32, img_size: int = 32, seed: int = 0) -> Path:
    """A real timm VisionTransformer at toy size, written as `timm.models.save_for_hf` writes it."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.models.VisionTransformer(img_size=img_size, patch_size=8, embed_dim=embed_dim, depth=depth,
                                          num_heads=2, num_classes=4)
    model.pretrained_cfg = {
        "input_size": (3, img_size, img_size), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "num_classes": 4,
        "architecture": "vit_tiny_patch16_224",
    }
    timm.models.save_for_hf(model, str(path), safe_serialization=True,
                            model_args={"img_size": img_size, "patch_size": 8, "embed_dim": embed_dim,
                                        "depth": depth, "num_heads": 2})
    return path


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("models") / "tiny-vit")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    from raysession import init_ray

    init_ray(None)
    yield ray
    ray.shutdown()


def write_images(root: Path, count: int, size: int = 40, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def save_tiny_lm(path: Path, words: list[str], layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """A real OPTForCausalLM at toy size with a word-level tokenizer, saved by `save_pretrained`."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(words) | set("?.,:")))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=hidden,
                       pad_token_id=0, bos_token_id=1, eos_token_id=1, dropout=0.0)
    OPTForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from precompute.sources.shapes import ShapesWorld

    return save_tiny_lm(tmp_path_factory.mktemp("models") / "tiny-opt", ShapesWorld().vocabulary() + ["question", "answer"])


def save_tiny_roberta(path: Path, words: list[str], layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A real RobertaForCausalLM (is_decoder=True, no cross-attention yet) at toy size with a word-level
    tokenizer in RoBERTa's conventions (<s> 0, <pad> 1, </s> 2), saved by `save_pretrained`."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForCausalLM

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(words) | set("?.,:")))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=2 * hidden, max_position_embeddings=66, is_decoder=True,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    RobertaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from precompute.sources.shapes import ShapesWorld

    words = ShapesWorld().vocabulary() + ["question", "answer", "picture", "of"]
    return save_tiny_roberta(tmp_path_factory.mktemp("models") / "tiny-roberta", words)


def save_tiny_bert(path: Path, words: list[str], layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A real BertModel at toy size with a word-piece tokenizer over `words`, saved by `save_pretrained`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(words)))}
    BertTokenizer(vocab=vocab).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)
    return path
