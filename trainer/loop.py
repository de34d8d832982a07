"""The training loop shared by every method: short enough to read in one sitting.

fit:  cache -> examples -> AdamW (trainable params only) with transformers' warmup + cosine -> checkpoints,
      a JSONL log, periodic eval, and resume from the last checkpoint after a kill.
train: that loop for one process; `fit` runs it here, trainer/distributed.py on every Ray Train
      rank (build_run, then train with the DDP-wrapped model and the rank's slice of each batch).
evaluate_checkpoint: reload frozen backbones by name + the trained tensors, score a split.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from cache_schema import Cache, CacheError, SplitReader, open_cache
from cache_schema.torch_data import CacheDataset, ShardStream
from trainer.checkpoint import check_resume, find_checkpoint, load_trainable, read_info, save_checkpoint
from trainer.config import TrainConfig, load_config
from trainer.data import check_views, eval_examples, train_batches, training_examples
from trainer.logs import RunLog
from trainer.methods import MethodError, get_method
from trainer.methods.base import Method

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def resolve_source(config: TrainConfig, cache: Cache) -> str:
    if config.source is not None:
        return config.source
    if len(cache.sources) != 1:
        raise CacheError(f"{config.cache} holds sources {cache.sources}; say which with source=NAME")
    return cache.sources[0]


def autocast(device: torch.device):
    """bf16 autocast on GPUs that have it, fp16 otherwise; full precision on CPU."""
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def eval_loader(method: Method, reader: SplitReader, config: TrainConfig) -> DataLoader:
    return DataLoader(eval_examples(reader, method, config), batch_size=config.batch_size, collate_fn=method.collate, num_workers=config.num_workers)


@torch.no_grad()
def evaluate(method: Method, model: torch.nn.Module, loader: DataLoader, device: torch.device,
             score: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, predictions) in eval mode under autocast; score=False: predictions only, metrics {}."""
    model.eval()
    with autocast(device):
        metrics, predictions = method.evaluate(model, loader) if score else ({}, method.predict(model, loader))
    model.train()
    return metrics, predictions


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> LambdaLR:
    """transformers' linear warmup over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`;
    with several parameter groups each decays to the same fraction (min_lr / lr) of its own peak,
    except a group a method marks `fixed_lr`, which keeps its lr from the first step to the last
    (eP-ALM's prompt and adapters)."""
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, config.warmup_steps, total_steps,
                                                           min_lr_rate=config.min_lr / config.lr)
    if not any(group.get("fixed_lr") for group in optimizer.param_groups):
        return schedule
    cosine = schedule.lr_lambdas[0]
    for group in optimizer.param_groups:  # undo the first factor transformers' schedule applied
        group["lr"] = group["initial_lr"]
    return LambdaLR(optimizer, [(lambda step: 1.0) if group.get("fixed_lr") else cosine
                                for group in optimizer.param_groups])


@dataclass
class Run:
    """What one training process builds before its first step: the same in a single process and
    on every Ray Train rank (trainer/distributed.py), so both train exactly the same thing."""

    config: TrainConfig
    method: Method
    model: torch.nn.Module  # unwrapped: what is checkpointed and evaluated
    train_set: CacheDataset | ShardStream
    eval_reader: SplitReader | None
    info: dict[str, Any]  # checkpoint.json, less the step
    device: torch.device
    total_steps: int


def open_splits(config: TrainConfig) -> tuple[Method, str, SplitReader, SplitReader | None]:
    """The method, the source, and the train / eval splits, checked against the method's needs:
    cheap (headers and specs only), so a bad cache or config fails before anything heavy loads."""
    method = get_method(config)
    cache = open_cache(config.cache)
    source = resolve_source(config, cache)
    train_reader = cache.split(config.train_split, source)
    method.check_cache(train_reader)
    check_views(train_reader, method)
    eval_reader = None
    if config.eval_split and f"{source}/{config.eval_split}" in cache.splits:
        eval_reader = cache.split(config.eval_split, source)
        method.check_cache(eval_reader)
    return method, source, train_reader, eval_reader


