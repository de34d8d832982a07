"""The `shapes` world's object detector: a tiny RT-DETR trained on the world's boxes.

Prismer's detection label comes from a detector's boxes (UniDet); the `objdet` expert's default
is RT-DETR. On the shapes world the stand-in is the same architecture (`RTDetrForObjectDetection`:
ResNet backbone, hybrid encoder, query selection from encoder proposals, deformable decoder) at
toy size, trained with its own loss (Hungarian matching; varifocal, L1 and GIoU terms on every
decoder layer, plus the denoising queries that make DETR-style training converge fast) to find
`ShapesWorld.truth(scene, R)["boxes"]` as the 18 `DETECTION_CLASSES` (colour x shape).

RT-DETR rather than DETR: DETR needs hundreds of epochs to converge because its queries must
learn to find objects from nothing; RT-DETR starts its queries from the encoder's best-scoring
anchors and trains them with noised ground truth, which is what makes a one-minute CPU budget
enough. Backbone batch norms are left trainable (`freeze_backbone_batch_norms=False`): frozen
statistics only make sense for a pretrained backbone.

It sees its inputs exactly as the `objdet` expert prepares them (the checkpoint's processor at its
fixed square size, here the frame size R) and is saved with `save_pretrained` (model + processor
config, `id2label` = DETECTION_CLASSES), so `--expert objdet --model OUT_DIR` loads it like a
published checkpoint. Held-out quality: precision and recall at IoU >= 0.5 of the detections the
expert would keep (score >= 0.5), with and without requiring the right class.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor, RTDetrResNetConfig

from precompute.sources.shapes import DETECTION_CLASSES, ShapesWorld

EVAL_RESULTS = "eval_results.json"
MATCH_IOU = 0.5
THRESHOLD = 0.5  # the objdet expert's default score threshold


@dataclass(frozen=True)
class ObjDetStandinConfig:
    embedding_size: int = 32
    hidden_sizes: tuple[int, ...] = (32, 64, 128, 128)  # ResNet stages; the last three feed the encoder
    depths: tuple[int, ...] = (1, 1, 1, 1)
    d_model: int = 64
    encoder_ffn_dim: int = 128
    decoder_ffn_dim: int = 128
    decoder_layers: int = 3
    num_queries: int = 10  # a scene has <= 3 objects
    num_denoising: int = 30
    train_scenes: int = 1600
    val_scenes: int = 100
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 0.1  # RT-DETR's own clip_max_norm


FAST = {"train_scenes": 32, "val_scenes": 8, "steps": 8, "warmup_steps": 2, "batch_size": 8}


def build_rtdetr(config: ObjDetStandinConfig, seed: int) -> RTDetrForObjectDetection:
    backbone = RTDetrResNetConfig(
        embedding_size=config.embedding_size,
        hidden_sizes=list(config.hidden_sizes),
        depths=list(config.depths),
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    torch.manual_seed(seed)
    return RTDetrForObjectDetection(RTDetrConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        freeze_backbone_batch_norms=False,
        encoder_hidden_dim=config.d_model,
        encoder_in_channels=list(config.hidden_sizes[1:]),
        encoder_ffn_dim=config.encoder_ffn_dim,
        encoder_attention_heads=4,
        d_model=config.d_model,
        decoder_in_channels=[config.d_model] * 3,
        decoder_ffn_dim=config.decoder_ffn_dim,
        decoder_layers=config.decoder_layers,
        decoder_attention_heads=4,
        num_queries=config.num_queries,
        num_denoising=config.num_denoising,
        num_labels=len(DETECTION_CLASSES),
        id2label=dict(enumerate(DETECTION_CLASSES)),
        label2id={name: i for i, name in enumerate(DETECTION_CLASSES)},
    ))


def build_processor(resolution: int) -> RTDetrImageProcessor:
    """RT-DETR's preprocessing (rescale to [0, 1], no normalisation) at a fixed square size = the frame."""
    return RTDetrImageProcessor(size={"height": resolution, "width": resolution})


