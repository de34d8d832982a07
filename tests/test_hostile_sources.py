"""Hostile datasets on disk (issue 16): damaged img2dataset tars, file names that are not UTF-8,
COCO/VQA annotation files naming paths outside the dataset or images that are not there, and a
source with one split run without `--split`.

Each case asserts what the user sees: no traceback, the documented exit code (2 bad input before
any work; 1 some data could not be read, the rest is committed), and nothing lost silently:
what is left out is counted in the split's provenance (`source_info` in split.json) and printed.
Data is made here with the real libraries (webdataset's TarWriter, pyarrow, Pillow).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from cache_schema import SplitReader, keys_digest
from precompute.sources import SOURCES, MediaError, Source, SourceError, get_source, resolve_split

CLI = [sys.executable, "-m", "precompute.cli"]


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_shard(root: Path, shard: int, count: int, counts: bool = True) -> Path:
    """One img2dataset shard of `count` successes: the tar, and (with `counts`) the parquet and
    `_stats.json` holding img2dataset's own count of what it wrote."""
    name = f"{shard:05d}"
    rows = []
    with open(root / f"{name}.tar", "wb") as file:
        writer = webdataset.TarWriter(file)
        for index in range(count):
            key = f"{shard:05d}{index:04d}"
            meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success", "caption": f"c{key}"}
            rows.append(meta)
            writer.write({"__key__": key, "jpg": image_bytes(shard * 100 + index), "txt": f"c{key}",
                          "json": json.dumps(meta)})
        writer.close()
    if counts:
        pq.write_table(pa.Table.from_pylist(rows), root / f"{name}.parquet")
        (root / f"{name}_stats.json").write_text(json.dumps({"count": count, "successes": count, "failed_to_download": 0}))
    return root / f"{name}.tar"


def header_offsets(tar_path: Path) -> list[int]:
    """Byte offset of the first header of each sample (jpg, txt, json members), in tar order."""
    with tarfile.open(tar_path) as tar:
        offsets: dict[str, int] = {}
        for member in tar:
            offsets.setdefault(member.name.split(".")[0], member.offset)
    return list(offsets.values())


@pytest.fixture
def wds_root(tmp_path) -> Path:
    root = tmp_path / "cc"
    root.mkdir()
    write_shard(root, 0, 4)
    write_shard(root, 1, 2)
    return root


def ray_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI run that starts its own local Ray, with a private temp dir."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    return env


def cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def run_vit(data_root: Path, cache: Path, source: str, model: Path, *extra: str) -> subprocess.CompletedProcess:
    env = ray_env(cache.parent)
    try:
        return cli("run", "--expert", "vit-cls", "--shards", source, "--data-root", str(data_root), "--model", str(model),
                   "--cache", str(cache), "--shard-size", "2", "--workers", "1", "--no-progress", *extra, env=env)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


# --- 1. wds: damaged or short tars --------------------------------------------------------------


def test_damaged_header_in_the_middle_keeps_what_is_readable_and_says_what_is_lost(wds_root):
    tar = wds_root / "00000.tar"
    third = header_offsets(tar)[2]
    data = bytearray(tar.read_bytes())
    data[third + 148:third + 156] = b"garbage!"  # the header's checksum: tarfile stops here, silently
    tar.write_bytes(bytes(data))
    source = get_source("wds", wds_root, None)
    keys = [s.key for s in source.samples()]
    assert keys == ["000000000", "000000001", "000010000", "000010001"]  # before the damage, and tar 1
    info = source.info()
    assert info["damaged_tars"] == [{"tar": "00000.tar", "expected": 4, "found": 2,
                                     "reason": f"damaged member header at byte {third} of {len(data)}"}]
    assert len(info["problems"]) == 1 and "00000.tar" in info["problems"][0]
    assert "wrote 4 samples, 2 readable" in info["problems"][0]


def test_tar_cut_at_a_member_boundary_is_counted_against_img2dataset(wds_root):
    tar = wds_root / "00000.tar"
    cut = header_offsets(tar)[3]
    tar.write_bytes(tar.read_bytes()[:cut])  # three whole samples, no end blocks
    source = get_source("wds", wds_root, "train")
    assert len(source.samples()) == 3 + 2
    assert source.info()["damaged_tars"] == [
        {"tar": "00000.tar", "expected": 4, "found": 3,
         "reason": f"ends at byte {cut}, a member boundary, with no end-of-archive blocks: cut short"}]


