"""`open_cache`: the cache's Python API (splits, feature specs, PyTorch datasets), and the README's
linear-probe example run as written, against a tiny cache built here."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cache_schema import ArraySpec, CacheError, CacheWriter, FeatureSpec, SplitPlan, open_cache
from precompute.sources.shapes import ShapesSource

EMB = FeatureSpec("emb", "toy-encoder", "org/toy", "rev1", "h0", (ArraySpec("cls", "float16", (2, 3)),), {"layers": [4, 5]})
LABEL = FeatureSpec("tag", "toy-tagger", "org/tagger", "rev2", "h1", (ArraySpec("id", "int32", ()),))
N, SHARD = 11, 4


def written(index: int) -> tuple[np.ndarray, int]:
    return np.arange(6, dtype=np.float16).reshape(2, 3) + index, 100 + index


def build(root: Path, format: str) -> None:
    """Samples s000..s010 in shards of 4; s005 is a recorded gap; every sample has i % 2 + 1 captions."""
    keys = [f"s{i:03d}" for i in range(N)]
    plan = SplitPlan("toy", "train", keys, [{"captions": [f"c{i}.{j}" for j in range(i % 2 + 1)]} for i in range(N)], SHARD)
    writer = CacheWriter(root, format=format)
    writer.prepare_split(plan)
    for spec in (EMB, LABEL):
        writer.prepare_feature(plan, spec)
    for shard in range(plan.num_shards):
        start, stop = plan.shard_range(shard)
        valid = np.array([i != 5 for i in range(start, stop)])
        cls = np.stack([written(i)[0] for i in range(start, stop)]) * valid[:, None, None]
        ids = np.array([written(i)[1] for i in range(start, stop)], dtype=np.int32) * valid
        invalid = {keys[i]: "corrupt" for i in range(start, stop) if i == 5}
        writer.write_shard("toy", "train", EMB, shard, start, plan.shard_keys(shard), {"cls": cls}, valid, invalid, 0.1, "cpu")
        writer.write_shard("toy", "train", LABEL, shard, start, plan.shard_keys(shard), {"id": ids}, valid, invalid, 0.1, "cpu")


def captions(annotations):
    return [{"caption": caption} for caption in annotations["captions"]]


def expected_examples() -> list[tuple[str, str, list, int]]:
    return sorted((f"s{i:03d}", f"c{i}.{j}", written(i)[0].tolist(), written(i)[1])
                  for i in range(N) if i != 5 for j in range(i % 2 + 1))


def as_rows(items) -> list[tuple[str, str, list, int]]:
    return sorted((item["key"], item["caption"], item["visual"].tolist(), int(item["tag"])) for item in items)


@pytest.mark.parametrize("format", ["zarr", "wds"])
def test_splits_features_and_both_datasets_read_back_what_was_written(tmp_path, format):
    build(tmp_path / "cache", format)
    cache = open_cache(tmp_path / "cache")
    assert list(cache.splits) == ["toy/train"] and cache.sources == ["toy"]
    split = cache.split("train")  # the only source's
    assert split is cache.split("toy/train") and split.num_samples == N
    assert split.features == {"emb": EMB, "tag": LABEL}  # the specs as written: expert, model id, revision, arrays
    assert split.feature("emb").commit_records()[0].device == "cpu"  # per-shard provenance

    fields = {"visual": "emb/cls", "tag": "tag/id"}
    random_access = split.torch_dataset(fields, captions)
    assert random_access.skipped_samples == 1
    assert as_rows(random_access[i] for i in range(len(random_access))) == expected_examples()
    assert random_access[0]["visual"].dtype == np.float16

    stream = split.iterable_dataset(fields, captions, seed=1, shuffle_buffer=3)
    assert len(stream) == len(expected_examples())
    streamed = list(stream)
    assert as_rows(streamed) == expected_examples()
    assert [item["key"] for item in streamed] != sorted(item["key"] for item in streamed)  # shuffled

    # through a plain DataLoader: default collation, tensors of the cached dtype
    batch = next(iter(DataLoader(split.torch_dataset({"visual": "emb/cls"}), batch_size=4)))
    assert batch["visual"].dtype == torch.float16 and batch["visual"].shape == (4, 2, 3)
    assert batch["key"] == ["s000", "s001", "s002", "s003"]  # default: one example per sample, no annotation fields


def test_streaming_in_dataloader_workers_covers_every_example_once(tmp_path):
    build(tmp_path / "cache", "wds")
    split = open_cache(tmp_path / "cache").split("toy/train")
    stream = split.iterable_dataset({"visual": "emb/cls", "tag": "tag/id"}, captions, num_workers=2)
    items = [item for batch in DataLoader(stream, batch_size=None, num_workers=2) for item in [batch]]
    assert as_rows({**item, "visual": np.asarray(item["visual"])} for item in items) == expected_examples()
    with pytest.raises(ValueError, match="made for 0 DataLoader workers but runs in 2: pass num_workers=2"):
        list(DataLoader(split.iterable_dataset({"visual": "emb/cls"}), batch_size=None, num_workers=2))


@pytest.mark.parametrize("make, message", [
    (lambda c: c.split("toy/val"), r"no split toy/val \(the cache has: toy/train\)"),
    (lambda c: c.split("toy/train").torch_dataset({"visual": "vit/cls"}),
     r"toy/train has no feature 'vit' \(it has: emb, tag\)"),
    (lambda c: c.split("toy/train").torch_dataset({"visual": "emb/pooled"}),
     r"'visual': feature 'emb' of toy/train has no array 'pooled' \(it has: cls\)"),
    (lambda c: c.split("toy/train").iterable_dataset({"visual": "emb"}), r"'visual': 'emb' is not FEATURE/ARRAY"),
])
def test_a_wrong_name_is_an_error_naming_it(tmp_path, make, message):
    build(tmp_path / "cache", "zarr")
    with pytest.raises(CacheError, match=message):
        make(open_cache(tmp_path / "cache"))


def test_no_cache_is_an_error_naming_the_place(tmp_path):
    with pytest.raises(CacheError, match=f"{tmp_path / 'nowhere'}: not a feature cache"):
        open_cache(tmp_path / "nowhere")


def readme_example() -> str:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def write_probe_cache(root: Path) -> None:
    """shapes scenes (real annotations) and a `vit-cls` feature whose last level carries the object
    count, as a ViT trained on the world does: what the README's probe should find."""
    for split, num in (("train", 96), ("val", 24)):
        samples = ShapesSource(None, split, num=num).samples()
        plan = SplitPlan("shapes", split, [s.key for s in samples], [s.annotations for s in samples], shard_size=32)
        spec = FeatureSpec("vit-cls", "vit-cls", "test-vit", "r0", "p0", (ArraySpec("cls", "float16", (6, 8)),))
        writer = CacheWriter(root, format="zarr")
        writer.prepare_split(plan)
        writer.prepare_feature(plan, spec)
        rng = np.random.default_rng(len(split))
        for shard in range(plan.num_shards):
            start, stop = plan.shard_range(shard)
            cls = rng.standard_normal((stop - start, 6, 8)).astype(np.float32) * 0.3
            for row, sample in enumerate(samples[start:stop]):
                cls[row, -1, sample.annotations["labels"]["count"] - 1] += 3
            writer.write_shard("shapes", split, spec, shard, start, plan.shard_keys(shard), {"cls": cls.astype(np.float16)},
                               np.ones(stop - start, bool), {}, 0.1, "cpu")


def test_the_readme_linear_probe_runs_as_written_and_learns(tmp_path, monkeypatch):
    write_probe_cache(tmp_path / "demo-out" / "cache")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_example(), "README.md", "exec"), {})
    accuracy = float(re.search(r"val accuracy ([0-9.]+)", printed.getvalue()).group(1))
    assert accuracy >= 0.9, printed.getvalue()
