"""Shared fixtures: tiny real models saved to disk and loaded back by path, a local Ray."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray starts its workers 15 steps nicer than the process that started Ray (to keep its own daemons
# responsive): beside a busy process that starves them, the main job's precompute beside the rest of
# the suite, or a test's Ray beside the main job. Here they run at their driver's priority.
os.environ.setdefault("RAY_worker_niceness", "0")

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


# The main job's test file: first in the suite, and at full CPU priority (the two hooks below).
MAIN_JOB_FILE = "test_demo.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first, whole files kept together and in their own order: the main job's file, then
    the files with other slow tests, then the rest.

    pytest-xdist (`-n 2 --dist loadfile --no-loadscope-reorder`, pyproject.toml) hands out files in
    this order, so the main job (~35 minutes beside the rest) starts at once on one worker while the other works
    through everything else, rather than starting last. xdist gives a worker another file only when
    at most two of its tests are pending; tests/test_demo.py holds four, so nothing queues behind
    the main job."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: 0 if item.path.name == MAIN_JOB_FILE else 1 if item.path in slow_files else 2)


# The niceness of every test but the main job's (see below).
BESIDE_THE_MAIN_JOB = 5


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Every test but the main job's runs at a lower CPU priority, and so does what it starts.

    The main job (~35 minutes beside the rest) is the suite's critical path: under `-n 2` the other worker's tests
    should fill the CPU it leaves idle, not slow it down. Niceness only goes up, and the main job is
    the first test of its worker, so one setting per process is all it takes."""
    if item.path.name != MAIN_JOB_FILE and os.getpriority(os.PRIO_PROCESS, 0) < BESIDE_THE_MAIN_JOB:
        os.setpriority(os.PRIO_PROCESS, 0, BESIDE_THE_MAIN_JOB)
