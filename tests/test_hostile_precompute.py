"""Hostile input to `precompute` and its cache: out-of-range options, caches that cannot be
written, a full disk while planning, corrupt or incomplete caches, gaps without reasons.

Every refusal is checked the same way (`assert_refused`): exit 2, one line on stderr naming the
bad thing, no traceback, and nothing written. Caches are real: written by `CacheWriter`, read by
the real command line: in this process through `main` (a subprocess costs seconds of imports),
and in a subprocess where the process itself matters (its exit status, a file size limit, a
private mount namespace).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_schema import CacheError, CacheWriter, ClassTable, SplitPlan, write_table
from cache_schema.commit import gap_category
from precompute.cli import main
from precompute.decode import decode_image
from precompute.experts import ExpertError, option_value, scope_options
from precompute.sources import MediaError
from test_cache_schema import make_plan, make_spec, write_all

CLI = [sys.executable, "-m", "precompute.cli"]


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=120, **kwargs)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: what "unchanged" is compared by."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def assert_refused(result: subprocess.CompletedProcess, *names: str) -> None:
    """Exit 2, exactly one line on stderr that names each of `names`, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


def run_main(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """The real entry point in this process (a subprocess costs seconds of imports): its exit
    code and output as `cli` would give them. An uncaught exception fails the test as a traceback would."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def run_args(cache: Path, *extra: str) -> list[str]:
    return ["run", "--expert", "rgb", "--shards", "shapes", "--source-opt", "num=8", "--cache", str(cache),
            "--no-progress", *extra]


# 1, 5: every count of `precompute run` is checked before any work ------------------------------------

@pytest.mark.parametrize("flag, value, least", [
    ("--batch-size", "-1", 1), ("--batch-size", "0", 1), ("--shard-size", "0", 1), ("--shard-size", "-5", 1),
    ("--limit", "-3", 1), ("--limit", "0", 1), ("--workers", "0", 1), ("--retries", "-1", 0),
])
def test_out_of_range_counts_are_refused_before_any_work(tmp_path, capsys, flag, value, least):
    cache = tmp_path / "cache"
    result = run_main(capsys, *run_args(cache, flag, value))
    assert_refused(result, f"precompute run: error: {flag} must be at least {least}, got {value}")
    assert not cache.exists()


def test_out_of_range_count_leaves_an_existing_cache_unchanged(tmp_path):
    """The same refusal from the installed command's process: its exit status and stderr."""
    cache = tmp_path / "cache"
    write_all(cache, make_plan(), make_spec())
    before = tree(cache)
    assert_refused(cli(*run_args(cache, "--batch-size", "-1")), "precompute run: error: --batch-size must be at least 1, got -1")
    assert tree(cache) == before


def test_a_shard_with_unexplained_gaps_is_never_committed(tmp_path):
    """What `--batch-size -1` did: a worker whose batch loop never ran handed back a shard with
    every sample invalid and no reason; it was committed, and the corrected rerun skipped it."""
    plan, spec = make_plan(), make_spec()
    writer = CacheWriter(tmp_path)
    writer.prepare_split(plan)
    writer.prepare_feature(plan, spec)
    keys = plan.shard_keys(0)
    nothing = {"cls": np.zeros((len(keys), 2, 3), np.float16)}
    with pytest.raises(CacheError, match=r"emb shard 0: 4 of 4 samples are invalid without a reason \(first: 'k00'\)"):
        writer.write_shard("toy", "train", spec, 0, 0, keys, nothing, np.zeros(len(keys), bool), {}, 0.1, "cpu")
    with pytest.raises(CacheError, match="reason is given for 1 sample"):
        writer.write_shard("toy", "train", spec, 0, 0, keys, nothing, np.ones(len(keys), bool), {"k01": "broken"}, 0.1, "cpu")
    assert writer.committed_shards(plan, spec) == set()
    assert not (tmp_path / "toy/train/_commits/emb/00000.json").exists()


# 2: validate rejects a commit record whose gaps carry no reason -------------------------------------

def test_validate_rejects_gaps_without_a_reason(tmp_path, capsys):
    write_all(tmp_path, make_plan(), make_spec())  # shard 0 has one gap, k01, with its reason
    record_path = tmp_path / "toy/train/_commits/emb/00000.json"
    record = json.loads(record_path.read_text())
    assert record["num_valid"] == 3 and record["invalid"] == {"k01": "corrupt jpeg"}
    record["invalid"] = {}
    record_path.write_text(json.dumps(record))
    result = run_main(capsys, "validate", "--cache", str(tmp_path))
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    assert "3 committed shards checked, 1 problems" in result.stdout
    assert "toy/train emb shard 0: 1 invalid sample(s) but 0 with a reason" in result.stderr

    record["invalid"] = {"k01": "  "}
    record_path.write_text(json.dumps(record))
    result = run_main(capsys, "validate", "--cache", str(tmp_path))
    assert result.returncode == 1 and "shard 0: 1 gap(s) with an empty reason (first: 'k01')" in result.stderr
    # Such a record vouches for nothing: a rerun computes the shard again instead of skipping it.
    assert CacheWriter(tmp_path).committed_shards(make_plan(), make_spec()) == {1, 2}


# 3: a corrupt zstd chunk is one shard's problem; the others are still checked ------------------------

def test_validate_reports_a_corrupt_chunk_and_checks_the_rest(tmp_path, capsys):
    write_all(tmp_path, make_plan(), make_spec())
    shard_file = tmp_path / "toy/train/emb/cls/c/1/0/0"  # the Zarr storage shard of precompute shard 1
    raw = bytearray(shard_file.read_bytes())
    assert raw[:4] == b"\x28\xb5\x2f\xfd"  # its first chunk's zstd frame magic
    raw[:4] = b"\0\0\0\0"
    shard_file.write_bytes(bytes(raw))
    record_path = tmp_path / "toy/train/_commits/emb/00002.json"  # and shard 2, after it, stale
    record = json.loads(record_path.read_text())
    record["keys_digest"] = "0" * 64
    record_path.write_text(json.dumps(record))

    result = run_main(capsys, "validate", "--cache", str(tmp_path))
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    assert "3 committed shards checked, 2 problems" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("toy/train emb shard 1: array 'cls' unreadable: RuntimeError: Zstd decompression error")
    assert lines[1] == "toy/train emb shard 2: keys digest differs from the samples table"


# 4: pending shards make an incomplete cache, unless only the committed ones are asked about -----------

def test_validate_says_what_is_pending_and_fails_unless_allowed(tmp_path, capsys):
    plan, spec = make_plan(), make_spec()
    write_all(tmp_path, plan, spec, skip={1, 2})
    CacheWriter(tmp_path).record_failure(plan, spec.name, 2, "RuntimeError: out of memory", 3)

    result = run_main(capsys, "validate", "--cache", str(tmp_path))
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    assert result.stdout.strip() == "1 committed shards checked, 0 problems, 2 shards pending"
    assert "pending: toy/train emb: 2 of 3 shards pending (no commit record), 1 of them failed" in result.stderr
    assert "--allow-pending" in result.stderr

    allowed = run_main(capsys, "validate", "--cache", str(tmp_path), "--allow-pending")
    assert allowed.returncode == 0, allowed.stderr
    assert "1 committed shards checked, 0 problems" in allowed.stdout

    write_all(tmp_path, plan, spec)  # finish it
    complete = run_main(capsys, "validate", "--cache", str(tmp_path))
    assert complete.returncode == 0 and complete.stdout.strip() == "3 committed shards checked, 0 problems"
    assert complete.stderr == ""


def test_validate_counts_a_planned_split_without_features_as_pending(tmp_path, capsys):
    CacheWriter(tmp_path).prepare_split(make_plan())
    result = run_main(capsys, "validate", "--cache", str(tmp_path))
    assert result.returncode == 1 and "pending: toy/train: a shard plan of 3 shards and no feature computed yet" in result.stderr
    assert run_main(capsys, "validate", "--cache", str(tmp_path), "--allow-pending").returncode == 0


# 5: the cache location, expert option types, a full disk ----------------------------------------------

def test_cache_naming_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "cache.tar"
    target.write_bytes(b"not a cache")
    assert_refused(run_main(capsys, *run_args(target)), f"cache {target} is a file, not a directory")
    assert target.read_bytes() == b"not a cache"
    assert_refused(run_main(capsys, *run_args(target / "inside")), f"is under {target}, a file")
    assert_refused(run_main(capsys, "status", "--cache", str(target)), str(target), "a file, not a directory")
    assert_refused(run_main(capsys, "validate", "--cache", str(target)), str(target), "a file, not a directory")


def test_cache_in_a_read_only_place_is_refused(tmp_path):
    """Root ignores permission bits, so as root the place is made truly read-only: a read-only bind
    mount in a private mount namespace (`unshare -m`); otherwise a directory without write bits."""
    place = tmp_path / "readonly"
    place.mkdir()
    args = run_args(place / "cache")
    if os.geteuid() == 0:
        unshare = shutil.which("unshare")
        probe = subprocess.run([unshare or "unshare", "-m", "sh", "-c", f"mount --bind -o ro {place} {place}"],
                               capture_output=True, text=True) if unshare else None
        if probe is None or probe.returncode != 0:
            pytest.skip("running as root, where permission bits do not stop writes, and no read-only bind mount "
                        f"is possible here ({probe.stderr.strip() if probe else 'no unshare'})")
        command = [unshare, "-m", "sh", "-c", f'mount --bind -o ro "{place}" "{place}" && exec "$@"', "sh", *CLI, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    else:
        place.chmod(0o555)
        try:
            result = cli(*args)
        finally:
            place.chmod(0o755)
    assert_refused(result, f"cache {place / 'cache'}: not writable (cannot create it in {place})")
    assert list(place.iterdir()) == []


@pytest.mark.parametrize("option, message", [
    ("levels=abc", "expert 'vit-cls' option 'levels' takes an integer (default 6), got 'abc'"),
    ("levels=2.5", "option 'levels' takes an integer (default 6), got '2.5'"),
    ("vit-cls.depth=3", "expert 'vit-cls' has no option 'depth'; it takes levels"),
])
def test_expert_option_of_the_wrong_type_is_refused(tmp_path, capsys, option, message):
    cache = tmp_path / "cache"
    result = run_main(capsys, "run", "--expert", "vit-cls", "--shards", "shapes", "--cache", str(cache), "--expert-opt", option)
    assert_refused(result, message)
    assert not cache.exists()


def test_expert_option_types_come_from_the_declared_defaults():
    """One place types every option: text from the command line, typed values from Python."""
    assert scope_options({"resolution": "64", "ocrdet.min_confidence": "0.5"}, ["rgb", "ocrdet"]) == {
        "rgb": {"resolution": 64}, "ocrdet": {"resolution": 64, "min_confidence": 0.5}}
    assert option_value("ocrdet", "min_confidence", 1) == 1.0 and isinstance(option_value("ocrdet", "min_confidence", 1), float)
    assert option_value("text-cls", "field", "yes") == "yes"  # YAML would have made it True
    assert option_value("objdet", "classes", "") == "" and option_value("objdet", "classes", None) == ""
    for name, key, value in (("vit-cls", "levels", True), ("vit-cls", "levels", 6.0), ("depth", "resolution", [1]),
                             ("ocrdet", "min_confidence", "high"), ("ocrdet", "min_confidence", False)):
        with pytest.raises(ExpertError, match=f"option '{key}' takes"):
            option_value(name, key, value)


def limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_while_planning_is_one_line_and_no_plan(tmp_path):
    """A real write failure (the file size limit: EFBIG, as ENOSPC would) while the plan is written."""
    cache = tmp_path / "cache"
    args = run_args(cache)
    args[args.index("num=8")] = "num=200"
    result = subprocess.run(CLI + args, capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size(4096))
    assert_refused(result, f"{cache / 'shapes/train/samples.jsonl'}: cannot write: File too large")
    leftovers = [str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers  # no temp file, no split.json, no cache.json: nothing looks planned
    assert_refused(cli("status", "--cache", str(cache)), "not a feature cache (no cache.json)")


def test_a_failed_manifest_write_takes_the_split_header_back(tmp_path):
    plan = make_plan()
    (tmp_path / "cache.json").mkdir()  # a manifest that cannot be written: a real OSError on write
    with pytest.raises(CacheError, match="cache.json: cannot"):
        CacheWriter(tmp_path).prepare_split(plan)
    assert not (tmp_path / "toy/train/split.json").exists()
    (tmp_path / "cache.json").rmdir()
    CacheWriter(tmp_path).prepare_split(plan)
    assert json.loads((tmp_path / "cache.json").read_text())["splits"] == {"toy/train": {"num_samples": 10, "shard_size": 4}}


def test_a_plan_stopped_before_its_manifest_entry_is_registered_on_the_rerun(tmp_path):
    plan = make_plan()
    CacheWriter(tmp_path).prepare_split(plan)
    (tmp_path / "cache.json").unlink()  # as if killed between split.json and cache.json
    CacheWriter(tmp_path).prepare_split(plan)
    assert "toy/train" in json.loads((tmp_path / "cache.json").read_text())["splits"]


# 6: status says why samples are gaps ------------------------------------------------------------------

def real_reasons(tmp_path: Path) -> list[str]:
    """Reasons exactly as the image decoder records them."""
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "text.png").write_bytes(b"hello, not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    reasons = []
    for name in ("broken.jpg", "text.png", "empty.png", "missing.png"):
        with pytest.raises(MediaError) as info:
            decode_image(tmp_path / name)
        reasons.append(str(info.value))
    return reasons


def test_status_counts_gaps_by_reason(tmp_path, capsys):
    reasons = real_reasons(tmp_path)
    plan, spec = SplitPlan("toy", "train", [f"k{i}" for i in range(8)], [{}] * 8, 4), make_spec()
    gaps = {"k0": reasons[0], "k2": reasons[1], "k3": reasons[0], "k5": reasons[2], "k6": reasons[3]}
    cache = tmp_path / "cache"
    writer = CacheWriter(cache)
    writer.prepare_split(plan)
    writer.prepare_feature(plan, spec)
    for shard in range(2):
        keys = plan.shard_keys(shard)
        valid = np.array([key not in gaps for key in keys])
        writer.write_shard("toy", "train", spec, shard, shard * 4, keys, {"cls": np.zeros((4, 2, 3), np.float16)}, valid,
                           {key: gaps[key] for key in keys if key in gaps}, 0.1, "cpu")
    categories = [gap_category(reason) for reason in reasons]
    assert categories[2:] == ["empty file (0 bytes)", "file not found"]

    table = run_main(capsys, "status", "--cache", str(cache))
    assert table.returncode == 0, table.stderr
    counts = {categories[0]: 2, categories[1]: 1, categories[2]: 1, categories[3]: 1}
    expected = ", ".join(f"{n} {c}" for c, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    assert f"toy/train emb: 5 invalid: {expected}" in table.stdout.splitlines()

    [row] = json.loads(run_main(capsys, "status", "--cache", str(cache), "--json").stdout)
    assert row["invalid"] == 5 and row["invalid_reasons"] == counts
    assert row["gaps"] == gaps


# 7: metadata respects the umask -----------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
@pytest.mark.parametrize("format", ["zarr", "wds"])
def test_cache_files_respect_the_umask(tmp_path, umask, format):
    cache = tmp_path / "cache"
    previous = os.umask(umask)
    try:
        plan, spec = make_plan(), make_spec()
        writer = CacheWriter(cache, format)
        writer.prepare_split(plan)
        writer.prepare_feature(plan, spec)
        start, stop = plan.shard_range(0)
        writer.write_shard("toy", "train", spec, 0, start, plan.shard_keys(0), {"cls": np.zeros((4, 2, 3), np.float16)},
                           np.ones(4, bool), {}, 0.1, "cpu")
        writer.record_failure(plan, spec.name, 1, "RuntimeError: boom", 3)
        write_table(cache, "seg", ClassTable(["bg"], np.ones((1, 4), np.float16), np.zeros(8, np.float32),
                                             np.zeros((4, 8), np.float32), {"text_encoder": "t"}))
    finally:
        os.umask(previous)
    files = {p.relative_to(cache): stat.S_IMODE(p.stat().st_mode) for p in cache.rglob("*") if p.is_file()}
    dirs = {p.relative_to(cache): stat.S_IMODE(p.stat().st_mode) for p in cache.rglob("*") if p.is_dir()}
    for name in ("cache.json", "toy/train/split.json", "toy/train/samples.jsonl", "toy/train/_commits/emb/00000.json",
                 "toy/train/_failures/emb/00001.json"):
        assert files.pop(Path(name)) == 0o666 & ~umask, name
    assert set(files.values()) == {0o666 & ~umask}, files  # arrays, tars, tables
    assert set(dirs.values()) == {0o777 & ~umask}, dirs
