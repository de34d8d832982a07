"""The `shapes` world's depth expert: a tiny DPT trained on the world's exact inverse depth.

Prismer's depth label comes from DPT-Hybrid MiDaS. On the shapes world the stand-in is the same
architecture (`DPTForDepthEstimation`: ViT encoder, reassemble + fusion neck, depth head) at toy
size, trained to regress `ShapesWorld.truth(scene, R)["inverse_depth"]` (background 0, each object
its nearness) from the rendered image. It sees its inputs exactly as the `depth` expert prepares
them (the frame, then `DepthPreprocessing` from the processor config saved beside the weights),
and is saved with `save_pretrained`, so `--expert depth --model OUT_DIR` loads it like a published
checkpoint.

The ViT uses patch 8 and reassemble factors (2, 1, 1/2, 1/4), so the neck sees strides 4, 8, 16
and 32 as in DPT-Large at 384 px, and the head predicts at the input size (= the label frame).
The loss is plain L1 on inverse depth: the world's truth has a fixed scale, so the scale-and-shift
invariant loss MiDaS needed for mixed datasets has nothing to absorb here. The target is shifted
by `TARGET_SHIFT` (background 1, not 0): DPT's head ends in a ReLU, and on a target that is 0 on
most pixels, L1 drives it below zero everywhere, where it stops learning. The label is min-max
normalised per image, so the shift never reaches the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

from precompute.experts.depth import DepthPreprocessing
from precompute.experts.labels import frame_image, minmax_uint8
from precompute.sources.shapes import ShapesWorld
from precompute.sources.tabletop import TabletopWorld
from worldmodels.gates import Bar
from worldmodels.loop import STANDIN_BETAS, save_standin
from worldmodels.loop import train as train_loop

TARGET_SHIFT = 1.0  # the network predicts TARGET_SHIFT + inverse depth (see above)


@dataclass(frozen=True)
class DepthStandinConfig:
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128
    patch_size: int = 8
    reassemble_factors: tuple[float, ...] = (2, 1, 0.5, 0.25)
    neck_hidden_sizes: tuple[int, ...] = (16, 32, 64, 64)
    fusion_hidden_size: int = 32
    train_scenes: int = 1200
    val_scenes: int = 100
    steps: int = 500
    batch_size: int = 8
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30


# Mean per-image Spearman correlation with the true nearness. Default run, seed 0, 64 px: 0.56 (a
# constant map scores 0; the world's depth is mostly unseen, see the issue); a little under that.
BAR = Bar("rank_correlation", 0.50, "rank correlation")

FAST = {"train_scenes": 48, "val_scenes": 8, "steps": 12, "warmup_steps": 3}


def build_dpt(resolution: int, config: DepthStandinConfig, seed: int) -> DPTForDepthEstimation:
    if resolution % config.patch_size:
        raise ValueError(f"resolution {resolution} must be a multiple of the patch size {config.patch_size}")
    torch.manual_seed(seed)
    return DPTForDepthEstimation(DPTConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        image_size=resolution,
        patch_size=config.patch_size,
        backbone_out_indices=list(range(config.num_hidden_layers - 4, config.num_hidden_layers)),
        reassemble_factors=list(config.reassemble_factors),
        neck_hidden_sizes=list(config.neck_hidden_sizes),
        fusion_hidden_size=config.fusion_hidden_size,
        use_auxiliary_head=False,
    ))


def build_processor(resolution: int) -> DPTImageProcessor:
    """DPT-Hybrid MiDaS's preprocessing (mean/std 0.5, bicubic) at the frame size: no resize at all."""
    return DPTImageProcessor(size={"height": resolution, "width": resolution}, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3)


