"""The precompute engine: plan shards, run experts on a Ray actor pool, commit each shard.

    Source.samples() ──► SplitPlan ──► pending shards (no valid commit record)
                                          │  one task per (expert, shard)
                                          ▼
        ShardWorker actor (model resident): decode threads ─► preprocess ─► batched predict
                                          │
                                          ▼
                     CacheWriter.write_shard: arrays, then the commit record (last)

Experts that read another expert's labels (objdet needs depth) run after it; a shard whose input
feature is not committed is refused and recorded, never run on missing data. Every shard is
written by exactly one actor, into exactly one Zarr storage shard, so no two writers ever share a file. A killed driver loses nothing committed: the same command plans again
and only shards without a valid record run. A failed shard is retried on a fresh attempt; one
that keeps failing is recorded under `_failures/` while the others finish.

On a cluster (`--address`) the actors spread over the nodes: one per GPU, or on CPU-only clusters
one per node. An actor whose process or node dies is retired, its shard goes back in the queue,
and a replacement starts only where the cluster has room for it, so losing a node slows the run
down instead of stalling it. Commit records name the Ray node that wrote them.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from tqdm import tqdm
from transformers.utils import logging as transformers_logging

from cache_schema import CacheWriter, CommitRecord, FeatureSpec, SplitPlan, SplitReader, write_table
from precompute.experts import ExpertError, expand_experts, get_expert
from precompute.experts.base import Expert
from precompute.forward import run_samples, with_input_provenance
from precompute.sources import Sample, Source, get_source
from raysession import init_ray

logger = logging.getLogger(__name__)


@dataclass
class RunConfig:
    experts: list[str]
    source: str
    data_root: str | None = None
    split: str = "train"
    cache: str = "./cache"  # a directory or an fsspec URL (s3://…, gs://…, file://…)
    format: str = "zarr"  # or "wds": WebDataset tar shards
    models: dict[str, str] = field(default_factory=dict)  # expert name -> hub id / name / path
    shard_size: int = 256
    batch_size: int = 32
    limit: int | None = None
    address: str | None = None
    overwrite: bool = False
    workers: int | None = None
    retries: int = 2
    decode_threads: int | None = None  # per actor; None: the actor's CPUs, at least 2
    source_options: dict[str, Any] = field(default_factory=dict)
    expert_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExpertSummary:
    expert: str
    shards_total: int
    shards_skipped: int = 0
    shards_done: int = 0
    shards_failed: list[int] = field(default_factory=list)
    samples: int = 0
    invalid: int = 0
    seconds: float = 0.0
    nodes: set[str] = field(default_factory=set)  # Ray nodes that committed shards

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def plan_split(source: Source, source_name: str, shard_size: int, limit: int | None,
               options: dict[str, Any] | None = None) -> tuple[SplitPlan, list[Sample]]:
    """The split's shard plan and its samples; the source `options` the run was given are kept in
    the plan's source record, so `precompute verify` can read the same samples again."""
    samples = source.samples()
    if limit is not None:
        samples = samples[:limit]
    plan = SplitPlan(
        source=source_name,
        split=source.split,
        keys=[s.key for s in samples],
        annotations=[s.annotations for s in samples],
        shard_size=shard_size,
        source_info={**source.info(), "options": options or {}},
    )
    return plan, samples


