"""`trainer fit --workers N`: the same training loop on N Ray Train workers, data-parallel (DDP).

Every worker is one rank and builds the run exactly as a single process does (`loop.build_run`),
wraps the model in DDP (gloo on CPU, NCCL on GPU), takes its `batch_size / N` slice of each
global batch (`data.train_batches`) and runs `loop.train`. DDP averages the gradients over the
ranks, so N ranks take the steps one process would take with the whole batch.

Checkpoints go through Ray Train: at every save rank 0 writes OUT/checkpoint (the single-process
layout, the unwrapped model's keys, so `trainer eval` reads it unchanged) and reports it, and Ray
Train copies it into its own storage, OUT/ray. A rank that starts, or restarts after Ray Train
replaced a lost worker (`max_failures` times at most), resumes from the later of the two; a
requeued job (a new `trainer fit` with the same --out) resumes the same way. OUT must be on
storage every node sees.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.experimental import tqdm_ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend
from torch.nn.parallel import DistributedDataParallel

from cache_schema import CacheLayout
from cache_schema.console import show_messages
from raysession import init_ray as start_ray
from trainer.checkpoint import find_checkpoint, read_info
from trainer.config import ConfigError, TrainConfig
from trainer.errors import USER_ERRORS
from trainer.loop import build_run, open_splits, train

RUN_NAME = "train"  # OUT/ray/train: Ray Train's run; a new `trainer fit` with the same OUT continues it


def init_ray(address: str | None) -> None:
    """`raysession.init_ray`; on the private local Ray, gloo and NCCL open their own sockets on the
    loopback interface too (by default they take the interface the machine's hostname resolves to)."""
    loopback = next((name for _, name in socket.if_nameindex() if name in ("lo", "lo0")), "lo")
    env_vars = {name: os.environ.get(name, loopback) for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    start_ray(address, runtime_env={"worker_process_setup_hook": quiet_placement_group_cleaner, "env_vars": env_vars})


@dataclass
class LocalTorchConfig(TorchConfig):
    """Ray Train's torch setup for a run on the local Ray: the ranks meet through a file in
    `rendezvous_dir` (torch's FileStore) instead of a TCPStore, which rank 0 would serve on every
    interface of the machine (torch binds it to the wildcard address, whatever MASTER_ADDR says).
    Every rank runs on this machine, so a local file is where they all look."""

    rendezvous_dir: str = ""

    @property
    def backend_cls(self) -> type:
        return LocalTorchBackend


class LocalTorchBackend(_TorchBackend):
    """`_TorchBackend` with the process group made through a FileStore (see `LocalTorchConfig`):
    a fresh file for every worker group, so a group Ray Train restarts never meets a stale one."""

    def on_start(self, worker_group: Any, backend_config: LocalTorchConfig) -> None:
        url = f"file://{Path(backend_config.rendezvous_dir) / f'group-{uuid.uuid4().hex}'}"
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, _setup_torch_process_group, backend=backend_config.backend,
                                                   world_rank=rank, world_size=len(worker_group), init_method=url,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])