def test_a_whole_tar_holding_fewer_samples_than_img2dataset_counted_is_damage(wds_root):
    (wds_root / "00001_stats.json").write_text(json.dumps({"successes": 3}))  # the tar has 2
    (damaged,) = get_source("wds", wds_root, "train").info()["damaged_tars"]
    assert damaged == {"tar": "00001.tar", "expected": 3, "found": 2,
                       "reason": "holds 2 samples where img2dataset counted 3"}


def test_cut_tar_without_img2dataset_counts_is_caught_by_its_missing_end(wds_root):
    """img2dataset writes parquet and stats when a shard finishes: a shard killed mid-write has
    neither, and a tar that stops at a member boundary, without tar's end blocks."""
    tar = write_shard(wds_root, 2, 3, counts=False)
    whole = tar.read_bytes()
    assert get_source("wds", wds_root, "train").info()["damaged_tars"] == []  # whole, uncounted: fine
    cut = header_offsets(tar)[2]
    tar.write_bytes(whole[:cut])
    assert get_source("wds", wds_root, "train").info()["damaged_tars"] == [
        {"tar": "00002.tar", "expected": None, "found": 2,
         "reason": f"ends at byte {cut}, a member boundary, with no end-of-archive blocks: cut short"}]


def test_tar_cut_inside_an_image_drops_that_image_and_says_so(wds_root):
    tar = wds_root / "00001.tar"
    with tarfile.open(tar) as archive:
        image = next(m for m in archive if m.name == "000010001.jpg")
    tar.write_bytes(tar.read_bytes()[:image.offset_data + image.size // 2])
    source = get_source("wds", wds_root, "train")
    keys = [s.key for s in source.samples()]
    assert "000010001" not in keys and "000010000" in keys and len(keys) == 5
    (damaged,) = source.info()["damaged_tars"]
    assert damaged["tar"] == "00001.tar" and damaged["expected"] == 2 and damaged["found"] == 1


def test_one_unreadable_tar_is_recorded_and_the_others_planned(wds_root):
    (wds_root / "00001.tar").write_bytes(b"this is no tar" * 100)
    source = get_source("wds", wds_root, "train")
    assert [s.key for s in source.samples()] == [f"00000000{i}" for i in range(4)]
    (damaged,) = source.info()["damaged_tars"]
    assert damaged["tar"] == "00001.tar" and damaged["found"] == 0 and damaged["expected"] == 2
    assert damaged["reason"].startswith("not readable as a tar")


def test_no_readable_tar_at_all_is_bad_input_exit_2(wds_root, tmp_path):
    for tar in wds_root.glob("*.tar"):
        tar.write_bytes(b"\x00not a tar" * 200)
    cache = tmp_path / "cache"
    result = cli("run", "--expert", "vit-cls", "--shards", "wds", "--data-root", str(wds_root), "--cache", str(cache))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no tar in" in result.stderr and "00000.tar" in result.stderr
    assert not cache.exists()


def test_run_over_a_damaged_tar_exits_1_names_it_and_commits_the_rest(wds_root, tmp_path, tiny_vit_dir):
    tar = wds_root / "00000.tar"
    tar.write_bytes(tar.read_bytes()[:header_offsets(tar)[3]])
    cache = tmp_path / "cache"
    result = run_vit(wds_root, cache, "wds", tiny_vit_dir)
    assert result.returncode == 1, result.stderr
    assert f"damaged tar file://{tar}: img2dataset wrote 4 samples, 3 readable" in result.stderr
    reader = SplitReader(cache, "wds", "train")
    assert reader.keys == ["000000000", "000000001", "000000002", "000010000", "000010001"]
    assert reader.feature("vit-cls").usable.all()  # the readable samples are all processed
    assert reader.header["source_info"]["damaged_tars"][0]["tar"] == "00000.tar"
    status = cli("status", "--cache", str(cache))
    assert status.returncode == 0 and "wds/train: not in the cache: damaged tar" in status.stdout
    as_json = json.loads(cli("status", "--cache", str(cache), "--json").stdout)
    assert "00000.tar" in as_json[0]["source_problems"][0]
    assert cli("validate", "--cache", str(cache)).returncode == 0  # what was committed is intact


# --- 2. file names that are not UTF-8 -----------------------------------------------------------


def make_latin1_folder(root: Path) -> None:
    root.mkdir(parents=True)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(root / "ok.png")
    with open(os.path.join(os.fsencode(root), b"caf\xe9.jpg"), "wb") as file:  # Latin-1 'café.jpg'
        Image.new("RGB", (20, 20), (10, 200, 10)).save(file, format="JPEG")


def test_a_name_that_is_not_utf8_gets_a_stable_key_and_is_read(tmp_path):
    make_latin1_folder(tmp_path / "pics")
    source = get_source("images", tmp_path / "pics", None)
    samples = source.samples()
    assert [s.key for s in samples] == ["caf%E9", "ok"]
    keys_digest([s.key for s in samples])  # crashed with UnicodeEncodeError before
    json.dumps([s.key for s in samples], ensure_ascii=False).encode()  # valid text everywhere
    assert source.load_image(samples[0]).getpixel((10, 10))[1] > 150  # the real file, decoded
    assert [s.key for s in get_source("images", tmp_path / "pics", None).samples()] == ["caf%E9", "ok"]  # stable
    os.remove(os.path.join(os.fsencode(tmp_path / "pics"), b"caf\xe9.jpg"))
    with pytest.raises(MediaError) as gone:
        source.load_image(samples[0])
    str(gone.value).encode()  # the recorded reason names the file as valid text
    assert "caf%E9" in str(gone.value)


def test_a_tar_member_name_that_is_not_utf8_keys_as_percent_escapes(wds_root):
    """A tar written with raw bytes names (GNU format, as old tools do): tarfile reads the name back
    surrogate-escaped, which crashed the keys digest like a file name on disk."""
    with tarfile.open(wds_root / "00002.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("caf\udce9.jpg", image_bytes(7)), ("caf\udce9.txt", b"a caption")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    source = get_source("wds", wds_root, "train")
    samples = {s.key: s for s in source.samples()}
    keys_digest(list(samples))
    assert samples["caf%E9"].annotations["captions"] == ["a caption"]
    assert source.load_image(samples["caf%E9"]).size == (24, 24)
    assert source.info()["damaged_tars"] == []


@pytest.mark.parametrize("source_name, extension", [("videos", b".mp4"), ("audio", b".wav")])
def test_clip_folders_key_undecodable_names_too(tmp_path, source_name, extension):
    root = tmp_path / source_name
    (root / "sub").mkdir(parents=True)
    (root / "sub" / ("ok" + extension.decode())).write_bytes(b"x")
    with open(os.path.join(os.fsencode(root / "sub"), b"\xff\xfeclip" + extension), "wb") as file:
        file.write(b"x")
    assert [s.key for s in get_source(source_name, root, None).samples()] == ["sub/%FF%FEclip", "sub/ok"]


def test_run_over_images_without_split_reads_the_latin1_file(tmp_path, tiny_vit_dir):
    """Items 2 and 3 in one real run: `--shards images` with no `--split`, over a Latin-1 name."""
    make_latin1_folder(tmp_path / "pics")
    cache = tmp_path / "cache"
    result = run_vit(tmp_path / "pics", cache, "images", tiny_vit_dir)
    assert result.returncode == 0, result.stderr
    reader = SplitReader(cache, "images", "all")
    assert reader.keys == ["caf%E9", "ok"]
    assert reader.feature("vit-cls").usable.all()
    assert cli("validate", "--cache", str(cache)).returncode == 0


# --- 3. the default split ---------------------------------------------------------------------


def test_default_split_is_train_else_the_only_split_else_a_choice(tmp_path, monkeypatch):
    assert resolve_split("coco", None) == "train" and resolve_split("images", None) == "all"
    assert resolve_split("images", "all") == "all"

    class TwoSplits(Source):  # a source without `train`, as a user-added one may be
        name, description, needs_data_root, splits = "two", "test", False, ("a", "b")

        def samples(self):
            return []

        def load_image(self, sample):
            raise MediaError("none")

    monkeypatch.setitem(SOURCES, "two", TwoSplits)
    with pytest.raises(SourceError, match="source 'two' has no split 'train'; choose one with --split: a, b"):
        get_source("two", None, None)
    assert get_source("two", None, "b").split == "b"


def test_explicit_wrong_split_is_still_refused_with_the_splits(tmp_path):
    (tmp_path / "pics").mkdir()
    cache = tmp_path / "cache"
    result = cli("run", "--expert", "vit-cls", "--shards", "images", "--data-root", str(tmp_path / "pics"),
                 "--split", "train", "--cache", str(cache))
    assert result.returncode == 2 and "has no split 'train'; splits: all" in result.stderr
    assert not cache.exists()


# --- 4. COCO and VQA v2: paths outside the dataset, entries that cannot be placed -------------


def save_jpg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (value, value, value)).save(path)


def write_hostile_coco(root: Path) -> Path:
    """val2017 with two good images, one `../outside.jpg`, one absolute path, and two captions of
    an image id the file does not list. The outside files exist: reading them would succeed."""
    for i in (1, 2):
        save_jpg(root / "val2017" / f"{i:012d}.jpg", 100)
    save_jpg(root / "outside.jpg", 255)
    secret = root.parent / "secret.jpg"
    save_jpg(secret, 255)
    images = [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"},
              {"id": 3, "file_name": "../outside.jpg"}, {"id": 4, "file_name": str(secret)}]
    captions = [{"id": 10 + i, "image_id": i, "caption": f"image {i}"} for i in (1, 2, 3, 4)]
    captions += [{"id": 90, "image_id": 99, "caption": "no such image"}, {"id": 91, "image_id": 99, "caption": "again"}]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": captions}))
    return secret


def test_coco_paths_leaving_the_image_folder_are_gaps_never_read(tmp_path):
    root = tmp_path / "coco"
    secret = write_hostile_coco(root)
    source = get_source("coco", root, "val")
    samples = {s.key: s for s in source.samples()}
    assert list(samples) == ["000000000001", "000000000002", "000000000003", "000000000004"]  # none dropped
    assert source.load_image(samples["000000000001"]).size == (20, 20)
    for key in ("000000000003", "000000000004"):
        with pytest.raises(MediaError, match="leads outside the image folder"):
            source.load_image(samples[key])
    info = source.info()
    assert info["paths_outside_image_folder"] == 2 and info["captions_without_image"] == 2
    assert any("2 caption(s)" in note for note in info["notes"])
    assert any("2 image(s)" in note and "recorded as gaps" in note for note in info["notes"])
    assert secret.exists()


def test_coco_karpathy_entries_leaving_the_data_root_are_gaps(tmp_path):
    root = tmp_path / "coco"
    save_jpg(root / "val2014" / "COCO_val2014_000000000001.jpg", 100)
    save_jpg(tmp_path / "elsewhere" / "x.jpg", 255)
    entries = [{"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "cocoid": 1, "split": "test",
                "sentences": [{"raw": "a"}]},
               {"filepath": "../elsewhere", "filename": "x.jpg", "cocoid": 2, "split": "test", "sentences": [{"raw": "b"}]}]
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    source = get_source("coco", root, "test")
    good, bad = source.samples()
    assert source.load_image(good).size == (20, 20)
    with pytest.raises(MediaError, match="leads outside the image folder"):
        source.load_image(bad)
    assert source.info()["paths_outside_image_folder"] == 1


def test_coco_run_prints_what_was_left_out_and_records_the_gaps(tmp_path, tiny_vit_dir):
    root = tmp_path / "coco"
    write_hostile_coco(root)
    cache = tmp_path / "cache"
    result = run_vit(root, cache, "coco", tiny_vit_dir, "--split", "val")
    assert result.returncode == 0, result.stderr  # gaps and counted leftovers are not failures
    assert "coco: 2 caption(s) of" in result.stderr and "coco: 2 image(s) of" in result.stderr
    reader = SplitReader(cache, "coco", "val")
    assert list(reader.feature("vit-cls").usable) == [True, True, False, False]
    (row,) = json.loads(cli("status", "--cache", str(cache), "--json").stdout)
    assert all("leads outside the image folder" in reason for reason in row["gaps"].values())
    assert sorted(row["gaps"]) == ["000000000003", "000000000004"]


def test_vqav2_counts_unplaceable_answers_and_a_missing_image_is_a_gap(tmp_path):
    root = tmp_path / "vqa"
    save_jpg(root / "val2014" / "COCO_val2014_000000000001.jpg", 100)  # image 2 is not on disk
    questions = [{"question_id": 10, "image_id": 1, "question": "what?"}, {"question_id": 20, "image_id": 2, "question": "who?"}]
    answer = {"answers": [{"answer": "x"}] * 10, "answer_type": "other", "multiple_choice_answer": "x"}
    answers = [{"question_id": q, **answer} for q in (10, 20, 30, 40, 50)]  # 30, 40, 50: no such question
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": answers}))
    source = get_source("vqav2", root, "val")
    one, two = source.samples()
    assert source.load_image(one).size == (20, 20)
    with pytest.raises(MediaError, match="not found"):
        source.load_image(two)  # a recorded gap at decode; its question stays in the annotations
    assert two.annotations["questions"][0]["question"] == "who?"
    info = source.info()
    assert info["answers_without_question"] == 3
    assert info["notes"] == [f"3 answer entries of {root / 'v2_mscoco_val2014_annotations.json'} name a question_id "
                             f"that is not in {root / 'v2_OpenEnded_mscoco_val2014_questions.json'}; left out"]