class ShardWorker:
    """Keeps one expert loaded; turns one shard of samples into one committed cache shard.

    The work on the samples is `precompute.forward.run_samples` (decode threads ahead of batched
    predict), the same path `precompute verify` takes.
    """

    def __init__(self, expert: str, model: str | None, expert_options: dict[str, Any], source_name: str,
                 sources: dict[str, Source], cache: str, format: str, threads: int, decode_threads: int):
        self.cache = cache
        torch.set_num_threads(threads)
        transformers_logging.disable_progress_bar()  # per-actor "Loading weights" bars would interleave with ours
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.load_error: str | None = None
        try:
            self.expert = get_expert(expert, model=model, device=device, **expert_options)
            self.expert.load()
        except Exception as e:  # the model's fault: kept for `loaded`, so the actor's own death means only that
            lines = str(e).strip().splitlines()
            self.load_error = lines[0] if isinstance(e, ExpertError) and lines else f"{type(e).__name__}: {lines[0] if lines else ''}"
        self.source_name, self.sources = source_name, sources  # split -> source: one load serves every split
        self.writer = CacheWriter(cache, format)
        self.decoder = ThreadPoolExecutor(max_workers=decode_threads)
        self.device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{threads} threads"
        self.node = ray.get_runtime_context().get_node_id()

    def loaded(self) -> str | None:
        """None once the model is loaded; else why it could not load (one line)."""
        return self.load_error

    def spec(self, feature: str) -> FeatureSpec:
        return self.expert.spec(feature)

    def tables(self) -> dict:
        return self.expert.tables()

    def pid(self) -> int:
        return os.getpid()

    def _inputs(self, required: list[str], split: str, shard: int) -> dict[str, dict[str, np.ndarray]]:
        """The required features' stored arrays for this shard's samples (one tar read per feature
        in the WebDataset form; the driver only sends shards whose inputs are committed)."""
        if not required:
            return {}
        reader = SplitReader(self.cache, self.source_name, split)
        return {name: reader.feature(name).shard(shard)[0] for name in required}

    def run_shard(self, spec: FeatureSpec, split: str, shard: int, start: int, samples: list[Sample], batch_size: int,
                  required: list[str]) -> dict[str, Any]:
        if self.load_error is not None:  # a replacement actor whose model did not load
            raise ExpertError(self.load_error)
        record = commit_shard(self.expert, spec, self.writer, self.source_name, self.sources[split], shard, start,
                              samples, batch_size, self._inputs(required, split, shard), self.decoder,
                              self.device_name, self.node)
        return {"shard": shard, "samples": record.num_samples, "invalid": record.num_samples - record.num_valid,
                "seconds": record.seconds, "node": self.node}


def commit_shard(expert: Expert, spec: FeatureSpec, writer: CacheWriter, source_name: str, source: Source, shard: int,
                 start: int, samples: list[Sample], batch_size: int, inputs: dict[str, dict[str, np.ndarray]],
                 decoder: ThreadPoolExecutor, device: str, node: str = "") -> CommitRecord:
    """One shard from samples to commit record, as an actor does it: `run_samples`, then the writer.

    A function of its own (not only the actor's method) so that a benchmark or a machine without
    Ray can time exactly the actor's code path in-process.
    """
    began = time.perf_counter()
    arrays, valid, invalid, profile = run_samples(expert, spec, source, samples, batch_size, inputs, decoder)
    return writer.write_shard(source_name, source.split, spec, shard, start, [s.key for s in samples], arrays, valid,
                              invalid, time.perf_counter() - began, device, node=node, profile=profile)


class InfrastructureError(Exception):
    """Something under the run died (a Ray actor's process, a node): not the input's fault, exit 1.
    Nothing committed is lost, so running the same command again resumes."""


