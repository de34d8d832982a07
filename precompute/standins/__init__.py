"""The `shapes` world's stand-ins for Prismer's label experts: the real architectures at tiny size,
trained briefly on what the world's renderer knows exactly (depth order, class masks, boxes), so
the labels they write into the cache mean something. They are saved in their libraries' own
formats and loaded by path by the real experts, like published checkpoints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

EVAL_RESULTS = "eval_results.json"  # written beside each model, as the HF Trainer names it


@contextmanager
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread whatever the caller set, then restore it: the same bytes from
    every caller (float sums differ between thread counts), and on a busy 2-core machine two
    spinning OpenMP threads run several times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_standin(out_dir: Path, model: Any, processor: Any, evaluation: dict, *, train_loss: float, resolution: int,
                 started: float, config: Any) -> dict:
    """Save model + processor config where the expert loads them by path; write and return the
    held-out metrics with what produced them."""
    metrics = {
        **evaluation,
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


def train_steps(model: torch.nn.Module, num_items: int, batch_loss: Callable[[torch.Tensor], torch.Tensor], *, steps: int,
                batch_size: int, learning_rate: float, weight_decay: float, warmup_steps: int, seed: int,
                grad_clip: float = 1.0) -> float:
    """The stand-ins' one training loop: AdamW, linear warmup then cosine to 10%, shuffled epochs of
    full batches from a private generator; `batch_loss(indices)` is the model's own loss on those
    items. Returns the final smoothed loss and leaves the model in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, num_items)
    order: list[torch.Tensor] = []
    smoothed = float("nan")
    model.train()
    for step in range(steps):
        if not order:
            order = [b for b in torch.randperm(num_items, generator=generator).split(batch_size) if len(b) == batch_size]
        batch = order.pop(0)
        warmup = min(1.0, (step + 1) / max(1, warmup_steps))
        decay = 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * min(warmup, decay)
        loss = batch_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        smoothed = loss.item() if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * loss.item()
    model.eval()
    return smoothed
