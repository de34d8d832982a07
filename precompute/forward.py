"""Running a loaded expert over samples: the one inference path, shared by the engine's shards and
`precompute verify`.

Decoding and preprocessing run in a small thread pool that stays two batches ahead of the
forward pass (PIL and torch release the GIL), so CPU decode overlaps compute. A sample that
cannot be decoded or preprocessed is a gap with its reason, never a crash. Keeping this in one
place is what makes `verify` meaningful: it recomputes samples exactly as the run computed them.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from cache_schema import PROFILE_STAGES, TEXT_DTYPE, FeatureSpec
from precompute.decode import MediaError
from precompute.experts import ExpertError
from precompute.experts.base import Expert
from precompute.sources import Sample, Source


def decode_sample(expert: Expert, source: Source, sample: Sample) -> tuple[torch.Tensor | str, float, float]:
    """(the preprocessed tensor or the reason this sample is a gap, decode seconds, preprocess seconds)."""
    began, decoded = time.perf_counter(), None
    try:
        media = expert.read_input(source, sample)
        decoded = time.perf_counter()
        result: torch.Tensor | str = expert.preprocess(media)
    except MediaError as e:
        result = str(e)
    except Exception as e:  # a preprocessing crash on one odd input is that input's gap too
        result = f"preprocess failed: {type(e).__name__}: {e}"
    ended = time.perf_counter()
    decoded = decoded or ended  # read_input itself failed: all of its time was decoding
    return result, decoded - began, ended - decoded


def empty_outputs(spec: FeatureSpec, count: int) -> dict[str, Any]:
    """Zero-filled outputs for `count` samples, in the form `CacheWriter.write_shard` takes."""
    arrays: dict[str, Any] = {}
    for a in spec.arrays:
        if a.dtype == TEXT_DTYPE:
            arrays[a.name] = [""] * count
        elif a.ragged:
            arrays[a.name] = [np.zeros((0, *a.shape[1:]), dtype=a.dtype)] * count
        else:
            arrays[a.name] = np.zeros((count, *a.shape), dtype=a.dtype)
    return arrays


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One batch of the decode threads' CPU tensors, copied by numpy, which copies in this thread.

    `torch.stack` would split the copy over torch's intra-op (OpenMP) threads; on cores that the
    decode threads keep busy, that team waits for a descheduled member at every copy: 32 frames of
    224 px took 350 ms instead of 1.5 ms on 2 busy cores.
    """
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


def run_samples(expert: Expert, spec: FeatureSpec, source: Source, samples: list[Sample], batch_size: int,
                inputs: dict[str, dict[str, np.ndarray]], decoder: ThreadPoolExecutor
                ) -> tuple[dict[str, Any], np.ndarray, dict[str, str], dict[str, float]]:
    """(outputs, valid mask, gap reasons by key, stage profile) of `expert` over `samples`, in order.

    `inputs` holds the required features' stored arrays, first axis aligned with `samples`. The
    profile is seconds per stage (`cache_schema.PROFILE_STAGES`): decode and preprocess summed over the decode
    threads; forward, the batched predict; wait, the forward loop idle for lack of decoded input
    (near 0: the model bounds the run; most of the time: decoding does).
    """
    pending = deque(decoder.submit(decode_sample, expert, source, s) for s in samples[: 2 * batch_size])
    next_submit = len(pending)
    arrays = empty_outputs(spec, len(samples))
    valid = np.zeros(len(samples), dtype=bool)
    invalid: dict[str, str] = {}
    profile = dict.fromkeys(PROFILE_STAGES[:-1], 0.0)  # the last, write, is the writer's
    for batch_start in range(0, len(samples), batch_size):
        tensors, positions = [], []
        waited = time.perf_counter()
        for position in range(batch_start, min(batch_start + batch_size, len(samples))):
            result, decode_s, preprocess_s = pending.popleft().result()
            profile["decode"] += decode_s
            profile["preprocess"] += preprocess_s
            if next_submit < len(samples):
                pending.append(decoder.submit(decode_sample, expert, source, samples[next_submit]))
                next_submit += 1
            if isinstance(result, str):
                invalid[samples[position].key] = result
            else:
                tensors.append(result)
                positions.append(position)
        began = time.perf_counter()
        profile["wait"] += began - waited
        if tensors:
            batch_inputs = {name: {k: v[positions] for k, v in arrays_.items()} for name, arrays_ in inputs.items()}
            for name, values in expert.predict(stack(tensors), batch_inputs).items():
                if isinstance(arrays[name], list):
                    for position, value in zip(positions, values):
                        arrays[name][position] = value
                else:
                    arrays[name][positions] = values
            valid[positions] = True
        profile["forward"] += time.perf_counter() - began
    return arrays, valid, invalid, profile


def with_input_provenance(name: str, spec: FeatureSpec, required: dict[str, FeatureSpec]) -> FeatureSpec:
    """The spec with the provenance of the cached features it reads (`required`: name -> their spec).

    A label made from another label is a different feature when that one's model changes, so the
    input's model and revision become part of this spec's identity.
    """
    provenance = {}
    for feature, required_spec in required.items():
        mine, theirs = spec.params.get("resolution"), required_spec.params.get("resolution")
        if mine != theirs:
            raise ExpertError(f"{name} at resolution {mine} cannot read {feature} at resolution {theirs}; use the same --expert-opt resolution")
        provenance[feature] = {"model_id": required_spec.model_id, "revision": required_spec.revision,
                               "preprocess_hash": required_spec.preprocess_hash}
    return replace(spec, params={**spec.params, "inputs": provenance}) if provenance else spec
