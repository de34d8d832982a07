"""`precompute verify`: the cache against the live model.

A cache records what made each feature (model, revision or weights hash, preprocessing hash),
but a record is only a claim. `verify` re-runs the feature's expert, rebuilt from the spec and the
options the run recorded, on a seeded random subset of committed samples, through the engine's
own path (`precompute.forward.run_samples`), and compares what it computes with what is stored.

Two ways to fail, kept apart because they call for different actions:
- the live expert is no longer the one the spec names (another weights hash, another
  preprocessing hash, other parameters): a `SpecMismatchError`, before any sample runs;
- it is, but computes something else: values outside the tolerance below, per array.

Tolerance, by stored dtype (what a sample must meet to match):
- float16 (embeddings, float maps): cosine similarity >= 0.999 and max |cached - live| <= 2^-4 of
  the sample's largest live magnitude. Stored float16 means a half-precision forward on GPU; a
  bf16 forward of a ViT-S rounded to float16 differs from the float32 one by up to 1.7% of the
  largest value (cosine 0.9999), so 2^-4 (8 bf16 steps) leaves room for deeper models and flags
  anything that is not the same computation.
- float32: cosine >= 0.99999 and max |diff| <= 2^-10 of the largest magnitude.
- integers (label maps, quantized maps, token ids): at most 1% of a sample's elements differ.
  On the device kind that made the cache this is 0%; under another precision a map's pixels near
  a class or quantization boundary can flip.
- text, and the item count of ragged outputs: equal.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.utils import logging as transformers_logging

from cache_schema import TEXT_DTYPE, ArraySpec, CacheError, FeatureSpec, SpecMismatchError, SplitReader, list_splits
from precompute.experts import get_expert, scope_options
from precompute.forward import run_samples, with_input_provenance
from precompute.sources import Sample, Source, SourceError, get_source

# stored float dtype -> (least cosine similarity, largest |diff| as a fraction of the sample's largest |value|)
FLOAT_TOLERANCE = {"float16": (0.999, 2**-4), "bfloat16": (0.999, 2**-4), "float32": (0.99999, 2**-10),
                   "float64": (0.99999, 2**-10)}
MAX_DISAGREEMENT = 0.01  # integer arrays: largest fraction of a sample's elements that may differ
WORST_SHOWN = 5


def tolerance_text(dtype: str) -> str:
    if dtype == TEXT_DTYPE:
        return "equal text"
    if np.dtype(dtype).kind == "f":
        cosine, relative = FLOAT_TOLERANCE.get(dtype, FLOAT_TOLERANCE["float16"])
        return f"cos >= {cosine}, max|diff| <= 2^{int(np.log2(relative))} max|x|"
    return f"<= {MAX_DISAGREEMENT:.0%} of elements differ"


@dataclass
class SampleComparison:
    key: str
    max_abs_error: float
    cosine: float | None  # float arrays
    match_rate: float | None  # integer and text arrays: fraction of elements equal
    passed: bool
    note: str = ""  # why it failed when the numbers do not say (item counts, non-finite values)

    def describe(self) -> str:
        parts = [f"cos {self.cosine:.4f}" if self.cosine is not None else f"{self.match_rate:.1%} equal",
                 f"max|diff| {self.max_abs_error:.3g}"]
        return f"{self.key} ({', '.join(parts)}{'; ' + self.note if self.note else ''})"


def compare_values(array: ArraySpec, key: str, cached: Any, live: Any) -> SampleComparison:
    """One sample's stored value of `array` against the live one, judged by the tolerance above."""
    if array.dtype == TEXT_DTYPE:
        equal = str(cached) == str(live)
        return SampleComparison(key, 0.0 if equal else float("inf"), None, float(equal), equal)
    cached, live = np.asarray(cached), np.asarray(live)
    if cached.shape != live.shape:  # ragged outputs with another item count
        return SampleComparison(key, float("inf"), None if np.dtype(array.dtype).kind != "f" else 0.0,
                                None if np.dtype(array.dtype).kind == "f" else 0.0, False,
                                f"{len(cached)} items cached, {len(live)} live")
    if np.dtype(array.dtype).kind == "f":
        c, x = cached.astype(np.float64).ravel(), live.astype(np.float64).ravel()
        if not (np.isfinite(c).all() and np.isfinite(x).all()):
            return SampleComparison(key, float("inf"), 0.0, None, False, "non-finite values")
        error = float(np.abs(c - x).max()) if c.size else 0.0
        norms = float(np.linalg.norm(c) * np.linalg.norm(x))
        cosine = float(c @ x / norms) if norms else float(not np.linalg.norm(c) and not np.linalg.norm(x))
        least_cosine, relative = FLOAT_TOLERANCE.get(array.dtype, FLOAT_TOLERANCE["float16"])
        scale = float(np.abs(x).max()) if x.size else 0.0
        return SampleComparison(key, error, cosine, None, cosine >= least_cosine and error <= relative * scale)
    differ = cached != live
    rate = 1.0 - float(differ.mean()) if differ.size else 1.0
    error = float(np.abs(cached.astype(np.int64) - live.astype(np.int64)).max()) if differ.size else 0.0
    return SampleComparison(key, error, None, rate, 1.0 - rate <= MAX_DISAGREEMENT)