def build_run(config: TrainConfig, device: torch.device, verbose: bool = True) -> Run:
    """Method, model (frozen backbones + trainable parts, seeded by `config.seed`) and examples."""
    torch.manual_seed(config.seed)
    method, source, train_reader, eval_reader = open_splits(config)
    method_state = method.derive_state(train_reader)
    method.restore_state(method_state)
    model = method.build_model(train_reader).to(device)
    train_set = training_examples(train_reader, method, config)
    if len(train_set) < config.batch_size:
        raise MethodError(f"{len(train_set)} training examples in {source}/{config.train_split}, fewer than one batch of {config.batch_size}")

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info(f"{config.method}: {len(train_set)} training examples from {train_reader.num_samples - train_set.skipped_samples} "
                    f"samples ({train_set.skipped_samples} skipped: invalid or uncommitted); trainable parameters "
                    f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    batches_per_epoch = len(train_set) // config.batch_size
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * batches_per_epoch / config.grad_accum))
    info = {"method": config.method, "backbones": method.backbones(), "source": source,
            "features": {f: train_reader.spec(f.partition("/")[0]).to_dict() for f in method.feature_fields().values()},
            "trainable_parameters": trainable, "method_state": method_state}
    return Run(config, method, model, train_set, eval_reader, info, device, total_steps)


def fit(config: TrainConfig, progress: bool = True, allow_config_change: bool = False) -> dict[str, Any]:
    """Train in this process, resuming from OUT/checkpoint when there is one; the final metrics.

    A checkpoint made with another config is refused (ConfigError) unless `allow_config_change`
    (trainer/checkpoint.py: check_resume); nothing is written before the run is built, so bad
    input leaves OUT as it was.
    """
    check_resume(Path(config.out), config, allow_config_change)
    run = build_run(config, resolve_device(config.device))
    Path(config.out).mkdir(parents=True, exist_ok=True)
    return train(run, run.model, find_checkpoint(Path(config.out)), progress=terminal_bar if progress else None)


