"""The `shapes-video` world's video encoder: a tiny TimeSformer trained on the world's motions.

eP-ALM's video side reads TimeSformer-base fine-tuned on Kinetics-600. On `shapes-video` the
stand-in is the same architecture (`TimesformerModel`, divided space-time attention: each block
attends over time at every patch, then over space in every frame) at toy size, trained on what
the world knows exactly:

- from the final [CLS] (after the encoder's LayerNorm, what `timesformer-cls` stores for the last
  level): which way each colour moves, or that it is absent, and how many objects there are;
- from every patch token of every frame: which way the object covering that patch moves (or
  background). Dense supervision, as the shapes ViT has, so the [CLS] only has to aggregate.

The questions of `shapes-video` ask exactly these things. The heads are scaffolding; only the
encoder is saved. The frames are what `timesformer-cls` feeds it: `num_frames` sampled from the
clip by decode_media's segment rule (via `ShapesVideoSource.load_video`, so the same frames), then
the VideoMAEImageProcessor saved beside the weights (mean/std 0.5, no resize at the world's size).
`--expert timesformer-cls --model OUT_DIR` loads it like the published checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from torch import nn
from transformers import TimesformerConfig, TimesformerModel, VideoMAEImageProcessor

from precompute.sources.shapes import COLORS, MAX_OBJECTS, ShapesWorld, paint_per_patch
from precompute.sources.shapes_video import DIRECTIONS, ShapesVideoSource
from worldmodels.gates import Bar
from worldmodels.loop import STANDIN_BETAS, save_standin
from worldmodels.loop import train as train_loop


@dataclass(frozen=True)
class TimesformerStandinConfig:
    # eP-ALM's video QA reads 8; 4 frames of the same clip (twice the motion between frames) learn
    # direction at the same steps for half the cost: seed 0, 3000 steps, 0.90-0.93 in ~5 min vs 0.94-0.95 in ~9
    num_frames: int = 4
    patch_size: int = 16
    hidden_size: int = 64
    num_hidden_layers: int = 6  # eP-ALM reads the last 6 levels
    num_attention_heads: int = 4
    intermediate_size: int = 128
    train_clips: int = 2000
    val_clips: int = 200
    steps: int = 3000
    batch_size: int = 16
    # Motion is learned late and only at a modest rate: direction stays at chance for ~1000 steps,
    # then rises to ~95% by 3000 at 5e-4; at 2e-3 it never leaves chance in 3000 steps.
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50


# Direction accuracy over present colours (chance 0.25: it sits there ~1000 steps before motion is
# learned). Default runs, seed 0, 64 px, 4 frames: 0.90 and 0.93 (8 frames: 0.935, 0.952); a little under that.
BAR = Bar("direction_accuracy", 0.85, "direction accuracy")

FAST = {"train_clips": 48, "val_clips": 16, "steps": 12, "warmup_steps": 3}


def build_timesformer(resolution: int, config: TimesformerStandinConfig, seed: int) -> TimesformerModel:
    if resolution % config.patch_size:
        raise ValueError(f"resolution {resolution} must be a multiple of the patch size {config.patch_size}")
    torch.manual_seed(seed)
    model = TimesformerModel(TimesformerConfig(
        image_size=resolution,
        patch_size=config.patch_size,
        num_frames=config.num_frames,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        attention_type="divided_space_time",
    ))
    # Sin-cos starts (as MAE): transformers starts the time embeddings at zero, where every frame
    # looks alike to the temporal attention and motion is learned late if at all.
    embeddings, grid = model.embeddings, resolution // config.patch_size
    with torch.no_grad():
        embeddings.position_embeddings[0, 0] = 0
        embeddings.position_embeddings[0, 1:] = build_sincos2d_pos_embed([grid, grid], config.hidden_size)
        embeddings.time_embeddings[0] = sincos_1d(config.num_frames, config.hidden_size)
    return model


def sincos_1d(length: int, width: int) -> torch.Tensor:
    """[length, width]: sin and cos of each position at width / 2 geometric frequencies."""
    frequencies = 1.0 / 10000 ** (torch.arange(width // 2) / (width // 2))
    angles = torch.arange(length)[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def build_processor(resolution: int) -> VideoMAEImageProcessor:
    """The K-600 checkpoint's processor type at the world's size (no resize, no crop), mean/std 0.5."""
    return VideoMAEImageProcessor(size={"shortest_edge": resolution},
                                  crop_size={"height": resolution, "width": resolution},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)


def patch_directions(frames: np.ndarray, direction_of_color: list[int], patch_size: int) -> np.ndarray:
    """Per frame and patch, the direction (1 + DIRECTIONS index) of the object most of its painted
    pixels belong to, 0 where nothing is painted: int64 [T, P], read off the rendered pixels."""
    per_patch = np.stack([paint_per_patch(frame, patch_size) for frame in frames])  # [T, colour, P]
    dominant = per_patch.argmax(axis=1)  # [T, P]
    directions = np.asarray(direction_of_color)[dominant]
    return np.where(per_patch.max(axis=1) > 0, directions, 0)


def render_split(source: ShapesVideoSource, config: TimesformerStandinConfig,
                 processor: VideoMAEImageProcessor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(network inputs [N, T, 3, R, R], targets) for the source's samples, read as the expert reads
    them; the targets come from the samples' motion labels (a scene's colours are distinct, so the
    count is the number of colours present)."""
    pixels, targets = [], {"direction": [], "count": [], "patches": []}
    for sample in source.samples():
        frames = source.load_video(sample, config.num_frames)
        pixels.append(processor(list(frames), return_tensors="pt")["pixel_values"][0])
        direction = sample.annotations["labels"]["direction"]
        targets["direction"].append(direction)
        targets["count"].append(sum(d > 0 for d in direction))
        # TimeSformer orders patch tokens patch-major: (patch 0, frame 0), (patch 0, frame 1), ...
        targets["patches"].append(patch_directions(frames, direction, config.patch_size).T.reshape(-1))
    return torch.stack(pixels), {name: torch.tensor(np.asarray(v)) for name, v in targets.items()}


