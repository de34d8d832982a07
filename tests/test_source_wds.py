"""The `wds` source on shards written the way img2dataset writes them (webdataset's TarWriter,
a parquet per shard listing failed downloads too, a `_stats.json`), locally and through fsspec."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from cache_schema import SplitReader
from precompute.sources import MediaError, SourceError, get_source

CLI = [sys.executable, "-m", "precompute.cli"]


def image_bytes(seed: int, fmt: str = "JPEG", size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_img2dataset_shard(root: Path, shard: int, rows: list[dict]) -> None:
    """One shard as img2dataset's WebDatasetSampleWriter leaves it: successes in the tar (image,
    caption, json metadata), every url in the parquet, the counts in `_stats.json`.

    A row is {"caption", "image": bytes or None for a failed download, "format": member extension}.
    """
    name = f"{shard:05d}"
    metadata = []
    with open(root / f"{name}.tar", "wb") as file:
        writer = webdataset.TarWriter(file)
        for index, row in enumerate(rows):
            key = f"{shard:05d}{index:04d}"
            success = row["image"] is not None
            meta = {
                "url": f"https://example.com/{key}.jpg", "caption": row["caption"], "key": key,
                "status": "success" if success else "failed_to_download",
                "error_message": None if success else "HTTP Error 404: Not Found",
                "width": 40 if success else None, "height": 40 if success else None,
                "original_width": 640 if success else None, "original_height": 480 if success else None,
            }
            metadata.append(meta)
            if success:
                writer.write({"__key__": key, row.get("format", "jpg"): row["image"], "txt": row["caption"],
                              "json": json.dumps(meta, indent=4)})
        writer.close()
    pq.write_table(pa.Table.from_pylist(metadata), root / f"{name}.parquet")
    successes = sum(m["status"] == "success" for m in metadata)
    (root / f"{name}_stats.json").write_text(json.dumps({
        "count": len(rows), "successes": successes, "failed_to_download": len(rows) - successes,
        "failed_to_resize": 0, "duration": 1.0, "start_time": 0.0, "end_time": 1.0,
        "status_dict": {"success": successes, "HTTP Error 404: Not Found": len(rows) - successes},
    }, indent=4))


@pytest.fixture
def shards(tmp_path) -> Path:
    """Three shards: shard 0 with a png and a failed download, shard 1 with a webp and a corrupt
    jpg, shard 2 plain; plus shard 3, whose parquet and stats exist but whose tar does not."""
    root = tmp_path / "cc3m"
    root.mkdir()
    write_img2dataset_shard(root, 0, [
        {"caption": "a red bus ", "image": image_bytes(0)},
        {"caption": "lost", "image": None},
        {"caption": "a drawing", "image": image_bytes(1, "PNG"), "format": "png"},
    ])
    write_img2dataset_shard(root, 1, [
        {"caption": "a web picture", "image": image_bytes(2, "WEBP"), "format": "webp"},
        {"caption": "broken on the server", "image": b"\xff\xd8\xff\xe0 not really a jpeg"},
    ])
    write_img2dataset_shard(root, 2, [{"caption": "a dog", "image": image_bytes(3)}])
    write_img2dataset_shard(root, 3, [{"caption": "gone", "image": image_bytes(4)}])
    (root / "00003.tar").unlink()
    return root


@pytest.fixture
def memory_copy(shards):
    """The same files under a fresh memory:// folder (removed afterwards: that store is global)."""
    fs = fsspec.filesystem("memory")
    root = f"/wds-{uuid.uuid4().hex}"
    for path in shards.iterdir():
        fs.pipe(f"{root}/{path.name}", path.read_bytes())
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


KEYS = ["000000000", "000000002", "000010000", "000010001", "000020000"]


def test_planning_keys_captions_order_and_info(shards):
    source = get_source("wds", shards, None)
    assert source.split == "train"
    samples = source.samples()
    assert [s.key for s in samples] == KEYS
    assert samples[0].annotations == {"captions": ["a red bus"], "url": "https://example.com/000000000.jpg"}
    assert [s.annotations["captions"] for s in samples] == [
        ["a red bus"], ["a drawing"], ["a web picture"], ["broken on the server"], ["a dog"]]
    assert samples[0].media.startswith(f"file://{shards}/00000.tar#")
    assert source.info() == {
        "source": "wds", "split": "train", "data_root": str(shards), "tars_glob": "*.tar", "caption": "txt",
        "val_shards": 0, "tars": ["00000.tar", "00001.tar", "00002.tar"], "samples": 5, "failed_downloads": 1,
        "missing_tars": ["00003.tar"], "damaged_tars": [], "problems": [],
    }
    assert get_source("wds", shards, "train").samples() == samples  # deterministic


def test_images_decode_from_a_ranged_read(shards):
    source = get_source("wds", shards, "train")
    by_key = {s.key: s for s in source.samples()}
    for key, seed, fmt in [("000000000", 0, "JPEG"), ("000000002", 1, "PNG"), ("000010000", 2, "WEBP")]:
        expected = Image.open(io.BytesIO(image_bytes(seed, fmt))).convert("RGB")
        assert np.array_equal(np.asarray(source.load_image(by_key[key])), np.asarray(expected))