@dataclass
class ArrayReport:
    name: str
    dtype: str
    samples: list[SampleComparison]

    @property
    def failed(self) -> list[SampleComparison]:
        """Samples outside the tolerance, worst first."""
        return sorted((s for s in self.samples if not s.passed), key=self._badness)

    @property
    def worst(self) -> list[SampleComparison]:
        return sorted(self.samples, key=self._badness)[:WORST_SHOWN]

    @staticmethod
    def _badness(s: SampleComparison) -> tuple[float, float]:
        agreement = s.cosine if s.cosine is not None else s.match_rate
        return (agreement if agreement is not None else 0.0, -s.max_abs_error)

    @property
    def max_abs_error(self) -> float:
        return max((s.max_abs_error for s in self.samples), default=0.0)

    @property
    def mean_cosine(self) -> float | None:
        values = [s.cosine for s in self.samples if s.cosine is not None]
        return float(np.mean(values)) if values else None

    @property
    def match_rate(self) -> float | None:
        values = [s.match_rate for s in self.samples if s.match_rate is not None]
        return float(np.mean(values)) if values else None


@dataclass
class Verification:
    source: str
    split: str
    spec: FeatureSpec
    committed: int  # committed samples with a valid input: what the subset is drawn from
    keys: list[str]  # the samples compared
    seed: int
    made_on: list[str]  # devices named by the commit records
    verified_on: str
    arrays: list[ArrayReport] = field(default_factory=list)
    now_gaps: dict[str, str] = field(default_factory=dict)  # valid in the cache, not decodable now

    @property
    def passed(self) -> bool:
        return not self.now_gaps and not any(report.failed for report in self.arrays)


def resolve_split(cache: str, feature: str, split: str | None) -> tuple[str, str]:
    """(source, split) holding `feature`: `split` as SOURCE/SPLIT or SPLIT, or the only one that has it."""
    holding = [(source, name) for source, name in list_splits(cache) if feature in SplitReader(cache, source, name).feature_names]
    if not holding:
        raise CacheError(f"{cache}: no split holds feature {feature!r}")
    if split is not None:
        matches = [pair for pair in holding if split in ("/".join(pair), pair[1])]
        if len(matches) == 1:
            return matches[0]
        what = "is ambiguous" if matches else "does not hold it"
        raise CacheError(f"--split {split} {what}; {feature!r} is in {', '.join('/'.join(p) for p in holding)}")
    if len(holding) > 1:
        raise CacheError(f"{feature!r} is in several splits ({', '.join('/'.join(p) for p in holding)}); choose one with --split")
    return holding[0]


def spec_drift(cached: FeatureSpec, live: FeatureSpec) -> str | None:
    """One line saying how the live expert differs from the one the cache's spec names, or None."""
    parts = []
    if cached.model_id != live.model_id:
        parts.append(f"model: the cache names {cached.model_id}, the live expert loaded {live.model_id}")
    if cached.revision != live.revision:
        parts.append(f"weights: the model's revision/weights hash is {live.revision} now, the cache was made with {cached.revision}")
    if cached.preprocess_hash != live.preprocess_hash:
        parts.append(f"preprocessing: its hash is {live.preprocess_hash} now, the cache was made with {cached.preprocess_hash}")
    identity = ("model_id", "revision", "preprocess_hash")
    parts += [d for d in cached.differences(live) if not d.startswith(identity)]
    return "; ".join(parts) or None


