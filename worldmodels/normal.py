"""The `tabletop` world's surface-normal expert: NNET at toy size, trained on the world's true normals.

Prismer labels normals with NNET (Bae et al., ICCV 2021) from an EfficientNet-B5 encoder. The
stand-in is the same network as the `normal` expert rebuilds it (`precompute.experts.normal.NNET`),
with a small timm EfficientNet-family encoder (`mnasnet_small`, head width cut to 128 so the
decoder is small too), trained to predict `TabletopWorld.truth(scene, R)["normals"]` (flat faces
toward the viewer, round ones curve away, the floor faces up) with a cosine loss on the final
full-resolution prediction. Normals derived from the depth stand-in (`normal.mode=from-depth`) do
not tell a flat shape from a round one here: a 64-px DPT smooths away a bulge of a few grey
levels, so the form questions would have no expert. Saved as the expert loads it: the state dict
under "model" in `normal.pt` (as NNET's `scannet.pt`) and the encoder's timm config in `encoder/`,
so `--model normal=OUT_DIR --expert-opt normal.encoder=local-dir:OUT_DIR/encoder
--expert-opt normal.input_size=R` loads it by path.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from precompute.experts.labels import frame_image
from precompute.experts.normal import IMAGENET_MEAN, IMAGENET_STD, NNET
from precompute.sources.tabletop import TabletopWorld
from worldmodels.gates import Bar
from worldmodels.loop import EVAL_RESULTS, STANDIN_BETAS
from worldmodels.loop import train as train_loop

CHECKPOINT = "normal.pt"
ENCODER_DIR = "encoder"


@dataclass(frozen=True)
class NormalStandinConfig:
    encoder: str = "mnasnet_small"
    encoder_features: int = 128  # the head conv's width, which sets the decoder's widths
    train_scenes: int = 1000
    val_scenes: int = 100
    steps: int = 400
    batch_size: int = 8
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    # objects are ~10% of the pixels; unweighted, the loss is the floor's and the wall's, and the
    # objects' curvature (what the form questions need) is barely learned (object pixels within
    # 22.5 degrees: 0.658, against 0.649 for "everything faces the viewer")
    object_weight: float = 10.0


# Share of object pixels whose predicted normal is within 22.5 degrees of the truth (NNET's own
# accuracy measure), above what "every object faces the viewer" scores (all the flat ones and the
# middle of the round ones): what a model must add for the form questions. Default run (seed 0,
# 64 px, 279 s on a busy 2-core machine): 0.888 against 0.649, a gain of 0.24; a little under.
BAR = Bar("object_gain_over_facing_viewer", 0.2, "object normals within 22.5 degrees, gain over facing the viewer")

FAST = {"train_scenes": 16, "val_scenes": 4, "steps": 4, "warmup_steps": 1, "batch_size": 4}


def save_encoder_config(config: NormalStandinConfig, out_dir: Path) -> str:
    """The encoder's timm config (architecture + model_args) where `local-dir:` rebuilds it; its
    weights travel in the NNET checkpoint, so the safetensors written beside the config are removed."""
    encoder = timm.create_model(config.encoder, pretrained=False, num_classes=0, global_pool="",
                                num_features=config.encoder_features)
    directory = Path(out_dir) / ENCODER_DIR
    timm.models.save_for_hf(encoder, str(directory), safe_serialization=True)
    (directory / "model.safetensors").unlink()
    return f"local-dir:{directory}"


def render_split(world: TabletopWorld, split: str, count: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels as the `normal` expert prepares them (frame, ImageNet normalisation), normals [N, 3, R, R]
    and object masks [N, R, R]."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels, normals, objects = [], [], []
    for index in range(count):
        scene = world.scene(split, index)
        frame = np.asarray(frame_image(world.render(scene), resolution), dtype=np.float32) / 255
        pixels.append((torch.from_numpy(frame.transpose(2, 0, 1).copy()) - mean) / std)
        truth = world.truth(scene, resolution)
        normals.append(torch.from_numpy(truth["normals"]).permute(2, 0, 1))
        objects.append(torch.from_numpy(truth["instances"] != 255))
    return torch.stack(pixels), torch.stack(normals), torch.stack(objects)


@torch.no_grad()
def evaluate(model: NNET, pixels: torch.Tensor, normals: torch.Tensor, objects: torch.Tensor) -> dict[str, float]:
    """Angular error over all pixels and over object pixels, beside a constant "faces the viewer" guess."""
    model.eval()
    predicted = torch.cat([model(pixels[i : i + 32])[:, :3] for i in range(0, len(pixels), 32)])
    angle = torch.rad2deg(torch.acos((predicted * normals).sum(1).clamp(-1, 1)))
    facing = torch.rad2deg(torch.acos(normals[:, 2].clamp(-1, 1)))  # the error of always (0, 0, 1)
    return {
        "mean_angle": angle.mean().item(),
        "within_22_5": (angle < 22.5).float().mean().item(),
        "object_mean_angle": angle[objects].mean().item(),
        "object_within_22_5": (angle[objects] < 22.5).float().mean().item(),
        "object_within_22_5_facing_viewer": (facing[objects] < 22.5).float().mean().item(),
        "object_gain_over_facing_viewer": ((angle[objects] < 22.5).float().mean()
                                           - (facing[objects] < 22.5).float().mean()).item(),
    }


def pretrain_normal(out_dir: Path, world: TabletopWorld, resolution: int = 64, fast: bool = False, seed: int = 0) -> dict:
    """Train the tiny NNET, save it and its encoder config to `out_dir`, return (and write) val metrics."""
    config = replace(NormalStandinConfig(), **FAST) if fast else NormalStandinConfig()
    if resolution % 32:
        raise ValueError(f"resolution {resolution} must be a multiple of 32 (NNET's deepest stride)")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = save_encoder_config(config, out_dir)
    torch.manual_seed(seed)
    model = NNET(encoder)
    train_pixels, train_normals, train_objects = render_split(world, "train", config.train_scenes, resolution)
    val = render_split(world, "val", config.val_scenes, resolution)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        predicted = model(train_pixels[batch])[:, :3]
        weight = 1 + (config.object_weight - 1) * train_objects[batch].float()
        return ((1 - F.cosine_similarity(predicted, train_normals[batch], dim=1)) * weight).sum() / weight.sum()

    train_loss = train_loop(model, batch_loss, len(train_pixels), steps=config.steps, batch_size=config.batch_size,
                            learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                            warmup_steps=config.warmup_steps, seed=seed, betas=STANDIN_BETAS, desc="pretrain normal")
    torch.save({"model": model.state_dict()}, out_dir / CHECKPOINT)
    metrics = {**evaluate(model, *val), "train_loss": train_loss, "resolution": resolution, "encoder": encoder,
               "seconds": round(time.perf_counter() - started, 1), "config": asdict(config)}
    (out_dir / EVAL_RESULTS).write_text(json.dumps(metrics, indent=2))
    return metrics