class MotionHeads(nn.Module):
    """Read-outs from the encoder's output tokens; training scaffolding, not saved with the encoder."""

    def __init__(self, width: int):
        super().__init__()
        self.direction = nn.Linear(width, len(COLORS) * (1 + len(DIRECTIONS)))
        self.count = nn.Linear(width, 1 + MAX_OBJECTS)
        self.patches = nn.Linear(width, 1 + len(DIRECTIONS))

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        cls = tokens[:, 0]
        return {"direction": self.direction(cls).view(-1, len(COLORS), 1 + len(DIRECTIONS)),
                "count": self.count(cls), "patches": self.patches(tokens[:, 1:])}


class TimesformerWithHeads(nn.Module):
    def __init__(self, encoder: TimesformerModel):
        super().__init__()
        self.encoder = encoder
        self.heads = MotionHeads(encoder.config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.encoder(pixel_values=pixels).last_hidden_state)

    def loss(self, pixels: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(pixels)
        return (F.cross_entropy(logits["direction"].flatten(0, 1), targets["direction"].flatten())
                + F.cross_entropy(logits["count"], targets["count"])
                + F.cross_entropy(logits["patches"].flatten(0, 1), targets["patches"].flatten()))


@torch.no_grad()
def evaluate(model: TimesformerWithHeads, pixels: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Held-out accuracies next to the best input-blind guess.

    direction_accuracy counts the colours that are present (chance 25%: every direction is equally
    likely); color_presence_accuracy whether each colour is there at all; count_accuracy the
    object count (chance: the commonest count).
    """
    batches = [model(pixels[start : start + 32]) for start in range(0, len(pixels), 32)]
    logits = {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}
    direction = logits["direction"].argmax(-1)
    present = targets["direction"] > 0
    count = targets["count"]
    return {
        "direction_accuracy": (direction == targets["direction"])[present].float().mean().item(),
        "direction_chance": 1 / len(DIRECTIONS),
        "color_presence_accuracy": ((direction > 0) == present).float().mean().item(),
        "color_presence_chance": 1 - present.float().mean().item(),
        "count_accuracy": (logits["count"].argmax(-1) == count).float().mean().item(),
        "count_chance": count.bincount().max().item() / len(count),
    }


def pretrain_timesformer(out_dir: Path, world: ShapesWorld, resolution: int = 64, fast: bool = False,
                         seed: int = 0) -> dict:
    """Train the tiny TimeSformer on `shapes-video` (the world's seed, frames of `resolution` px),
    save encoder + processor config to `out_dir`, return (and write) held-out metrics."""
    config = replace(TimesformerStandinConfig(), **FAST) if fast else TimesformerStandinConfig()
    started = time.perf_counter()
    processor = build_processor(resolution)
    train_pixels, train_targets = render_split(
        ShapesVideoSource(None, "train", num=config.train_clips, seed=world.seed, image_size=resolution), config, processor)
    val_pixels, val_targets = render_split(
        ShapesVideoSource(None, "val", num=config.val_clips, seed=world.seed, image_size=resolution), config, processor)
    encoder = build_timesformer(resolution, config, seed)
    model = TimesformerWithHeads(encoder)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        return model.loss(train_pixels[batch], {name: value[batch] for name, value in train_targets.items()})

    train_loss = train_loop(model, batch_loss, len(train_pixels),
                            steps=config.steps, batch_size=config.batch_size,
                            learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                            warmup_steps=config.warmup_steps, seed=seed, betas=STANDIN_BETAS,
                            desc="pretrain timesformer")
    return save_standin(out_dir, encoder, processor, evaluate(model, val_pixels, val_targets), train_loss=train_loss,
                        resolution=resolution, started=started, config=config)
