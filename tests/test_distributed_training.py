"""`trainer fit --workers N`: Ray Train (DDP, gloo on this machine's CPUs) against the eP-ALM cache
and tiny OPT of test_trainer.py. Two ranks with half the batch each must train what one process
trains with the whole batch; a killed worker must cost nothing but the steps since the last
checkpoint; jobs/slurm/train.sbatch must train on a two-node loopback cluster; bad input is
refused before Ray starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from devsupport.loopback_cluster import free_port
from devsupport.processes import descendants, kill_tree, mentioning, title
from test_cluster import ROOT, slurm_shims
from test_trainer import write_shapes_cache
from trainer.config import load_config
from trainer.data import EpochSampler
from trainer.loop import fit

CLI = [sys.executable, "-m", "trainer.cli"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp") / "cache"
    write_shapes_cache(root, "train", 40, invalid={3})  # 195 VQA examples
    write_shapes_cache(root, "val", 8)
    return root


def settings(cache: Path, tiny_lm_dir: Path, steps: int, *extra: str) -> list[str]:
    """One run's config as KEY=VALUE overrides (the CLI and `fit` take the same). The tiny OPT has
    no dropout and eP-ALM's VQA answers are one word each, so the mean of two ranks' half-batch
    mean losses is the whole batch's mean loss, exactly."""
    return [f"cache={cache}", "method=epalm", f"max_steps={steps}", f"model.lm={tiny_lm_dir}", "model.num_levels=2",
            "model.num_beams=1", "model.max_new_tokens=2", "batch_size=16", "num_workers=0", "lr=1e-3", "warmup_steps=2",
            *extra]


def single_process(out: Path, overrides: list[str]) -> None:
    """The reference run, in this process, without Ray: what `trainer fit` without --workers runs."""
    fit(load_config(None, overrides, out=str(out)), progress=False)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r}


