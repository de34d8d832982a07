"""The training loop shared by every method: short enough to read in one sitting.

fit:  cache -> examples -> AdamW (trainable params only) with warmup + cosine -> checkpoints,
      a JSONL log, periodic eval, and resume from the last checkpoint after a kill.
evaluate_checkpoint: reload frozen backbones by name + the trained tensors, score a split.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cache_schema import CacheError, SplitReader, list_splits
from trainer.checkpoint import find_checkpoint, load_trainable, read_info, save_checkpoint
from trainer.config import TrainConfig, load_config
from trainer.data import CacheExamples, EpochSampler
from trainer.methods import Method, MethodError, get_method


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def resolve_source(config: TrainConfig) -> str:
    sources = sorted({source for source, _ in list_splits(config.cache)})
    if config.source is not None:
        return config.source
    if len(sources) != 1:
        raise CacheError(f"{config.cache} holds sources {sources}; say which with source=NAME")
    return sources[0]


def autocast(device: torch.device):
    """bf16 autocast on GPUs that have it, fp16 otherwise; full precision on CPU."""
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def eval_loader(method: Method, reader: SplitReader, config: TrainConfig) -> DataLoader:
    examples = CacheExamples(reader, method.feature_fields(), lambda a: method.expand(a, train=False),
                             max_examples=config.max_eval_examples)
    return DataLoader(examples, batch_size=config.batch_size, collate_fn=method.collate, num_workers=config.num_workers)


@torch.no_grad()
def predict(method: Method, model: torch.nn.Module, loader: DataLoader, device: torch.device) -> list[dict[str, Any]]:
    model.eval()
    with autocast(device):
        predictions = method.predict(model, loader)
    model.train()
    return predictions


def evaluate(method: Method, model: torch.nn.Module, loader: DataLoader, device: torch.device):
    predictions = predict(method, model, loader, device)
    return method.score(predictions), predictions


def learning_rate_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fit(config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    method = get_method(config)
    source = resolve_source(config)
    train_reader = SplitReader(config.cache, source, config.train_split)
    method.check_cache(train_reader)
    eval_reader = None
    if config.eval_split and (source, config.eval_split) in list_splits(config.cache):
        eval_reader = SplitReader(config.cache, source, config.eval_split)
        method.check_cache(eval_reader)
    method_state = method.derive_state(train_reader)
    method.restore_state(method_state)
    model = method.build_model(train_reader).to(device)
    train_set = CacheExamples(train_reader, method.feature_fields(), lambda a: method.expand(a, train=True))
    if len(train_set) < config.batch_size:
        raise MethodError(f"{len(train_set)} training examples in {source}/{config.train_split}, fewer than one batch of {config.batch_size}")

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{config.method}: {len(train_set)} training examples from {train_reader.num_samples - train_set.skipped_samples} "
          f"samples ({train_set.skipped_samples} skipped: invalid or uncommitted); trainable parameters "
          f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    batches_per_epoch = len(train_set) // config.batch_size
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * batches_per_epoch / config.grad_accum))
    optimizer = torch.optim.AdamW(method.param_groups(model), weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, config, total_steps))
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}

    checkpoint = find_checkpoint(out)
    if checkpoint is not None:
        load_trainable(model, checkpoint)
        saved = torch.load(checkpoint / "training_state.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"])
        print(f"resuming from {checkpoint} at step {state['step']}")

    def batches() -> Iterator[dict[str, Any]]:
        while True:
            sampler = EpochSampler(len(train_set), config.seed, state["epoch"], state["batch_in_epoch"] * config.batch_size)
            loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, collate_fn=method.collate,
                                num_workers=config.num_workers, drop_last=True)
            for batch in loader:
                state["batch_in_epoch"] += 1
                yield batch
            state["epoch"] += 1
            state["batch_in_epoch"] = 0

    info = {"method": config.method, "backbones": method.backbones(), "source": source,
            "features": {f: train_reader.spec(f.partition("/")[0]).to_dict() for f in method.feature_fields().values()},
            "trainable_parameters": trainable, "method_state": method_state}

    def save() -> None:
        training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "state": dict(state), "rng": torch.get_rng_state()}
        save_checkpoint(out, model, config, {**info, "step": state["step"]}, training_state)

    log = (out / "log.jsonl").open("a")
    model.train()
    stream = batches()
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"fit {config.method}", disable=not progress, dynamic_ncols=True)
    window_start, window_examples = time.perf_counter(), 0
    while state["step"] < total_steps:
        loss_value = 0.0
        for _ in range(config.grad_accum):
            batch = next(stream)
            with autocast(device):
                loss = method.loss(model, batch) / config.grad_accum
            scaler.scale(loss).backward()
            loss_value += loss.item()
            window_examples += len(batch["items"])
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state["step"] += 1
        bar.update(1)
        if state["step"] % config.log_every == 0 or state["step"] == total_steps:
            rate = window_examples / (time.perf_counter() - window_start)
            record = {"step": state["step"], "epoch": state["epoch"], "loss": round(loss_value, 5),
                      "lr": scheduler.get_last_lr()[0], "examples_per_s": round(rate, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss_value:.4f}", ex_s=f"{rate:.0f}")
            window_start, window_examples = time.perf_counter(), 0
        if eval_reader is not None and config.eval_every and state["step"] % config.eval_every == 0 and state["step"] < total_steps:
            metrics, _ = evaluate(method, model, eval_loader(method, eval_reader, config), device)
            record_eval(method, out, log, state["step"], metrics)
        if state["step"] % config.save_every == 0:
            save()
    bar.close()
    save()
    metrics: dict[str, float] = {}
    if eval_reader is not None:
        metrics, predictions = evaluate(method, model, eval_loader(method, eval_reader, config), device)
        record_eval(method, out, log, state["step"], metrics)
        write_results(out / "checkpoint", config.eval_split, metrics, predictions)
    log.close()
    return metrics


def record_eval(method: Method, out: Path, log, step: int, metrics: dict[str, Any]) -> None:
    """Append an eval record to the run's log and let the method redraw its figures from all of them."""
    log.write(json.dumps({"step": step, "eval": metrics}) + "\n")
    log.flush()
    with (out / "log.jsonl").open() as f:
        history = [record for record in map(json.loads, f) if "eval" in record]
    method.after_eval(out, history)