def what_died(error: Exception) -> str:
    """One line naming what a Ray error says died: the process and node of a dead actor and Ray's
    reason, or the error's own first line."""
    if isinstance(error, ray.exceptions.RayActorError):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        fields = dict(line.split(": ", 1) for line in lines if line.split(": ", 1)[0] in ("pid", "ip", "class_name"))
        reason = next((line for line in lines if line.startswith("The actor is dead because")), lines[0] if lines else "")
        reason = reason.split(" Some common causes")[0][:300]  # Ray's guesses at why follow
        where = " on ".join(f"{key} {fields[key]}".removeprefix("ip ") for key in ("pid", "ip") if key in fields)
        return f"{where}: {reason}" if where else reason
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def worker_layout(workers: int | None) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) from what the cluster offers.

    One actor per GPU when there are GPUs. On CPU, one actor per node by default (`workers`
    overrides), each taking an even share of the smallest node's CPUs as torch threads (Ray sets
    OMP_NUM_THREADS from num_cpus): an actor asking for more CPUs than one node has would never
    be scheduled, and one per node is what uses a CPU cluster without threads fighting.
    """
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if gpus:
        count = workers or gpus
        return count, max(1.0, cpus // count), 1.0
    node_cpus = [int(node["Resources"]["CPU"]) for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")]
    count = workers or max(1, len(node_cpus))
    per_node = -(-count // max(1, len(node_cpus)))
    return count, max(1, min(node_cpus, default=cpus) // per_node), 0.0


def run(config: RunConfig, progress: bool = True) -> list[ExpertSummary]:
    """Run every requested expert over one source split (`config.split`); see `run_splits`."""
    return run_splits(config, [config.split], progress)[config.split]


@dataclass
class SplitWork:
    source: Source
    plan: SplitPlan
    samples: list[Sample]


def run_splits(config: RunConfig, splits: list[str], progress: bool = True) -> dict[str, list[ExpertSummary]]:
    """Run every requested expert over each of the source's `splits`: split -> one summary per expert.
    Raises on bad input (in any split) before any work.

    Experts run in dependency order (`prismer` expands to all of Prismer's, depth before objdet),
    each over every split with one pool of actors, so a model loads once per run however many
    splits it covers (per split, its load and the actors' start cost more than a small split's work).
    """
    names = expand_experts(config.experts)
    unknown_models = set(config.models) - set(names)
    if unknown_models:
        raise ExpertError(f"--model given for {sorted(unknown_models)}, which this run does not include ({', '.join(names)})")
    experts = {name: get_expert(name, model=config.models.get(name), **config.expert_options.get(name, {})) for name in names}
    for expert in experts.values():  # a model that cannot load: one line now, not a Ray traceback after planning
        expert.check_model()
    order = dependency_order(experts)
    writer = CacheWriter(config.cache, config.format)
    work: dict[str, SplitWork] = {}
    for split in splits:
        source = get_source(config.source, config.data_root, split, **config.source_options)
        plan, samples = plan_split(source, config.source, config.shard_size, config.limit, config.source_options)
        work[split] = SplitWork(source, plan, samples)
    for split, split_work in work.items():
        writer.prepare_split(split_work.plan, overwrite=config.overwrite)
        manifest = writer.layout.read_manifest()["features"]
        for name in order:
            for required in experts[name].requires():
                if required not in experts and f"{config.source}/{split}/{required}" not in manifest:
                    raise ExpertError(
                        f"{name} reads the {required!r} feature, which {config.cache} does not have for "
                        f"{config.source}/{split}; run `--expert {required}` first, or ask for both (`--expert {required},{name}`)"
                    )
    init_ray(config.address)
    count, cpus, gpus = worker_layout(config.workers)
    summaries: dict[str, list[ExpertSummary]] = {split: [] for split in splits}
    for name in order:
        for split, summary in _run_expert(name, experts[name].requires(), config, work, writer, count, cpus, gpus,
                                          progress).items():
            summaries[split].append(summary)
    return summaries


def has_room(cpus: float, gpus: float) -> bool:
    """Whether the cluster has the resources of one more actor free right now."""
    free = ray.available_resources()
    return free.get("CPU", 0) >= cpus and free.get("GPU", 0) >= gpus


def dependency_order(experts: dict[str, Any]) -> list[str]:
    """The requested experts, each after the ones it reads (requested order otherwise kept)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order or name not in experts:
            return
        if name in path:
            raise ExpertError(f"experts depend on each other in a cycle: {' -> '.join(path + (name,))}")
        for required in experts[name].requires():
            visit(required, path + (name,))
        order.append(name)

    for name in experts:
        visit(name, ())
    return order


def check_inputs(name: str, spec: FeatureSpec, required: tuple[str, ...], writer: CacheWriter,
                 plan: SplitPlan) -> tuple[FeatureSpec, set[int], str]:
    """The spec with its inputs' provenance added (`with_input_provenance`), the shards whose
    inputs are committed, and why the others are refused."""
    manifest = writer.layout.read_manifest()["features"]
    ready = set(range(plan.num_shards))
    required_specs = {feature: FeatureSpec.from_dict(manifest[f"{plan.source}/{plan.split}/{feature}"]) for feature in required}
    for required_spec in required_specs.values():
        ready &= writer.committed_shards(plan, required_spec)
    spec = with_input_provenance(name, spec, required_specs)
    return spec, ready, f"refused: {', '.join(required)} not committed for this shard (run it first)"


def _run_expert(name: str, required: tuple[str, ...], config: RunConfig, work: dict[str, SplitWork],
                writer: CacheWriter, count: int, cpus: float, gpus: float, progress: bool) -> dict[str, ExpertSummary]:
    # SPREAD: one actor per node when there are as many actors as nodes. No restarts: a dead actor
    # (its process or its node gone) is replaced below, where the cluster still has room for it.
    worker_cls = ray.remote(ShardWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0,
                                                 scheduling_strategy="SPREAD")
    cache = str(writer.layout.root)

    def start_actor() -> Any:
        return worker_cls.remote(name, config.models.get(name), config.expert_options.get(name, {}), config.source,
                                 {split: split_work.source for split, split_work in work.items()}, cache, config.format,
                                 int(cpus), config.decode_threads or max(2, int(cpus)))

    actors = [start_actor() for _ in range(count)]
    try:
        load_error = ray.get(actors[0].loaded.remote())
        if load_error is None:
            spec = ray.get(actors[0].spec.remote(name))
            tables = ray.get(actors[0].tables.remote())
    except ray.exceptions.RayError as e:  # not the model: the actor's process or node is gone
        for actor in actors:
            ray.kill(actor)
        raise InfrastructureError(f"the Ray worker for expert {name!r} died ({what_died(e)}): infrastructure failure; "
                                  "run again to resume") from e
    if load_error is not None:
        for actor in actors:
            ray.kill(actor)
        raise ExpertError(f"expert {name!r} could not load model {config.models.get(name) or 'default'}: {load_error}")
    try:
        for table_name, table in tables.items():
            write_table(config.cache, table_name, table, overwrite=config.overwrite)
        summaries = {}
        for split, split_work in work.items():
            summaries[split] = _run_split(name, required, config, split_work, spec, writer, actors, start_actor,
                                          cpus, gpus, progress)
    finally:
        for actor in actors:
            ray.kill(actor)
    return summaries


def _run_split(name: str, required: tuple[str, ...], config: RunConfig, work: SplitWork, spec: FeatureSpec,
               writer: CacheWriter, actors: list[Any], start_actor: Any, cpus: float, gpus: float,
               progress: bool) -> ExpertSummary:
    """One expert over one split's pending shards on the pool `actors` (dead actors are retired from
    it and replaced where there is room, so the next split gets the pool as this one left it)."""
    plan, samples = work.plan, work.samples
    spec, inputs_ready, refusal = check_inputs(name, spec, required, writer, plan)
    writer.prepare_feature(plan, spec, overwrite=config.overwrite, options=config.expert_options.get(name, {}))
    done = writer.committed_shards(plan, spec)
    summary = ExpertSummary(name, plan.num_shards, shards_skipped=len(done))
    pending = []
    for shard in range(plan.num_shards):
        if shard in done:
            continue
        if shard in inputs_ready:
            pending.append(shard)
        else:
            writer.record_failure(plan, spec.name, shard, refusal, 0)
            summary.shards_failed.append(shard)
    attempts = {shard: 0 for shard in pending}
    queue = deque(pending)
    running: dict[ray.ObjectRef, tuple[int, Any]] = {}
    idle = list(actors)
    bar = tqdm(total=sum(len(plan.shard_keys(s)) for s in pending), unit="sample", desc=name,
               disable=not progress, dynamic_ncols=True)
    began = time.perf_counter()

    def submit(actor: Any) -> None:
        shard = queue.popleft()
        start, stop = plan.shard_range(shard)
        attempts[shard] += 1
        running[actor.run_shard.remote(spec, plan.split, shard, start, samples[start:stop], config.batch_size,
                                       list(required))] = (shard, actor)

    if summary.shards_failed:
        logger.warning(f"{name}: {len(summary.shards_failed)} shard(s) {refusal}")
    while queue or running:
        while queue and idle:
            submit(idle.pop())
        ready, _ = ray.wait(list(running), num_returns=1)
        shard, actor = running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as e:
            if isinstance(e, ray.exceptions.RayActorError):  # its process or node died: retire it
                actors.remove(actor)
                if not actors or has_room(cpus, gpus):
                    actors.append(start_actor())
                    idle.append(actors[-1])
                logger.warning(f"{name}: a worker died running shard {shard} ({len(actors)} left); the shard goes back in the queue")
            else:
                idle.append(actor)
            if attempts[shard] <= config.retries:
                queue.append(shard)
            else:
                writer.record_failure(plan, spec.name, shard, f"{type(e).__name__}: {e}"[-2000:], attempts[shard])
                summary.shards_failed.append(shard)
                logger.warning(f"{name}: shard {shard} failed after {attempts[shard]} attempts: {type(e).__name__}")
            continue
        idle.append(actor)
        summary.shards_done += 1
        summary.nodes.add(result["node"])
        summary.samples += result["samples"]
        summary.invalid += result["invalid"]
        bar.update(result["samples"])
    bar.close()
    summary.seconds = time.perf_counter() - began
    return summary

