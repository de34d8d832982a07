"""Where and how a cache is stored: WebDataset tar shards beside Zarr, and fsspec URLs beside local paths.

The same writer/reader/validator code runs on a local directory, a `file://` URL and an in-memory
fsspec filesystem (what `s3://` goes through, minus the network), in both formats.
"""

from __future__ import annotations

import io
import json
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
import webdataset
from upath import UPath

from cache_schema import ArraySpec, CacheError, CacheWriter, ClassTable, FeatureSpec, SplitPlan, SplitReader, read_table, validate_cache, write_table
from cache_schema.commit import CommitRecord
from cache_schema.layout import CacheLayout

SPEC = FeatureSpec("ocr", "toy-ocr", "m", "r", "p", (
    ArraySpec("cls", "float16", (2, 3)),
    ArraySpec("boxes", "float32", (5, 4), ragged=True),
    ArraySpec("text", "str", ()),
))


def make_plan(n: int = 10, shard_size: int = 4) -> SplitPlan:
    keys = [f"img{i:03d}" for i in range(n)]
    return SplitPlan("toy", "train", keys, [{"captions": [f"sample {i}"]} for i in range(n)], shard_size)


def shard_outputs(plan: SplitPlan, shard: int) -> tuple[dict, np.ndarray, dict]:
    start, stop = plan.shard_range(shard)
    count = stop - start
    cls = np.arange(start * 6, stop * 6, dtype=np.float16).reshape(count, 2, 3)
    boxes = [np.full(((start + i) % 3, 4), start + i, np.float32) for i in range(count)]
    texts = [f"wörd {start + i}" for i in range(count)]
    valid, invalid = np.ones(count, bool), {}
    if shard == 0:  # a recorded gap: zero outputs, not valid
        valid[1], cls[1], boxes[1], texts[1] = False, 0, np.zeros((0, 4), np.float32), ""
        invalid[plan.keys[1]] = "corrupt jpeg"
    return {"cls": cls, "boxes": boxes, "text": texts}, valid, invalid


def write_cache(root, format: str, plan: SplitPlan | None = None, skip: frozenset[int] = frozenset()) -> dict[int, CommitRecord]:
    plan = plan or make_plan()
    writer = CacheWriter(root, format=format)
    writer.prepare_split(plan)
    writer.prepare_feature(plan, SPEC)
    records = {}
    for shard in range(plan.num_shards):
        if shard not in skip:
            arrays, valid, invalid = shard_outputs(plan, shard)
            start, _ = plan.shard_range(shard)
            records[shard] = writer.write_shard("toy", "train", SPEC, shard, start, plan.shard_keys(shard), arrays, valid, invalid, 0.1, "cpu")
    return records


@pytest.fixture(params=["local", "file-url", "memory"])
def root(request, tmp_path):
    """A cache location: a plain directory, a file:// URL, or an fsspec in-memory filesystem."""
    if request.param != "memory":
        yield str(tmp_path / "cache") if request.param == "local" else f"file://{tmp_path}/cache"
        return
    location = f"memory://caches/{uuid.uuid4().hex}"
    yield location
    fsspec.filesystem("memory").rm(location.removeprefix("memory://"), recursive=True)


@pytest.mark.parametrize("format", ["zarr", "wds"])
def test_both_formats_read_back_the_same_samples_on_any_storage(root, format):
    plan = make_plan()
    records = write_cache(root, format, plan)
    feature = SplitReader(root, "toy", "train").feature("ocr")
    assert feature.format == format
    assert feature.usable.tolist() == [True, False] + [True] * 8
    for index in (0, 5, 9):
        shard = index // plan.shard_size
        arrays, _, _ = shard_outputs(plan, shard)
        sample, position = feature.get(index), index - shard * plan.shard_size
        np.testing.assert_array_equal(sample["cls"], arrays["cls"][position])
        np.testing.assert_array_equal(sample["boxes"], arrays["boxes"][position])
        assert sample["text"] == arrays["text"][position]
    assert feature.read("boxes_length").tolist() == [0, 0, 2, 0, 1, 2, 0, 1, 2, 0]
    assert validate_cache(root) == (3, [])
    assert all(CommitRecord.read(CacheLayout(root).commit_path("toy", "train", "ocr", s)).checksum == r.checksum
               for s, r in records.items())


def test_a_shard_has_the_same_checksum_in_both_formats(tmp_path):
    zarr_records = write_cache(tmp_path / "z", "zarr")
    wds_records = write_cache(tmp_path / "w", "wds")
    assert [r.checksum for r in zarr_records.values()] == [r.checksum for r in wds_records.values()]