def quiet_placement_group_cleaner() -> None:
    """Ray Train's placement-group cleaner asks the State API, which lives in the dashboard, every
    second whether the run's controller is alive; without a dashboard each failed ask is a warning
    line on the terminal, all run long. Its own failures (ERROR) still show."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def worker_layout(workers: int, use_gpu: bool) -> tuple[dict[str, float], int]:
    """(Ray resources per worker, torch threads per worker).

    A GPU each on GPU clusters; CPUs: an even share of the smallest node's, less one CPU left free
    for Ray Train's own actors and tasks (workers that take every CPU starve them, and the run
    hangs), so on a 2-CPU machine two workers ask for half a CPU each and run one thread each.
    """
    alive = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if use_gpu:
        hosts = [resources for resources in alive if resources.get("GPU", 0) >= 1]
        per_node = min(workers, int(min(resources["GPU"] for resources in hosts)))
    else:
        hosts = [resources for resources in alive if resources.get("CPU", 0) > 0]
        per_node = -(-workers // len(hosts))
    cpus = min(resources.get("CPU", 0) for resources in hosts)
    share = max(cpus - 1, cpus / 2) / per_node
    return {"CPU": share, **({"GPU": 1} if use_gpu else {})}, max(1, round(share))


def fit_distributed(config: TrainConfig, workers: int, address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train on `workers` Ray Train workers (local Ray, or the cluster at `address`); the final metrics."""
    if config.batch_size % workers:
        raise ConfigError(f"batch_size={config.batch_size} (the global batch) does not split evenly over {workers} workers; "
                          f"give a multiple of {workers}")
    open_splits(config)  # a bad cache or config fails here, not once per worker restart
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = replace(config, out=str(out), cache=str(CacheLayout(config.cache).root))  # what every worker reads
    init_ray(address)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = config.device.startswith("cuda") or (config.device == "auto" and gpus > 0)
    if use_gpu and workers > gpus:
        raise ConfigError(f"--workers {workers} needs {workers} GPUs; the Ray cluster has {gpus:g}")
    resources, threads = worker_layout(workers, use_gpu)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # rank 0's prints once, not twice
    backend = "nccl" if use_gpu else "gloo"
    rendezvous = None if address else tempfile.mkdtemp(prefix="ec-rendezvous-")
    torch_config = LocalTorchConfig(backend=backend, rendezvous_dir=rendezvous) if rendezvous else TorchConfig(backend=backend)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.to_dict(), "cwd": os.getcwd(), "threads": threads, "use_gpu": use_gpu,
                           "progress": progress},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=torch_config,
        run_config=RunConfig(name=RUN_NAME, storage_path=str(out / "ray"),
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as error:
        failures = [getattr(failure, "cause", failure) for _, failure in sorted(error.worker_failures.items())]
        if failures and all(isinstance(failure, USER_ERRORS) for failure in failures):
            raise failures[0] from error  # bad input found on the workers: the same message as in one process
        raise
    finally:
        if rendezvous:
            shutil.rmtree(rendezvous, ignore_errors=True)
    return {key: value for key, value in result.metrics.items() if key != "step"}


class RankModel(DistributedDataParallel):
    """DDP whose attribute reads fall through to the wrapped model, so a method's `loss` (which
    reads e.g. `model.lm.device`, then calls `model(...)`) runs unchanged on a rank."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model: torch.nn.Module, device: torch.device) -> RankModel:
    """The rank's model in DDP, syncing only what trains.

    Frozen weights and buffers come from the same files on every rank: DDP would broadcast them
    at the start (gigabytes for an LM) and the buffers before every step, for nothing.
    `find_unused_parameters`: a method may build trainable parts a step never reaches (eP-ALM's
    blind baseline keeps its connectors), and DDP would otherwise wait for their gradients.
    """
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad] + [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return RankModel(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def resume_point(out: Path) -> Path | None:
    """The later of Ray Train's last reported checkpoint and OUT/checkpoint (ties: Ray Train's).

    OUT/checkpoint is ahead when a kill fell between rank 0's save and its report, or when a
    single-process run continued this OUT; resuming from the older one would overwrite newer work.
    Ray Train's storage is OUT/ray, a local or shared path, so its checkpoint is a directory here.
    """
    reported = ray.train.get_checkpoint()
    candidates = [Path(reported.path)] if reported is not None else []
    candidates += [path for path in [find_checkpoint(out)] if path is not None]
    return max(candidates, key=lambda path: read_info(path)["step"], default=None)


def report(checkpoint: Path | None, metrics: dict[str, Any]) -> None:
    """Every rank reports at every save (Ray Train's barrier); rank 0 hands over the checkpoint,
    which Ray Train copies into OUT/ray while OUT/checkpoint stays where it is."""
    ray.train.report(metrics, checkpoint=None if checkpoint is None else Checkpoint.from_directory(checkpoint),
                     delete_local_checkpoint_after_upload=False)


def train_worker(params: dict[str, Any]) -> None:
    """One rank, in a Ray Train worker process."""
    show_messages("trainer", "stdout")  # rank 0's messages reach the driver's console through the worker's stdout
    if os.path.isdir(params["cwd"]):
        os.chdir(params["cwd"])  # a relative model path means what it meant to `trainer fit`
    torch.set_num_threads(params["threads"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    config = TrainConfig(**params["config"])
    device = ray.train.torch.get_device() if params["use_gpu"] else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run = build_run(config, device, verbose=rank == 0)
    if rank:  # dropout, router noise, augmentation: a stream per rank (rank 0 keeps a single process's)
        torch.manual_seed(config.seed * 100_003 + rank)
    checkpoint = resume_point(Path(config.out))
    train(run, wrap(run.model, device), checkpoint, rank, world_size, DriverBar if params["progress"] else None, report)


class DriverBar:
    """The loop's progress bar on rank 0, drawn on the driver's terminal by Ray's tqdm_ray: a
    worker's own tqdm reaches the driver through Ray's line-by-line log forwarding as one endless line."""

    def __init__(self, total: int, initial: int, desc: str):
        self.desc = desc
        self.bar = tqdm_ray.tqdm(total=total, desc=desc)
        self.bar.n = initial

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        self.bar.set_description(" ".join([self.desc, *(f"{key}={value}" for key, value in values.items())]))

    def close(self) -> None:
        self.bar.close()