def render_split(world: ShapesWorld, split: str, count: int, resolution: int,
                 processor: RTDetrImageProcessor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """(network inputs [N, 3, R, R], per scene {"boxes": x0 y0 x1 y1 fractions [k, 4], "class_labels": [k]})."""
    images, targets = [], []
    for index in range(count):
        scene = world.scene(split, index)
        images.append(world.render(scene))
        truth = world.truth(scene, resolution)
        targets.append({"boxes": torch.from_numpy(truth["boxes"]), "class_labels": torch.from_numpy(truth["box_classes"])})
    size = {"height": resolution, "width": resolution}
    return processor(images=images, size=size, return_tensors="pt")["pixel_values"], targets


def detr_labels(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DETR family's training target: boxes as (centre x, centre y, width, height) fractions."""
    x0, y0, x1, y1 = target["boxes"].unbind(-1)
    boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
    return {"boxes": boxes, "class_labels": target["class_labels"]}


def train(model: RTDetrForObjectDetection, pixels: torch.Tensor, targets: list[dict[str, torch.Tensor]],
          config: ObjDetStandinConfig, seed: int) -> float:
    """AdamW, linear warmup then cosine to 10%, shuffled epochs; the model's own loss; final smoothed loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    labels = [detr_labels(target) for target in targets]
    batch_size = min(config.batch_size, len(pixels))
    order: list[torch.Tensor] = []
    smoothed = float("nan")
    model.train()
    for step in range(config.steps):
        if not order:
            order = [b for b in torch.randperm(len(pixels), generator=generator).split(batch_size) if len(b) == batch_size]
        batch = order.pop(0)
        warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
        decay = 0.1 + 0.45 * (1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * min(warmup, decay)
        loss = model(pixel_values=pixels[batch], labels=[labels[i] for i in batch.tolist()]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        smoothed = loss.item() if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * loss.item()
    model.eval()
    return smoothed


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` [n, 4] with every box in `b` [m, 4] (x0, y0, x1, y1)."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    intersection = (x1 - x0).clip(min=0) * (y1 - y0).clip(min=0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return intersection / np.maximum(area_a[:, None] + area_b[None, :] - intersection, 1e-9)


def true_positives(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, truth_boxes: np.ndarray,
                   truth_labels: np.ndarray, match_classes: bool) -> int:
    """Detections (best score first) that claim a still-unclaimed true box with IoU >= 0.5 (and its class)."""
    iou = box_iou(boxes, truth_boxes)
    claimed = np.zeros(len(truth_boxes), dtype=bool)
    hits = 0
    for i in np.argsort(-scores, kind="stable"):
        allowed = ~claimed & (iou[i] >= MATCH_IOU)
        if match_classes:
            allowed &= truth_labels == labels[i]
        if allowed.any():
            claimed[np.flatnonzero(allowed)[np.argmax(iou[i][allowed])]] = True
            hits += 1
    return hits


@torch.no_grad()
def evaluate(model: RTDetrForObjectDetection, processor: RTDetrImageProcessor, pixels: torch.Tensor,
             targets: list[dict[str, torch.Tensor]], resolution: int) -> dict[str, float]:
    """Precision / recall at IoU >= 0.5 of the detections kept at score >= 0.5, class-aware and class-agnostic."""
    detections = []
    for start in range(0, len(pixels), 32):
        outputs = model(pixel_values=pixels[start : start + 32])
        detections += processor.post_process_object_detection(
            outputs, threshold=THRESHOLD, target_sizes=[(resolution, resolution)] * len(outputs.logits)
        )
    counts = {"detections": 0, "objects": 0, "hits": 0, "box_hits": 0}
    for detection, target in zip(detections, targets):
        boxes, scores, labels = (detection[k].numpy() for k in ("boxes", "scores", "labels"))
        truth_boxes, truth_labels = target["boxes"].numpy() * resolution, target["class_labels"].numpy()
        counts["detections"] += len(boxes)
        counts["objects"] += len(truth_boxes)
        counts["hits"] += true_positives(boxes, scores, labels, truth_boxes, truth_labels, match_classes=True)
        counts["box_hits"] += true_positives(boxes, scores, labels, truth_boxes, truth_labels, match_classes=False)
    return {
        "precision": counts["hits"] / max(counts["detections"], 1),
        "recall": counts["hits"] / max(counts["objects"], 1),
        "box_precision": counts["box_hits"] / max(counts["detections"], 1),
        "box_recall": counts["box_hits"] / max(counts["objects"], 1),
        "detections_per_image": counts["detections"] / max(len(targets), 1),
        "objects_per_image": counts["objects"] / max(len(targets), 1),
    }


def pretrain_objdet(out_dir: Path, world: ShapesWorld, resolution: int = 64, fast: bool = False, seed: int = 0) -> dict:
    """Train the tiny RT-DETR, save model + processor config to `out_dir`, return (and write) val metrics."""
    config = replace(ObjDetStandinConfig(), **FAST) if fast else ObjDetStandinConfig()
    started = time.perf_counter()
    processor = build_processor(resolution)
    train_pixels, train_targets = render_split(world, "train", config.train_scenes, resolution, processor)
    val_pixels, val_targets = render_split(world, "val", config.val_scenes, resolution, processor)
    model = build_rtdetr(config, seed)
    train_loss = train(model, train_pixels, train_targets, config, seed)
    metrics = {
        **evaluate(model, processor, val_pixels, val_targets, resolution),
        "train_loss": train_loss,
        "resolution": resolution,
        "seconds": round(time.perf_counter() - started, 1),
        "config": asdict(config),
    }
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / EVAL_RESULTS).write_text(json.dumps(metrics, indent=2))
    return metrics