def source_samples(reader: SplitReader, data_root: str | None, options: dict[str, Any],
                   indices: list[int]) -> tuple[Source, list[Sample]]:
    """The split's source, read as the run read it (its recorded data root and options, unless
    given), and its samples at `indices` of the cache, refused unless they are the cache's samples
    (same keys and annotations): a source read with other options gives other media."""
    info = reader.header.get("source_info", {})
    source = get_source(reader.source, data_root if data_root is not None else info.get("data_root"), reader.split,
                        **{**info.get("options", {}), **options})
    by_key = {sample.key: sample for sample in source.samples()}
    samples = []
    for index in indices:
        key = reader.keys[index]
        sample = by_key.get(key)
        if sample is None or json.loads(json.dumps(sample.annotations)) != reader.annotations[index]:
            why = "has no sample" if sample is None else "gives other annotations for"
            raise SourceError(f"{reader.source}/{reader.split} as read now {why} {key!r}: it is not the data the cache "
                              "was made from (pass the run's --data-root and --source-opt)")
        samples.append(sample)
    return source, samples


def verify_feature(cache: str, feature: str, split: str | None = None, samples: int = 64, seed: int = 0,
                   data_root: str | None = None, source_options: dict[str, Any] | None = None,
                   expert_options: dict[str, str] | None = None, batch_size: int = 32) -> Verification:
    """Re-run `feature`'s expert on `samples` seeded random committed samples and compare with the cache.

    Raises SpecMismatchError (nothing run) when the live model or preprocessing is not the one the
    spec records; CacheError, SourceError or ExpertError for a feature, split, source or model
    that cannot be read. `expert_options` (KEY=VALUE text, as `--expert-opt` takes) override the
    options the run recorded, for caches written before runs recorded them.
    """
    source_name, split_name = resolve_split(cache, feature, split)
    reader = SplitReader(cache, source_name, split_name)
    stored = reader.feature(feature)
    spec = stored.spec
    entry = reader.layout.read_manifest()["features"][f"{source_name}/{split_name}/{feature}"]
    options = {**entry.get("options", {}), **scope_options(expert_options or {}, [spec.expert])[spec.expert]}

    records = stored.commit_records()
    usable = np.flatnonzero(stored.usable)
    rng = np.random.default_rng(seed)
    indices = sorted(int(i) for i in rng.choice(usable, size=min(samples, len(usable)), replace=False))
    if not indices:
        raise CacheError(f"{source_name}/{split_name} {feature}: no committed sample with a valid input to verify")
    source, chosen = source_samples(reader, data_root, source_options or {}, indices)

    transformers_logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expert = get_expert(spec.expert, model=spec.model_id, device=device, **options)
    expert.check_model()
    expert.load()
    live_spec = with_input_provenance(spec.expert, expert.spec(feature),
                                      {name: reader.spec(name) for name in expert.requires()})
    drift = spec_drift(spec, live_spec)
    if drift is not None:
        raise SpecMismatchError(f"{source_name}/{split_name} {feature}: the live expert is not the one the cache was made with: {drift}")

    size, shards = reader.shard_size, sorted({i // reader.shard_size for i in indices})
    inputs: dict[str, dict[str, np.ndarray]] = {}  # the required features' stored arrays, aligned with `chosen`
    for name in expert.requires():
        per_shard = {shard: reader.feature(name).shard(shard)[0] for shard in shards}
        inputs[name] = {array: np.stack([per_shard[i // size][array][i % size] for i in indices])
                        for array in per_shard[shards[0]]}
    with ThreadPoolExecutor(max_workers=2) as decoder:
        outputs, valid, invalid, _ = run_samples(expert, spec, source, chosen, batch_size, inputs, decoder)
    result = Verification(source_name, split_name, spec, len(usable), [s.key for s in chosen], seed,
                          sorted({record.device for record in records.values()}),
                          torch.cuda.get_device_name() if device == "cuda" else "cpu", now_gaps=invalid)
    for array in spec.arrays:
        compared = [compare_values(array, sample.key, stored.get(index)[array.name], outputs[array.name][position])
                    for position, (index, sample) in enumerate(zip(indices, chosen)) if valid[position]]
        result.arrays.append(ArrayReport(array.name, array.dtype, compared))
    return result