def terminal_bar(total: int, initial: int, desc: str) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def train(run: Run, model: torch.nn.Module, checkpoint: Path | None, rank: int = 0, world_size: int = 1,
          progress: Callable[[int, int, str], Any] | None = None,
          on_save: Callable[[Path | None, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The training loop of one process: the whole run, or rank `rank` of `world_size` data-parallel ones.

    `model` is what the loss runs through (`run.model`, or its DDP wrapper on a rank); `run.model`
    is what is saved and evaluated. Every rank takes its slice of each global batch
    (`train_batches`) and meets the others at the same steps: gradient all-reduce (DDP), the
    logged loss, and every save. Rank 0 alone writes the log and checkpoints, evaluates and
    shows progress (`progress(total, initial, desc)` makes a tqdm-like bar). `on_save(checkpoint
    or None, metrics)` runs on every rank after each save (and after the final evaluation): how
    Ray Train hears of checkpoints.
    """
    config, method, device, out = run.config, run.method, run.device, Path(run.config.out)
    leader = rank == 0
    optimizer = torch.optim.AdamW(method.param_groups(run.model), weight_decay=config.weight_decay)
    scheduler = lr_schedule(optimizer, config, run.total_steps)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}

    if checkpoint is not None:
        load_trainable(run.model, checkpoint)
        saved = torch.load(checkpoint / "training_state.pt", weights_only=False)
        configured = [{key: value for key, value in group.items() if key not in ("params", "lr")}
                      for group in optimizer.param_groups]
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        apply_config_to_restored(optimizer, scheduler, configured)
        state = saved["state"]
        rng = saved.get("rank_rng", [saved["rng"]])
        if rank < len(rng):
            torch.set_rng_state(rng[rank])
        if leader:
            logger.info(f"resuming from {checkpoint} at step {state['step']}")

    def save() -> Path | None:
        rng = gather(torch.get_rng_state(), world_size)
        if not leader:
            return None
        training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "state": dict(state), "rng": rng[0], **({"rank_rng": rng} if world_size > 1 else {})}
        return save_checkpoint(out, run.model, config, {**run.info, "step": state["step"]}, training_state)

    log = RunLog(out, config, state["step"]) if leader else None
    model.train()
    stream = train_batches(run.train_set, method, config, state, rank, world_size)
    bar = progress(run.total_steps, state["step"], f"fit {config.method}") if progress and leader else tqdm(disable=True)
    window_start, window_examples = time.perf_counter(), 0
    while state["step"] < run.total_steps:
        loss_value = 0.0
        for micro in range(config.grad_accum):
            batch = next(stream)
            with accumulating(model, last=micro == config.grad_accum - 1):
                with autocast(device):
                    loss = method.loss(model, batch) / config.grad_accum
                scaler.scale(loss).backward()
            loss_value += loss.item()
            window_examples += len(batch["items"])
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state["step"] += 1
        bar.update(1)
        if state["step"] % config.log_every == 0 or state["step"] == run.total_steps:
            loss_sum, examples = sum_over_ranks([loss_value, window_examples], world_size, device)
            loss_value, rate = loss_sum / world_size, examples / (time.perf_counter() - window_start)
            if leader:
                record = {"step": state["step"], "epoch": state["epoch"], "loss": round(loss_value, 5),
                          "lr": scheduler.get_last_lr()[0], "examples_per_s": round(rate, 1)}
                log.train(record)
                bar.set_postfix(loss=f"{loss_value:.4f}", ex_s=f"{rate:.0f}")
            window_start, window_examples = time.perf_counter(), 0
        if (leader and run.eval_reader is not None and config.eval_every and state["step"] % config.eval_every == 0
                and state["step"] < run.total_steps):
            evaluating = time.perf_counter()
            metrics, _ = evaluate(method, run.model, eval_loader(method, run.eval_reader, config), device)
            log.figures(method.figures(log.eval(state["step"], metrics)), state["step"])
            window_start += time.perf_counter() - evaluating  # examples_per_s is the training's rate
        if state["step"] % config.save_every == 0 and state["step"] < run.total_steps:
            path = save()
            if on_save is not None:
                on_save(path, {"step": state["step"]})
    bar.close()
    path = save()
    metrics: dict[str, Any] = {}
    if leader and run.eval_reader is not None:
        metrics, predictions = evaluate(method, run.model, eval_loader(method, run.eval_reader, config), device)
        log.figures(method.figures(log.eval(state["step"], metrics)), state["step"])
        write_results(out / "checkpoint", config.eval_split, metrics, predictions)
    if log is not None:
        log.close()
    if on_save is not None:
        on_save(path, {"step": state["step"], **metrics})
    return metrics


def apply_config_to_restored(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, configured: list[dict[str, Any]]) -> None:
    """Restored optimizer and schedule state carry the hyperparameters of the run that saved them
    (weight decay, base learning rates); a resume with an accepted config change
    (`--allow-config-change`) must train with the new ones, as checkpoint.json records. With no
    change this leaves the restored state exactly as it was (the kill-and-resume tests)."""
    for group, values in zip(optimizer.param_groups, configured):
        group.update({key: value for key, value in values.items() if group.get(key) != value})
    bases = [group["initial_lr"] for group in optimizer.param_groups]
    if bases != scheduler.base_lrs:
        scheduler.base_lrs = bases
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # as LambdaLR sets it (its factors: this run's config)


def accumulating(model: torch.nn.Module, last: bool):
    """DDP all-reduces gradients on every backward; while accumulating micro-batches only the last needs to."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()


def sum_over_ranks(values: list[float], world_size: int, device: torch.device) -> list[float]:
    """`values` summed over the ranks (a collective: every rank calls it at the same step)."""
    if world_size == 1:
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(summed)
    return summed.tolist()


def gather(value: Any, world_size: int) -> list[Any]:
    """`value` from every rank, in rank order (a collective: every rank calls it at the same step)."""
    if world_size == 1:
        return [value]
    values: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(values, value)
    return values


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
    reader = open_cache(cache).split(config.eval_split, info["source"])
    method.check_cache(reader)
    method.restore_state(info.get("method_state", {}))
    model = method.build_model(reader).to(device)
    load_trainable(model, checkpoint)
    return method, model, reader, config


def evaluate_checkpoint(cache: str, checkpoint: Path, split: str | None, overrides: list[str], out: Path | None = None,
                        score: bool = True) -> dict[str, float]:
    """Score a split (writes metrics.json + predictions), or with score=False only predict (unlabelled splits)."""
    method, model, reader, config = load_for_eval(cache, checkpoint, split, overrides)
    metrics, predictions = evaluate(method, model, eval_loader(method, reader, config), resolve_device(config.device), score)
    write_results(out or checkpoint, config.eval_split, metrics, predictions)
    return metrics