def render_split(world: ShapesWorld | TabletopWorld, split: str, count: int, resolution: int,
                 preprocessing: DepthPreprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """(network inputs [N, 3, R, R], true inverse depth [N, R, R]) for scenes 0..count-1 of `split`."""
    pixels, targets = [], []
    for index in range(count):
        scene = world.scene(split, index)
        pixels.append(preprocessing(frame_image(world.render(scene), resolution)))
        targets.append(torch.from_numpy(world.truth(scene, resolution)["inverse_depth"]))
    return torch.stack(pixels), torch.stack(targets)


def predict(model: DPTForDepthEstimation, pixels: torch.Tensor) -> torch.Tensor:
    depth = model(pixel_values=pixels).predicted_depth
    if depth.shape[-2:] != pixels.shape[-2:]:
        depth = F.interpolate(depth[:, None], size=pixels.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return depth


def train(model: DPTForDepthEstimation, pixels: torch.Tensor, targets: torch.Tensor,
          config: DepthStandinConfig, seed: int) -> float:
    """The model's own loss through the shared stand-in loop (`worldmodels.loop.train`)."""
    return train_loop(model, lambda batch: F.l1_loss(predict(model, pixels[batch]), TARGET_SHIFT + targets[batch]), len(pixels),
                      steps=config.steps, batch_size=config.batch_size,
                      learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                      warmup_steps=config.warmup_steps, seed=seed, grad_clip=1.0, betas=STANDIN_BETAS,
                      desc="pretrain depth")


def rank_correlation(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    """Spearman's rho over pixels; a constant map orders nothing, so it scores 0 (not NaN)."""
    if prediction.min() == prediction.max() or truth.min() == truth.max():
        return 0.0
    return float(spearmanr(prediction.flatten().numpy(), truth.flatten().numpy()).statistic)


@torch.no_grad()
def evaluate(model: DPTForDepthEstimation, pixels: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Held-out error of the raw prediction and of the stored label, next to two reference labels.

    `label_l1` compares what the cache would hold (per-image min-max, /255) with the min-max
    normalised truth. References: `label_l1_background_only`, a label that calls every pixel
    background, and `label_l1_silhouettes`, exact object masks with every object at the nearest
    depth. The image shows which pixels are objects, but only an overlap shows which object is
    nearer, so a good stand-in lands near the silhouettes. `rank_correlation` is the mean per-image
    Spearman correlation with the truth (1: every pixel ordered by nearness correctly).
    """
    depth = torch.cat([predict(model, pixels[i : i + 64]) for i in range(0, len(pixels), 64)]) - TARGET_SHIFT
    label = torch.from_numpy(minmax_uint8(depth)).float() / 255
    truth = torch.from_numpy(minmax_uint8(targets)).float() / 255
    correlations = [rank_correlation(p, t) for p, t in zip(depth, targets)]
    silhouettes = (targets > 0).float()
    return {
        "l1": F.l1_loss(depth, targets).item(),
        "label_l1": F.l1_loss(label, truth).item(),
        "label_l1_background_only": truth.mean().item(),
        "label_l1_silhouettes": F.l1_loss(silhouettes, truth).item(),
        "rank_correlation": float(np.mean(correlations)),
    }


def pretrain_depth(out_dir: Path, world: ShapesWorld | TabletopWorld, resolution: int = 64, fast: bool = False, seed: int = 0) -> dict:
    """Train the tiny DPT, save model + processor config to `out_dir`, return (and write) val metrics."""
    config = replace(DepthStandinConfig(), **FAST) if fast else DepthStandinConfig()
    started = time.perf_counter()
    processor = build_processor(resolution)
    preprocessing = DepthPreprocessing.from_processor(processor)
    train_pixels, train_targets = render_split(world, "train", config.train_scenes, resolution, preprocessing)
    val_pixels, val_targets = render_split(world, "val", config.val_scenes, resolution, preprocessing)
    model = build_dpt(resolution, config, seed)
    with torch.no_grad():  # start at the mean target, so the head's final ReLU is active everywhere
        model.head.head[-2].bias.fill_(TARGET_SHIFT + train_targets.mean().item())
    train_loss = train(model, train_pixels, train_targets, config, seed)
    return save_standin(out_dir, model, processor, evaluate(model, val_pixels, val_targets), train_loss=train_loss,
                        resolution=resolution, started=started, config=config)