def test_ranks_split_every_global_batch_and_resume_mid_epoch():
    """The union of the ranks' batches at step s is the single-process batch at step s, from any start."""
    size, batch = 50, 12
    single = list(EpochSampler(size, seed=7, epoch=3, batch_size=batch))
    assert len(single) == 48 and len(set(single)) == 48  # whole global batches only
    for world in (2, 3, 4):
        ranks = [list(EpochSampler(size, 7, 3, 1, batch, rank, world)) for rank in range(world)]
        assert all(len(r) == len(ranks[0]) for r in ranks)
        share = batch // world
        for step in range(len(single) // batch - 1):
            union = sorted(i for r in ranks for i in r[step * share:(step + 1) * share])
            assert union == sorted(single[(step + 1) * batch:(step + 2) * batch])
    before = torch.randperm(size, generator=torch.Generator().manual_seed(7 * 100_003 + 3)).tolist()
    assert list(EpochSampler(size, 7, 3)) == before  # one example at a time, as bench/ and the old sampler drew them
    with pytest.raises(ValueError, match="does not split evenly"):
        EpochSampler(size, 7, batch_size=10, world_size=4)


@pytest.mark.timeout(300)
def test_two_workers_follow_the_single_process_loss_curve(cache, tiny_lm_dir, tmp_path):
    """20 steps over an epoch boundary (12 batches of 16 per epoch), saving at 7 and 14: the same
    losses and weights as one process, to float rounding (DDP sums two half-batch gradients where
    one process sums one whole batch; measured difference ~1e-8, far inside the tolerance)."""
    overrides = settings(cache, tiny_lm_dir, 20, "save_every=7", "log_every=1")
    single_process(tmp_path / "one", overrides)
    started = time.perf_counter()
    result = subprocess.run([*CLI, "fit", "--out", str(tmp_path / "two"), "--workers", "2", "--no-progress", *overrides],
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"2 workers: {time.perf_counter() - started:.1f} s")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(two) == list(range(1, 21))
    assert [two[s] for s in one] == pytest.approx([one[s] for s in one], rel=1e-4, abs=2e-5)  # log rounds to 1e-5
    a, b = (load_file(tmp_path / run / "checkpoint" / "model.safetensors") for run in ("one", "two"))
    assert set(a) == set(b)  # the unwrapped model's keys: no DDP `module.` prefix
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    info = json.loads((tmp_path / "two" / "checkpoint" / "checkpoint.json").read_text())
    assert info["step"] == 20
    scored = json.loads((tmp_path / "two" / "checkpoint" / "metrics.json").read_text())
    printed = re.search(r"^\{\n.*?^\}$", result.stdout, re.MULTILINE | re.DOTALL)  # rank 0's final eval, via Ray Train
    assert scored.pop("split") == "val" and printed and json.loads(printed.group()) == scored
    assert list((tmp_path / "two" / "ray" / "train").glob("checkpoint_*"))  # reported through Ray Train


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_worker_resumes_from_the_last_checkpoint(cache, tiny_lm_dir, tmp_path):
    """SIGKILL one Ray Train worker after the first checkpoint: Ray Train restarts the group, every
    rank resumes from the checkpoint (the data position, optimizer and RNG with it), and the run
    ends where an uninterrupted single-process run ends; OUT/checkpoint then evaluates as usual."""
    overrides = settings(cache, tiny_lm_dir, 300, "save_every=30", "log_every=10", "eval_split=null")
    single_process(tmp_path / "straight", overrides)
    out = tmp_path / "killed"
    process = subprocess.Popen([*CLI, "fit", "--out", str(out), "--workers", "2", "--no-progress", *overrides],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # minutes on a busy machine (the rest of the suite runs beside it): wait for the checkpoint and
        # for both workers to carry their actor's name, as long as the run lives
        deadline, workers = time.time() + 480, []
        while time.time() < deadline and process.poll() is None and len(workers) != 2:
            time.sleep(0.05)
            if (out / "checkpoint" / "checkpoint.json").exists():
                workers = descendants(process.pid, named="RayTrainWorker")
        assert len(workers) == 2, [title(child) for child in descendants(process.pid)]
        workers[-1].kill()
        killed_after = json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"]
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            members = descendants(process.pid)
            process.kill()
            kill_tree(members)
    assert process.returncode == 0, output[-4000:]
    assert killed_after < 300
    resumed = [int(step) for step in re.findall(r"resuming from \S+ at step (\d+)", output)]
    assert resumed and resumed[0] >= killed_after, output[-4000:]
    assert "[FailurePolicy] RETRY" in output
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"] == 300
    assert max(losses(out)) == 300
    a, b = (load_file(run / "checkpoint" / "model.safetensors") for run in (tmp_path / "straight", out))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    evaluated = subprocess.run([*CLI, "eval", "--cache", str(cache), "--checkpoint", str(out / "checkpoint"), "--split", "val"],
                               capture_output=True, text=True, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "vqa_accuracy" in json.loads((out / "checkpoint" / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slurm_script_trains_on_a_ray_cluster_over_its_nodes(cache, tiny_lm_dir, tmp_path):
    """jobs/slurm/train.sbatch as Slurm would run it on a two-node CPU allocation (scontrol / srun /
    hostname stood in for, as in test_cluster.py): a Ray cluster over both nodes, `trainer fit
    --workers 2 --address auto` on it, `trainer eval` of the result, nothing of Ray left behind."""
    shims = slurm_shims(tmp_path / "bin")
    ray_tmp = tempfile.mkdtemp(prefix="ec-train-", dir="/tmp")
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": str(ROOT), "RAY_PORT": str(free_port()), "RAY_TMPDIR": ray_tmp}
    out = tmp_path / "run"
    try:
        result = subprocess.run(["bash", str(ROOT / "jobs" / "slurm" / "train.sbatch"), "--cache", str(cache), "--out", str(out),
                                 "--no-progress", *settings(cache, tiny_lm_dir, 12, "save_every=5")],
                                capture_output=True, text=True, env=env, timeout=540)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "2 node(s)" in result.stdout and "world_size=2" in result.stdout + result.stderr
        assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"] == 12
        assert "vqa_accuracy" in json.loads((out / "eval" / "metrics.json").read_text())
        assert not mentioning(ray_tmp), "the script left Ray processes running"
    finally:
        kill_tree(mentioning(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers: must be at least 1"),
    (["--workers", "two"], "--workers: invalid"),
    (["--workers", "3"], "batch_size=16 \\(the global batch\\) does not split evenly over 3 workers"),
])
def test_bad_worker_counts_are_refused_before_ray_starts(cache, tiny_lm_dir, tmp_path, args, message):
    result = subprocess.run([*CLI, "fit", "--out", str(tmp_path / "run"), *args, *settings(cache, tiny_lm_dir, 4)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and re.search(message, result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "run" / "ray").exists()  # refused before Ray Train ran


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_workers_stream_a_webdataset_cache_for_several_epochs(tiny_lm_dir, tmp_path):
    """Tar shards dealt unevenly (3 shards of 16 samples to 2 ranks): every rank still runs exactly
    `batches_per_rank` batches per epoch, so the ranks meet at every all-reduce and the run ends
    instead of hanging at the first epoch boundary."""
    from cache_schema import SplitReader
    from trainer.methods import get_method

    cache = tmp_path / "wds-cache"
    write_shapes_cache(cache, "train", 40, invalid={3}, format="wds")
    overrides = settings(cache, tiny_lm_dir, 24, "save_every=10", "log_every=1", "eval_split=null")
    config = load_config(None, overrides, out=str(tmp_path / "two"))
    method = get_method(config)
    stream = SplitReader(cache, "shapes", "train").iterable_dataset(
        method.feature_fields(), lambda a: method.expand(a, train=True), seed=config.seed, world_size=2, batch_size=8)
    per_epoch = [stream.batches_per_rank(epoch) for epoch in range(4)]
    assert sum(per_epoch[:2]) < 24  # the run crosses at least two epoch boundaries
    result = subprocess.run([*CLI, "fit", "--out", str(tmp_path / "two"), "--workers", "2", "--no-progress", *overrides],
                            capture_output=True, text=True, timeout=380)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in log if "loss" in r]
    assert len(epochs) == 24 and epochs[-1] >= 2
    assert [epochs.count(e) for e in range(2)] == per_epoch[:2]  # each epoch exactly the batches every rank can fill
