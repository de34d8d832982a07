"""The cache contract without Ray: plans, specs, commit records, readers, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache_schema import (
    ArraySpec,
    CacheError,
    CacheWriter,
    FeatureSpec,
    SpecMismatchError,
    SplitPlan,
    SplitReader,
    validate_cache,
)


def make_plan(n: int = 10, shard_size: int = 4) -> SplitPlan:
    keys = [f"k{i:02d}" for i in range(n)]
    return SplitPlan("toy", "train", keys, [{"caption": f"sample {i}"} for i in range(n)], shard_size)


def make_spec(model_id: str = "m", width: int = 3) -> FeatureSpec:
    return FeatureSpec("emb", "toy-expert", model_id, "r1", "p1", (ArraySpec("cls", "float16", (2, width)),), {"layers": [4, 5]})


def write_all(root, plan, spec, skip: set[int] = frozenset()) -> dict[int, np.ndarray]:
    writer = CacheWriter(root)
    writer.prepare_split(plan)
    writer.prepare_feature(plan, spec)
    written = {}
    for shard in range(plan.num_shards):
        if shard in skip:
            continue
        start, stop = plan.shard_range(shard)
        data = np.arange(start * 6, stop * 6, dtype=np.float16).reshape(stop - start, 2, 3)
        valid = np.ones(stop - start, dtype=bool)
        invalid = {}
        if shard == 0:
            valid[1] = False
            data[1] = 0
            invalid[plan.keys[1]] = "corrupt jpeg"
        writer.write_shard("toy", "train", spec, shard, start, plan.shard_keys(shard), {"cls": data}, valid, invalid, 0.5, "cpu")
        written[shard] = data
    return written


def test_roundtrip_by_index_and_key(tmp_path):
    plan, spec = make_plan(), make_spec()
    written = write_all(tmp_path, plan, spec)
    reader = SplitReader(tmp_path, "toy", "train")
    assert reader.keys == plan.keys and reader.annotations[3] == {"caption": "sample 3"}
    feature = reader.feature("emb")
    assert feature.spec == spec
    np.testing.assert_array_equal(feature.get(5)["cls"], written[1][1])
    np.testing.assert_array_equal(feature.get_by_key("k09")["cls"], written[2][1])
    assert feature.usable.tolist() == [True, False] + [True] * 8
    record = json.loads((tmp_path / "toy/train/_commits/emb/00000.json").read_text())
    assert record["invalid"] == {"k01": "corrupt jpeg"} and record["num_valid"] == 3
    for field in ("keys_digest", "checksum", "model_id", "revision", "preprocess_hash", "seconds", "samples_per_s", "host", "device", "code_version"):
        assert field in record


def test_storage_shard_is_precompute_shard(tmp_path):
    plan, spec = make_plan(), make_spec()
    write_all(tmp_path, plan, spec)
    meta = json.loads((tmp_path / "toy/train/emb/cls/zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 2, 3]
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed" and sharding["configuration"]["chunk_shape"] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "toy/train/emb/cls/c").iterdir()) == ["0", "1", "2"]


def test_uncommitted_shard_is_not_done_and_not_readable(tmp_path):
    plan, spec = make_plan(), make_spec()
    write_all(tmp_path, plan, spec, skip={2})
    writer = CacheWriter(tmp_path)
    assert writer.committed_shards(plan, spec) == {0, 1}
    # a shard whose arrays were written but whose record never was (killed between the two)
    (tmp_path / "toy/train/_commits/emb/00001.json").unlink()
    assert writer.committed_shards(plan, spec) == {0}
    feature = SplitReader(tmp_path, "toy", "train").feature("emb")
    assert not feature.usable[4:].any()


def test_spec_mismatch_is_refused_with_what_differs(tmp_path):
    plan = make_plan()
    write_all(tmp_path, plan, make_spec())
    with pytest.raises(SpecMismatchError) as info:
        CacheWriter(tmp_path).prepare_feature(plan, make_spec(model_id="other", width=5))
    message = str(info.value)
    assert "model_id" in message and '"other"' in message and "shape" in message and "--overwrite" in message
    CacheWriter(tmp_path).prepare_feature(plan, make_spec(model_id="other", width=5), overwrite=True)
    assert CacheWriter(tmp_path).committed_shards(plan, make_spec(model_id="other", width=5)) == set()


def test_different_plan_is_refused(tmp_path):
    write_all(tmp_path, make_plan(10), make_spec())
    with pytest.raises(CacheError, match="different shard plan"):
        CacheWriter(tmp_path).prepare_split(make_plan(12))
    CacheWriter(tmp_path).prepare_split(make_plan(10))  # same plan: fine


def test_validate_finds_corruption_and_stale_records(tmp_path):
    plan, spec = make_plan(), make_spec()
    write_all(tmp_path, plan, spec)
    assert validate_cache(tmp_path) == (3, [])
    shard_file = tmp_path / "toy/train/emb/cls/c/1/0/0"
    raw = bytearray(shard_file.read_bytes())
    raw[10] ^= 0xFF
    shard_file.write_bytes(bytes(raw))
    checked, problems = validate_cache(tmp_path)
    assert checked == 3 and [p.shard for p in problems] == [1]
    record_path = tmp_path / "toy/train/_commits/emb/00002.json"
    record = json.loads(record_path.read_text())
    record["keys_digest"] = "0" * 64
    record_path.write_text(json.dumps(record))
    assert sorted(p.shard for p in validate_cache(tmp_path)[1]) == [1, 2]


def test_wrong_shape_from_expert_is_an_error_not_a_commit(tmp_path):
    plan, spec = make_plan(), make_spec()
    writer = CacheWriter(tmp_path)
    writer.prepare_split(plan)
    writer.prepare_feature(plan, spec)
    with pytest.raises(CacheError, match="spec says"):
        writer.write_shard("toy", "train", spec, 0, 0, plan.shard_keys(0), {"cls": np.zeros((4, 2, 4), np.float16)},
                           np.ones(4, bool), {}, 0.1, "cpu")
    assert writer.committed_shards(plan, spec) == set()


def test_missing_cache_and_feature_errors_name_the_thing(tmp_path):
    with pytest.raises(CacheError, match="no cache.json"):
        SplitReader(tmp_path, "toy", "train")
    write_all(tmp_path, make_plan(), make_spec())
    with pytest.raises(CacheError, match="no feature 'depth'.*emb"):
        SplitReader(tmp_path, "toy", "train").feature("depth")
    with pytest.raises(CacheError, match="no split toy/val"):
        SplitReader(tmp_path, "toy", "val")


def test_ragged_and_text_arrays_roundtrip_and_validate(tmp_path):
    """Per-sample lists (instance classes, OCR words) are typed Zarr arrays, not pickles."""
    plan = make_plan(n=6, shard_size=4)
    spec = FeatureSpec("ocr", "toy-ocr", "m", "r", "p", (
        ArraySpec("words", "uint8", (1, 4, 4)),
        ArraySpec("embeddings", "float16", (255, 3), ragged=True),
        ArraySpec("text", "str", ()),
    ))
    writer = CacheWriter(tmp_path)
    writer.prepare_split(plan)
    writer.prepare_feature(plan, spec)
    items = [np.full((i % 3, 3), i, dtype=np.float16) for i in range(6)]
    texts = ["", "stop", "open\nexit", "", "héllo", "zoo"]
    for shard in range(plan.num_shards):
        start, stop = plan.shard_range(shard)
        arrays = {"words": np.full((stop - start, 1, 4, 4), 255, np.uint8), "embeddings": items[start:stop], "text": texts[start:stop]}
        writer.write_shard("toy", "train", spec, shard, start, plan.shard_keys(shard), arrays, np.ones(stop - start, bool), {}, 0.1, "cpu")
    feature = SplitReader(tmp_path, "toy", "train").feature("ocr")
    assert feature.spec == spec
    for i in range(6):
        sample = feature.get(i)
        np.testing.assert_array_equal(sample["embeddings"], items[i])
        assert sample["text"] == texts[i]
    assert feature.read("embeddings_length").tolist() == [0, 1, 2, 0, 1, 2]
    assert validate_cache(tmp_path) == (2, [])

    start, stop = plan.shard_range(0)
    too_many = {"words": np.zeros((4, 1, 4, 4), np.uint8), "embeddings": [np.zeros((256, 3), np.float16)] * 4, "text": [""] * 4}
    with pytest.raises(CacheError, match="sample 0 has float16\\[256, 3\\]"):
        writer.write_shard("toy", "train", spec, 0, 0, plan.shard_keys(0), too_many, np.ones(4, bool), {}, 0.1, "cpu")


def test_class_tables_are_stored_once_and_guarded(tmp_path):
    from cache_schema import ClassTable, read_table, write_table

    def table(encoder):
        return ClassTable(["bg", "circle"], np.ones((2, 4), np.float16), np.zeros(8, np.float32),
                          np.zeros((4, 8), np.float32), {"text_encoder": encoder})

    write_table(tmp_path, "seg", table("a"))
    write_table(tmp_path, "seg", table("a"))  # identical: a no-op
    loaded = read_table(tmp_path, "seg")
    assert loaded.names == ["bg", "circle"] and loaded.embeddings.dtype == np.float16
    with pytest.raises(CacheError, match="different class table"):
        write_table(tmp_path, "seg", table("b"))
    write_table(tmp_path, "seg", table("b"), overwrite=True)
    assert read_table(tmp_path, "seg").provenance == {"text_encoder": "b"}
    with pytest.raises(CacheError, match="no class table 'det'"):
        read_table(tmp_path, "det")