def test_memory_url_plans_and_decodes_like_the_folder(shards, memory_copy):
    local = get_source("wds", shards, "train")
    remote = get_source("wds", memory_copy, "train")
    local_samples, remote_samples = local.samples(), remote.samples()
    assert [(s.key, s.annotations) for s in remote_samples] == [(s.key, s.annotations) for s in local_samples]
    assert remote_samples[0].media.startswith(f"{memory_copy}/00000.tar#")
    assert [s.media.rpartition("#")[2] for s in remote_samples] == [s.media.rpartition("#")[2] for s in local_samples]
    for here, there in zip(local_samples, remote_samples):
        if here.key != "000010001":
            assert np.array_equal(np.asarray(local.load_image(here)), np.asarray(remote.load_image(there)))
    assert {k: v for k, v in remote.info().items() if k != "data_root"} == \
        {k: v for k, v in local.info().items() if k != "data_root"}


def test_corrupt_or_truncated_member_is_a_media_error(shards, memory_copy):
    source = get_source("wds", shards, "train")
    corrupt = next(s for s in source.samples() if s.key == "000010001")
    with pytest.raises(MediaError, match="cannot decode"):
        source.load_image(corrupt)

    fs = fsspec.filesystem("memory")
    remote = get_source("wds", memory_copy, "train")
    planned = {s.key: s for s in remote.samples()}
    tar = memory_copy.removeprefix("memory://") + "/00002.tar"
    fs.pipe(tar, fs.cat_file(tar)[:1000])  # cut inside the only image, after planning
    with pytest.raises(MediaError, match="truncated"):
        remote.load_image(planned["000020000"])
    fs.rm(tar)
    with pytest.raises(MediaError, match="tar not found"):
        remote.load_image(planned["000020000"])


def test_val_shards_hold_out_the_last_tars(shards):
    train = get_source("wds", shards, "train", val_shards=1)
    val = get_source("wds", shards, "val", val_shards=1)
    assert [s.key for s in train.samples()] == KEYS[:4]
    assert [s.key for s in val.samples()] == KEYS[4:]
    assert val.info()["tars"] == ["00002.tar"] and val.info()["failed_downloads"] == 0
    with pytest.raises(SourceError, match="val_shards=N"):
        get_source("wds", shards, "val")
    with pytest.raises(SourceError, match="nothing for train"):
        get_source("wds", shards, "train", val_shards=3).samples()


def test_options_select_tars_and_caption_member(shards):
    source = get_source("wds", shards, "train", tars="0000[12].tar")
    assert [s.key for s in source.samples()] == KEYS[2:]
    assert source.info()["missing_tars"] == []
    no_caption = get_source("wds", shards, "train", caption="text").samples()
    assert all(s.annotations["captions"] == [] for s in no_caption)
    with pytest.raises(SourceError, match="known options: caption, tars, val_shards"):
        get_source("wds", shards, "train", shards="*.tar")


def test_bad_roots_are_named(tmp_path, shards):
    missing = tmp_path / "nowhere"
    with pytest.raises(SourceError, match=str(missing)):
        get_source("wds", missing, "train")
    with pytest.raises(SourceError, match="memory://nowhere-at-all"):
        get_source("wds", "memory://nowhere-at-all", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=f"no tar files matching '\\*.tar' in {tmp_path / 'empty'}"):
        get_source("wds", tmp_path / "empty", "train").samples()
    with pytest.raises(SourceError, match="1 shard\\(s\\) are listed by parquet/_stats.json but have no tar"):
        get_source("wds", shards, "train", tars="00003.tar").samples()
    with pytest.raises(SourceError, match="Protocol not known"):
        get_source("wds", "nosuchproto://bucket/cc3m", "train")
    (shards / "00009.tar").write_bytes((shards / "00002.tar").read_bytes())
    with pytest.raises(SourceError, match="'000020000' is in both .*00002.tar and .*00009.tar"):
        get_source("wds", shards, "train").samples()
    for name in ("00000.tar", "00001.tar", "00002.tar", "00009.tar"):  # no tar readable: nothing to run
        (shards / name).write_bytes(b"this is no tar" * 100)
    with pytest.raises(SourceError, match="no tar in .* could be read: 00000.tar: not readable as a tar"):
        get_source("wds", shards, "train").samples()


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_missing_filesystem_package_says_what_to_install():
    with pytest.raises(SourceError, match="pip install s3fs"):
        get_source("wds", "s3://bucket/cc3m", "train")


def test_precompute_run_over_wds_validates(shards, tmp_path, tiny_vit_dir):
    cache = tmp_path / "cache"
    run = subprocess.run(CLI + ["run", "--expert", "vit-cls", "--shards", "wds", "--data-root", str(shards),
                                "--model", str(tiny_vit_dir), "--cache", str(cache), "--shard-size", "2",
                                "--workers", "1", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    validate = subprocess.run(CLI + ["validate", "--cache", str(cache)], capture_output=True, text=True)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    reader = SplitReader(cache, "wds", "train")
    assert reader.keys == KEYS and reader.annotations[0]["captions"] == ["a red bus"]
    usable = dict(zip(reader.keys, reader.feature("vit-cls").usable))
    assert usable == {key: key != "000010001" for key in KEYS}


def test_a_glob_option_on_the_command_line_is_taken_as_written():
    from precompute.cli import parse_options

    assert parse_options(["tars=*.tar", "val_shards=2", "caption=txt"], "--source-opt") == {"tars": "*.tar", "val_shards": 2, "caption": "txt"}