def write_results(directory: Path, split: str, metrics: dict[str, float], predictions: list[dict[str, Any]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps({"split": split, **metrics}, indent=1))
    with (directory / f"predictions-{split}.jsonl").open("w") as f:
        for prediction in predictions:
            f.write(json.dumps(prediction) + "\n")


def load_for_eval(cache: str, checkpoint: Path, split: str | None, overrides: list[str]):
    """(method, model, reader, config) rebuilt from a checkpoint: frozen parts by name, trained tensors from disk."""
    info = read_info(checkpoint)
    config = load_config(checkpoint / "config.yaml", overrides, cache=cache)
    if split is not None:
        config.eval_split = split
    device = resolve_device(config.device)
    method = get_method(config)
    for role, backbone in method.backbones().items():
        saved = info["backbones"][role]
        if backbone != saved:
            raise MethodError(f"{checkpoint} was trained against {role} {saved['id']} @ {saved['revision']}; "
                              f"that now resolves to {backbone['id']} @ {backbone['revision']}")
    reader = SplitReader(cache, info["source"], config.eval_split)
    method.check_cache(reader)
    method.restore_state(info.get("method_state", {}))
    model = method.build_model(reader).to(device)
    load_trainable(model, checkpoint)
    return method, model, reader, config


def evaluate_checkpoint(cache: str, checkpoint: Path, split: str | None, overrides: list[str], out: Path | None = None,
                        score: bool = True) -> dict[str, float]:
    """Score a split (writes metrics.json + predictions), or with score=False only predict (unlabelled splits)."""
    method, model, reader, config = load_for_eval(cache, checkpoint, split, overrides)
    predictions = predict(method, model, eval_loader(method, reader, config), resolve_device(config.device))
    metrics = method.score(predictions) if score else {}
    write_results(out or checkpoint, config.eval_split, metrics, predictions)
    return metrics