def test_tar_shards_hold_valid_samples_in_key_order_and_are_byte_for_byte_repeatable(tmp_path):
    write_cache(tmp_path / "a", "wds")
    write_cache(tmp_path / "b", "wds")
    tar_path = tmp_path / "a/toy/train/ocr/00000.tar"
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
    assert names == [f"img{i:03d}.ocr.{array}" for i in (0, 2, 3) for array in ("boxes.npy", "boxes_length.npy", "cls.npy", "text.txt")]
    for shard in range(3):
        name = f"toy/train/ocr/{shard:05d}.tar"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not list((tmp_path / "a/toy/train/ocr").glob(".*.tmp"))


def test_the_webdataset_library_reads_the_tars(tmp_path):
    """The tars are plain WebDataset shards: any WebDataset reader streams them, decoded by extension."""
    write_cache(tmp_path, "wds")
    dataset = webdataset.WebDataset(str(tmp_path / "toy/train/ocr/00001.tar"), shardshuffle=False).decode()
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == ["img004", "img005", "img006", "img007"]
    np.testing.assert_array_equal(samples[1]["ocr.cls.npy"], np.arange(30, 36, dtype=np.float16).reshape(2, 3))
    assert samples[2]["ocr.text.txt"] == "wörd 6" and samples[2]["ocr.boxes_length.npy"] == 0


def test_uncommitted_tar_shard_reads_as_gap(tmp_path):
    write_cache(tmp_path, "wds", skip=frozenset({1}))
    feature = SplitReader(tmp_path, "toy", "train").feature("ocr")
    assert feature.usable.tolist() == [True, False, True, True] + [False] * 4 + [True, True]
    assert feature.read("cls", 2, 9)[2:6].sum() == 0
    assert validate_cache(tmp_path) == (2, [])


def test_validate_finds_damaged_and_missing_tars(tmp_path):
    write_cache(tmp_path, "wds")
    shard0, shard1 = tmp_path / "toy/train/ocr/00000.tar", tmp_path / "toy/train/ocr/00001.tar"
    with tarfile.open(shard0) as tar:
        offset = tar.getmember("img002.ocr.cls.npy").offset_data
    raw = bytearray(shard0.read_bytes())
    raw[offset + 130] ^= 0xFF  # inside the array data, past the .npy header
    shard0.write_bytes(bytes(raw))
    shard1.unlink()
    checked, problems = validate_cache(tmp_path)
    assert checked == 3
    assert [(p.shard, p.problem.split(":")[0]) for p in problems] == [(0, "content checksum differs from commit record"), (1, "unreadable")]


def test_stray_member_in_a_tar_is_a_problem_not_data(tmp_path):
    write_cache(tmp_path, "wds")
    path = tmp_path / "toy/train/ocr/00002.tar"
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo("img009.depth.map.npy")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    problems = validate_cache(tmp_path)[1]
    assert len(problems) == 1 and "unexpected member 'img009.depth.map.npy'" in problems[0].problem


def test_a_feature_keeps_its_format_unless_overwritten(tmp_path):
    plan = make_plan()
    write_cache(tmp_path, "zarr", plan)
    with pytest.raises(CacheError, match="stored as zarr, this run writes wds.*--format zarr"):
        CacheWriter(tmp_path, format="wds").prepare_feature(plan, SPEC)
    CacheWriter(tmp_path, format="wds").prepare_feature(plan, SPEC, overwrite=True)
    assert SplitReader(tmp_path, "toy", "train").feature("ocr").committed_shards() == []
    with pytest.raises(CacheError, match="unknown cache format 'parquet'"):
        CacheWriter(tmp_path, format="parquet")


def test_tables_and_manifest_live_on_fsspec_storage(root):
    write_cache(root, "zarr")
    table = ClassTable(["bg", "circle"], np.ones((2, 4), np.float16), np.zeros(8, np.float32), np.zeros((4, 8), np.float32), {"text_encoder": "a"})
    write_table(root, "seg", table)
    assert read_table(root, "seg").names == ["bg", "circle"]
    layout = CacheLayout(root)
    assert json.loads(layout.manifest_path.read_text())["splits"] == {"toy/train": {"num_samples": 10, "shard_size": 4}}
    if "://" in root:
        assert isinstance(layout.root, UPath) and str(layout.root).startswith(root.split("://")[0])


def test_an_unknown_storage_protocol_is_a_cache_error_naming_it():
    with pytest.raises(CacheError, match="cache bogus://bucket/cache: Unsupported filesystem: 'bogus'"):
        CacheLayout("bogus://bucket/cache")
