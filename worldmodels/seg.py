"""The `shapes` world's segmentation expert: a tiny Mask2Former trained on the world's class masks.

Prismer's segmentation label comes from Mask2Former Swin-L. On the shapes world the stand-in is
the same architecture (`Mask2FormerForUniversalSegmentation`: Swin backbone, multi-scale
deformable-attention pixel decoder, masked-attention query decoder) at toy size, trained with
its own loss (Hungarian matching, then cross-entropy on classes and sigmoid + dice on
point-sampled masks) to segment `ShapesWorld.truth(scene, R)["classes"]`: background, circle,
square, triangle (`SEG_CLASSES`). Each training image's target is the world's semantic map as one
binary mask per class present, the way Mask2Former is trained for semantic segmentation.

It sees its inputs exactly as the `seg-*` experts prepare them (the checkpoint's processor at its
fixed square size, here the frame size R) and is saved with `save_pretrained` (model + processor
config, `id2label` = SEG_CLASSES), so `--expert seg-coco --model OUT_DIR` loads it like a
published checkpoint and writes ids 0-3. Held-out quality is measured on the labels the expert
would store (`semantic_map`), as mIoU over the four classes.

Default settings, seed 0, 64 px, 100 val scenes: mIoU 0.96 (background 0.99, circle 0.95, square
0.97, triangle 0.94; all-background scores 0.22), about 70 s on one thread of a busy 2-core CPU.
Fast mode (tests) takes about a second and learns little beyond background.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

from precompute.experts.seg import semantic_map
from precompute.sources.shapes import SEG_CLASSES, ShapesWorld
from precompute.sources.tabletop import TabletopWorld
from worldmodels.gates import Bar
from worldmodels.loop import STANDIN_BETAS, one_thread, save_standin
from worldmodels.loop import train as train_loop


@dataclass(frozen=True)
class SegStandinConfig:
    embed_dim: int = 32  # Swin stage widths 32, 64, 128, 256
    depths: tuple[int, ...] = (1, 1, 2, 1)
    num_heads: tuple[int, ...] = (1, 2, 4, 8)
    window_size: int = 4
    hidden_dim: int = 64  # pixel decoder, mask features and query decoder width
    encoder_layers: int = 2
    decoder_layers: int = 3  # one masked-attention layer per pixel-decoder scale
    num_queries: int = 6  # a scene has <= 4 classes (background + 3 shapes)
    train_num_points: int = 256  # mask-loss points per mask: the 64-px frame's mask logits are 16 x 16
    train_scenes: int = 1600
    val_scenes: int = 100
    steps: int = 400
    batch_size: int = 16
    learning_rate: float = 5e-3  # from scratch a high rate pays: mIoU after 300 steps 0.50 at 1e-3, 0.89 at 5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20


# mIoU of the stored label over the four classes. Default run, seed 0, 64 px: 0.967 (all-background
# scores 0.22); a little under that.
BAR = Bar("miou", 0.90, "mIoU")

FAST = {"train_scenes": 32, "val_scenes": 8, "steps": 8, "warmup_steps": 2, "batch_size": 8}


def build_mask2former(resolution: int, config: SegStandinConfig, seed: int,
                      classes: tuple[str, ...] = SEG_CLASSES) -> Mask2FormerForUniversalSegmentation:
    if resolution % 32:
        raise ValueError(f"resolution {resolution} must be a multiple of 32 (Swin's deepest stride)")
    backbone = SwinConfig(
        image_size=resolution,
        patch_size=4,
        embed_dim=config.embed_dim,
        depths=list(config.depths),
        num_heads=list(config.num_heads),
        window_size=config.window_size,
        drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    torch.manual_seed(seed)
    return Mask2FormerForUniversalSegmentation(Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        feature_size=config.hidden_dim,
        mask_feature_size=config.hidden_dim,
        hidden_dim=config.hidden_dim,
        encoder_feedforward_dim=2 * config.hidden_dim,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        num_attention_heads=4,
        dim_feedforward=2 * config.hidden_dim,
        num_queries=config.num_queries,
        train_num_points=config.train_num_points,
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={name: i for i, name in enumerate(classes)},
    ))


def build_processor(resolution: int) -> Mask2FormerImageProcessor:
    """Mask2Former's preprocessing (ImageNet mean/std) at a fixed square size = the frame."""
    return Mask2FormerImageProcessor(size={"height": resolution, "width": resolution})


