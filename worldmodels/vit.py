"""The `shapes` world's image encoder: a tiny ViT (timm `VisionTransformer`, 64 px, patch 8, 6
blocks) that has only seen the world's pixels, eP-ALM's frozen image encoder on this world.

It is trained on rendered scenes to predict, from its final [CLS], each colour's shape (or
absence), how many objects there are, which half each colour is in and the left-to-right order of
the colours, and from each patch token the object it is part of. That is what the VQA questions
ask, so its [CLS] tokens (eP-ALM reads the last 6 blocks') carry the answers. The read-out heads
are scaffolding; only the encoder is saved, with `timm.models.save_for_hf`, and the rest of the
system loads it by path exactly like a published checkpoint, with
`timm.create_model("local-dir:DIR", pretrained=True)`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.layers import build_sincos2d_pos_embed
from torch import nn
from tqdm.auto import tqdm

from precompute.sources.shapes import COLORS, MAX_OBJECTS, SHAPES, Scene, ShapesWorld, paint_per_patch
from worldmodels.gates import Bar
from worldmodels.loop import EVAL_RESULTS, check_budget, train

# The registered timm name whose class is built; every size is overridden and recorded by timm in
# config.json's model_args, so `local-dir:` rebuilds this exact model.
VIT_ARCHITECTURE = "vit_tiny_patch16_224"


@dataclass
class VitConfig:
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 2.0  # half the usual MLP: ~1.3x more steps in the same CPU minutes
    batch_size: int = 16  # small batches: more steps per image seen, shapes are learned sooner
    learning_rate: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    val_scenes: int = 400


# Shape per present colour is what most questions need and the hardest read-out (count, halves and
# order are near 1.0). Default run, seed 0, 64 px: 0.707 (chance 1/3); a little under that.
BAR = Bar("shape_accuracy", 0.65, "shape accuracy")


def build_vit(image_size: int, config: VitConfig, seed: int = 0) -> nn.Module:
    """A headless ViT whose pretrained_cfg describes the preprocessing it is trained with.

    The pretrained_cfg is written from scratch (not merged into vit_tiny's) so the checkpoint claims
    no ImageNet tag, licence or hub id it does not have. Mean/std 0.5 map [0, 1] pixels to [-1, 1].
    """
    if image_size % config.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {config.patch_size}")
    torch.manual_seed(seed)
    model = timm.create_model(
        VIT_ARCHITECTURE,
        pretrained=False,
        img_size=image_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        num_classes=0,
    )
    with torch.no_grad():  # 2-D sin-cos start (as MAE): random position embeddings learn slowly
        model.pos_embed[0, : model.num_prefix_tokens] = 0
        model.pos_embed[0, model.num_prefix_tokens :] = build_sincos2d_pos_embed(
            list(model.patch_embed.grid_size), config.embed_dim
        )
    model.pretrained_cfg = {
        "architecture": VIT_ARCHITECTURE,
        "tag": "shapes",
        "input_size": (3, image_size, image_size),
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    return model


def vit_transform(model: nn.Module) -> Callable:
    """PIL -> normalised tensor, resolved from the model's pretrained_cfg exactly as an expert does."""
    return create_transform(**resolve_data_config({}, model=model), is_training=False)


def patch_targets(image: Image.Image, scene: Scene, patch_size: int) -> list[int]:
    """Per patch, the object most of its painted pixels belong to: 0 background, else 1 + flat index.

    Dense supervision: every patch token learns which colour x shape it is part of, so the [CLS]
    heads only have to aggregate. Read off the rendered pixels (each colour is painted in exactly
    one RGB value and a scene's colours are distinct), so the label is exact at every edge.
    """
    per_patch = paint_per_patch(np.asarray(image), patch_size)
    label_of_color = [0] * len(COLORS)
    for obj in scene.objects:
        label_of_color[COLORS.index(obj.color)] = 1 + COLORS.index(obj.color) * len(SHAPES) + SHAPES.index(obj.shape)
    dominant = per_patch.argmax(axis=0)
    return [label_of_color[color] if per_patch[color, patch] else 0 for patch, color in enumerate(dominant)]


def scene_targets(world: ShapesWorld, scene: Scene, image: Image.Image, patch_size: int) -> dict[str, list[int]]:
    """`world.labels()` recast per colour, plus each colour's left-to-right rank.

    A scene's colours are distinct, so the 18-long presence multi-hot is, per colour, one of
    absent / circle / square / triangle: a softmax over those four learns shape far sooner than 18
    independent sigmoids that each see 89% negatives. The rank (0 absent, 1 leftmost, ...) answers
    "leftmost" and "is A left of B" when both objects are on one half, which halves alone cannot.
    """
    labels = world.labels(scene)
    shape = [0] * len(COLORS)
    for flat_index, present in enumerate(labels["presence"]):
        if present:
            shape[flat_index // len(SHAPES)] = 1 + flat_index % len(SHAPES)
    order = [0] * len(COLORS)
    for rank, obj in enumerate(sorted(scene.objects, key=lambda o: o.x), start=1):
        order[COLORS.index(obj.color)] = rank
    return {
        "presence": labels["presence"],
        "shape": shape,
        "count": [labels["count"]],
        "left_right": labels["left_right"],
        "order": order,
        "patches": patch_targets(image, scene, patch_size),
    }


def render_split(
    world: ShapesWorld, split: str, num_scenes: int, transform: Callable, patch_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Render `num_scenes` scenes once through the expert's own transform; targets as tensors."""
    pixels, targets = [], {}
    for index in tqdm(range(num_scenes), desc=f"render {split}", leave=False):
        scene = world.scene(split, index)
        image = world.render(scene)
        pixels.append(transform(image))
        for name, values in scene_targets(world, scene, image, patch_size).items():
            targets.setdefault(name, []).append(values)
    return torch.stack(pixels), {name: torch.tensor(v) for name, v in targets.items()}


class SceneHeads(nn.Module):
    """Per-colour read-outs from the final [CLS]; training scaffolding, not saved with the encoder."""

    sizes = {"shape": 1 + len(SHAPES), "left_right": 3, "order": 1 + MAX_OBJECTS}  # class 0 = absent

    def __init__(self, width: int):
        super().__init__()
        self.per_color = nn.ModuleDict({name: nn.Linear(width, len(COLORS) * n) for name, n in self.sizes.items()})
        self.count = nn.Linear(width, 1 + MAX_OBJECTS)
        self.patches = nn.Linear(width, 1 + len(COLORS) * len(SHAPES))

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        cls = tokens[:, 0]
        logits = {name: head(cls).view(-1, len(COLORS), self.sizes[name]) for name, head in self.per_color.items()}
        return {**logits, "count": self.count(cls), "patches": self.patches(tokens[:, 1:])}

    @staticmethod
    def loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        per_color = sum(
            F.cross_entropy(logits[name].flatten(0, 1), targets[name].flatten()) for name in SceneHeads.sizes
        )
        return (
            per_color
            + F.cross_entropy(logits["count"], targets["count"][:, 0])
            + F.cross_entropy(logits["patches"].flatten(0, 1), targets["patches"].flatten())
        )


class VitWithHeads(nn.Module):
    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.heads = SceneHeads(vit.embed_dim)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.vit.forward_features(pixels))


@torch.no_grad()
def evaluate_vit(model: VitWithHeads, pixels: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracies next to the best input-blind guess, so "beats chance" is a number, not a feeling.

    presence_* score the 18 colour x shape flags (read off the per-colour shape head), against
    always answering "absent" and, for the exact match, the commonest flag set; color_presence
    scores which colours are there at all. shape / left_right / order count present colours only.
    """
    model.eval()
    batches = [model(pixels[start : start + 256]) for start in range(0, len(pixels), 256)]
    logits = {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}
    shape = logits["shape"].argmax(-1)
    predicted_presence = F.one_hot(shape, 1 + len(SHAPES))[..., 1:].flatten(1).bool()
    presence = targets["presence"].bool()
    present_colors = targets["shape"] > 0
    count = targets["count"][:, 0]
    metrics = {
        "presence_accuracy": (predicted_presence == presence).float().mean().item(),
        "presence_chance": 1 - presence.float().mean().item(),  # always answer "absent"
        "presence_exact_match": (predicted_presence == presence).all(dim=1).float().mean().item(),
        "presence_exact_match_chance": presence.unique(dim=0, return_counts=True)[1].max().item() / len(presence),
        "color_presence_accuracy": ((shape > 0) == present_colors).float().mean().item(),
        "color_presence_chance": 1 - present_colors.float().mean().item(),
        "count_accuracy": (logits["count"].argmax(-1) == count).float().mean().item(),
        "count_chance": count.bincount().max().item() / len(count),
    }
    for name in SceneHeads.sizes:
        correct = logits[name].argmax(-1) == targets[name]
        metrics[f"{name}_accuracy"] = correct[present_colors].float().mean().item()
    return metrics


def save_vit(model: nn.Module, out_dir: Path) -> Path:
    """safetensors + config.json (architecture, model_args, pretrained_cfg) for `local-dir:`."""
    timm.models.save_for_hf(model, str(out_dir), safe_serialization=True)
    return out_dir


def pretrain_vit(
    out_dir: Path,
    world: ShapesWorld,
    num_scenes: int = 4000,
    steps: int = 1800,
    seed: int = 0,
    config: VitConfig | None = None,
) -> Path:
    """Train a tiny ViT on the world's pixels, save it to `out_dir`, val metrics in eval_results.json."""
    check_budget(num_scenes, steps)
    config = config or VitConfig()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    vit = build_vit(world.image_size, config, seed)
    transform = vit_transform(vit)
    train_pixels, train_targets = render_split(world, "train", num_scenes, transform, config.patch_size)
    val_pixels, val_targets = render_split(world, "val", config.val_scenes, transform, config.patch_size)
    model = VitWithHeads(vit)

    def batch_loss(indices: torch.Tensor) -> torch.Tensor:
        targets = {name: value[indices] for name, value in train_targets.items()}
        return SceneHeads.loss(model(train_pixels[indices]), targets)

    train_loss = train(model, batch_loss, num_scenes, steps=steps, batch_size=config.batch_size,
                       learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                       warmup_steps=config.warmup_steps, seed=seed, desc="pretrain vit")
    metrics = {
        **evaluate_vit(model, val_pixels, val_targets),
        "train_loss": train_loss,
        "num_scenes": num_scenes,
        "steps": steps,
        "seconds": time.perf_counter() - started,
        "config": asdict(config),
    }
    save_vit(vit, out_dir)
    (out_dir / EVAL_RESULTS).write_text(json.dumps(metrics, indent=2))
    return out_dir
