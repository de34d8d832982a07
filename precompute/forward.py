"""Running a loaded expert over samples: the one inference path, shared by the engine's shards and
`precompute verify`.

Decoding and preprocessing run in a small thread pool that stays two batches ahead of the
forward pass (PIL and torch release the GIL), so CPU decode overlaps compute. A sample that
cannot be decoded or preprocessed is a gap with its reason, never a crash. Keeping this in one
place is what makes `verify` meaningful: it recomputes samples exactly as the run computed them.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from cache_schema import FeatureSpec, TEXT_DTYPE
from precompute.experts import ExpertError
from precompute.experts.base import Expert
from precompute.decode import MediaError
from precompute.sources import Sample, Source


def decode_sample(expert: Expert, source: Source, sample: Sample) -> torch.Tensor | str:
    """The preprocessed tensor, or the reason this sample is a gap."""
    try:
        return expert.preprocess(expert.read_input(source, sample))
    except MediaError as e:
        return str(e)
    except Exception as e:  # a preprocessing crash on one odd input is that input's gap too
        return f"preprocess failed: {type(e).__name__}: {e}"


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


def run_samples(expert: Expert, spec: FeatureSpec, source: Source, samples: list[Sample], batch_size: int,
                inputs: dict[str, dict[str, np.ndarray]], decoder: ThreadPoolExecutor
                ) -> tuple[dict[str, Any], np.ndarray, dict[str, str]]:
    """(outputs, valid mask, gap reasons by key) of `expert` over `samples`, in order.

    `inputs` holds the required features' stored arrays, first axis aligned with `samples`.
    """
    pending = deque(decoder.submit(decode_sample, expert, source, s) for s in samples[: 2 * batch_size])
    next_submit = len(pending)
    arrays = empty_outputs(spec, len(samples))
    valid = np.zeros(len(samples), dtype=bool)
    invalid: dict[str, str] = {}
    for batch_start in range(0, len(samples), batch_size):
        tensors, positions = [], []
        for position in range(batch_start, min(batch_start + batch_size, len(samples))):
            result = pending.popleft().result()
            if next_submit < len(samples):
                pending.append(decoder.submit(decode_sample, expert, source, samples[next_submit]))
                next_submit += 1
            if isinstance(result, str):
                invalid[samples[position].key] = result
            else:
                tensors.append(result)
                positions.append(position)
        if tensors:
            batch_inputs = {name: {k: v[positions] for k, v in arrays_.items()} for name, arrays_ in inputs.items()}
            for name, values in expert.predict(torch.stack(tensors), batch_inputs).items():
                if isinstance(arrays[name], list):
                    for position, value in zip(positions, values):
                        arrays[name][position] = value
                else:
                    arrays[name][positions] = values
            valid[positions] = True
    return arrays, valid, invalid


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