def render_split(world: ShapesWorld | TabletopWorld, split: str, count: int, resolution: int,
                 processor: Mask2FormerImageProcessor) -> tuple[torch.Tensor, torch.Tensor]:
    """(network inputs [N, 3, R, R], true class ids [N, R, R]) for scenes 0..count-1 of `split`."""
    images, targets = [], []
    for index in range(count):
        scene = world.scene(split, index)
        images.append(world.render(scene))
        targets.append(torch.from_numpy(world.truth(scene, resolution)["classes"]))
    size = {"height": resolution, "width": resolution}
    return processor(images=images, size=size, return_tensors="pt")["pixel_values"], torch.stack(targets)


def mask_targets(classes: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image, one binary mask per class present and the class ids: Mask2Former's semantic targets."""
    masks, labels = [], []
    for target in classes:
        present = torch.unique(target)
        masks.append((target[None] == present[:, None, None]).float())
        labels.append(present.long())
    return masks, labels


def train(model: Mask2FormerForUniversalSegmentation, pixels: torch.Tensor, targets: torch.Tensor,
          config: SegStandinConfig, seed: int) -> float:
    """The model's own loss through the shared stand-in loop (`worldmodels.loop.train`)."""
    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        mask_labels, class_labels = mask_targets(targets[batch])
        return model(pixel_values=pixels[batch], mask_labels=mask_labels, class_labels=class_labels).loss

    return train_loop(model, batch_loss, len(pixels),
                      steps=config.steps, batch_size=config.batch_size,
                      learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                      warmup_steps=config.warmup_steps, seed=seed, grad_clip=1.0, betas=STANDIN_BETAS,
                      desc="pretrain seg")


@torch.no_grad()
def evaluate(model: Mask2FormerForUniversalSegmentation, pixels: torch.Tensor, targets: torch.Tensor) -> dict:
    """IoU per class over all held-out pixels of the stored label (`semantic_map`), their mean, pixel accuracy.

    `miou_background_only` is the same score for a label that calls every pixel background: the
    floor a model that learned nothing reaches.
    """
    resolution = targets.shape[-1]
    labels = []
    for start in range(0, len(pixels), 32):
        outputs = model(pixel_values=pixels[start : start + 32])
        labels.append(torch.from_numpy(semantic_map(outputs.class_queries_logits, outputs.masks_queries_logits,
                                                    resolution))[:, 0].long())
    prediction, truth = torch.cat(labels), targets.long()

    def ious(predicted: torch.Tensor) -> dict[str, float]:
        scores = {}
        for index, name in model.config.id2label.items():
            union = ((predicted == index) | (truth == index)).sum().item()
            scores[name] = ((predicted == index) & (truth == index)).sum().item() / union if union else float("nan")
        return scores

    per_class = ious(prediction)
    return {
        "miou": float(np.nanmean(list(per_class.values()))),
        "iou": per_class,
        "pixel_accuracy": (prediction == truth).float().mean().item(),
        "miou_background_only": float(np.nanmean(list(ious(torch.zeros_like(truth)).values()))),
    }


def pretrain_seg(out_dir: Path, world: ShapesWorld | TabletopWorld, resolution: int = 64, fast: bool = False, seed: int = 0) -> dict:
    """Train the tiny Mask2Former, save model + processor config to `out_dir`, return (and write) val metrics.

    Runs on one intra-op thread whatever the caller set (`worldmodels.loop.one_thread`).
    """
    with one_thread():
        config = replace(SegStandinConfig(), **FAST) if fast else SegStandinConfig()
        started = time.perf_counter()
        processor = build_processor(resolution)
        train_pixels, train_targets = render_split(world, "train", config.train_scenes, resolution, processor)
        val_pixels, val_targets = render_split(world, "val", config.val_scenes, resolution, processor)
        model = build_mask2former(resolution, config, seed, world.seg_classes)
        train_loss = train(model, train_pixels, train_targets, config, seed)
        return save_standin(out_dir, model, processor, evaluate(model, val_pixels, val_targets), train_loss=train_loss,
                            resolution=resolution, started=started, config=config)
