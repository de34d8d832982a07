"""Multi-node behaviour on real Ray clusters on this machine's loopback (`LoopbackCluster`: a
`ray start --head` and more `ray start --address` process trees, a CPU each, token auth on), and
the cluster jobs in `jobs/` run as their schedulers would run them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cache_schema import validate_cache
from devsupport.loopback_cluster import HOST, LoopbackCluster, free_port
from devsupport.processes import kill_tree, mentioning
from precompute.cli import build_parser as precompute_parser
from test_engine import CLI, summary_row, wait_for_commits
from trainer.cli import build_parser as trainer_parser

ROOT = Path(__file__).resolve().parents[1]


def committed_nodes(commits: Path) -> set[str]:
    nodes = set()
    for path in commits.glob("*.json"):
        try:
            nodes.add(json.loads(path.read_text())["node"])
        except (OSError, ValueError, KeyError):
            pass  # a record being renamed into place
    return nodes


def test_the_loopback_harness_is_shared_by_tests_and_bench_and_not_shipped():
    """devsupport/ is found by bench (run as a script) and left out of the installed packages."""
    import tomllib
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = find_packages(str(ROOT), include=include)
    assert "precompute" in shipped and not any(name.startswith(("devsupport", "tests", "bench")) for name in shipped)
    assert not (ROOT / "precompute" / "loopback_cluster.py").exists()
    bench = subprocess.run([sys.executable, str(ROOT / "bench" / "cluster_throughput.py"), "--help"], capture_output=True,
                           text=True, cwd="/", env={**os.environ, "PYTHONPATH": ""})
    assert bench.returncode == 0 and "usage:" in bench.stdout, bench.stderr


@pytest.mark.parametrize("manifest", sorted((ROOT / "jobs" / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_kuberay_manifests_run_commands_our_clis_accept(manifest):
    """Each RayJob's entrypoint, command by command, parses with the real `precompute` / `trainer`
    parsers, so a renamed flag breaks this test before it breaks a cluster job."""
    job = yaml.safe_load(manifest.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    commands = [shlex.split(command) for command in job["spec"]["entrypoint"].split("&&")]
    parsers = {"precompute": precompute_parser(), "trainer": trainer_parser()}
    for command in commands:
        parsers[command[0]].parse_args(command[1:])
    if commands[0][:2] == ["precompute", "run"]:
        assert "--address" in commands[0] and commands[0][commands[0].index("--address") + 1] == "auto"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_precompute_spreads_over_two_nodes_and_survives_losing_one(tmp_path, tiny_vit_dir):
    """Both nodes commit shards; then the second is SIGKILLed mid-run (raylet and workers: a lost
    machine). Its shard goes back in the queue, the run completes on the head node, the cache
    validates, and the records name both nodes."""
    cache = tmp_path / "cache"
    commits = cache / "shapes/train/_commits/vit-cls"
    with LoopbackCluster([1, 1], log_dir=tmp_path) as cluster:
        process = subprocess.Popen(
            CLI + ["run", "--expert", "vit-cls", "--shards", "shapes", "--model", str(tiny_vit_dir), "--cache",
                   str(cache), "--limit", "3000", "--shard-size", "20", "--batch-size", "1", "--source-opt",
                   "num=3000", "--address", cluster.address, "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)
        wait_for_commits(commits, 4, process)
        deadline = time.time() + 120
        while len(committed_nodes(commits)) < 2:
            assert process.poll() is None and time.time() < deadline, process.communicate()
            time.sleep(0.2)
        committed_before = len(list(commits.glob("*.json")))

        cluster.kill(1)
        out, err = process.communicate(timeout=480)

    assert process.returncode == 0, err[-3000:]
    assert committed_before < 150, "the run finished before a node could be lost; make it longer"
    assert "a worker died running shard" in out + err
    summary = summary_row(out)
    assert summary[1:5] == ["150", "0", "150", "0"] and summary[-1] == "2", out[-2000:]
    assert len(committed_nodes(commits)) == 2
    assert validate_cache(cache) == (150, [])
    status = subprocess.run(CLI + ["status", "--cache", str(cache), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(status.stdout)[0]["nodes"] == 2


SHIMS = {
    # The allocation: two node names, both this machine; `srun -w NODE CMD` runs CMD here.
    "scontrol": 'if [ "$1 $2" = "show hostnames" ]; then printf "node-a\\nnode-b\\n"; else exit 1; fi',
    "srun": 'while [ $# -gt 0 ]; do case "$1" in -w) shift 2 ;; -*) shift ;; *) break ;; esac; done; exec "$@"',
    "hostname": f'if [ "$1" = "--ip-address" ]; then echo {HOST}; else exec /bin/hostname "$@"; fi',
}


def slurm_shims(folder: Path) -> Path:
    """A folder of executables standing in for scontrol / srun / hostname (SHIMS), for PATH."""
    folder.mkdir()
    for name, body in SHIMS.items():
        (folder / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slurm_script_runs_precompute_on_a_cluster_over_its_nodes(tmp_path, tiny_vit_dir):
    """jobs/slurm/precompute.sbatch as Slurm would run it, with scontrol / srun / hostname standing in
    for a two-node allocation on this machine: Ray head + worker, both used, then torn down."""
    shims = slurm_shims(tmp_path / "bin")
    ray_tmp = tempfile.mkdtemp(prefix="ec-slurm-", dir="/tmp")
    cache = tmp_path / "cache"
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": str(ROOT), "RAY_PORT": str(free_port()),
           "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    script = ROOT / "jobs" / "slurm" / "precompute.sbatch"
    try:
        result = subprocess.run(
            ["bash", str(script), "--expert", "vit-cls", "--shards", "shapes", "--model", str(tiny_vit_dir),
             "--cache", str(cache), "--limit", "400", "--shard-size", "20", "--source-opt", "num=400", "--no-progress"],
            capture_output=True, text=True, env=env, timeout=540)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "2 node(s)" in result.stdout
        summary = summary_row(result.stdout)
        assert summary[1:5] == ["20", "0", "20", "0"] and summary[-1] == "2", result.stdout[-2000:]
        assert validate_cache(cache) == (20, [])
        assert not mentioning(ray_tmp), "the script left Ray processes running"
    finally:
        kill_tree(mentioning(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_script_runs_precompute_on_the_cluster(tmp_path, tiny_vit_dir):
    """jobs/ray/submit.sh against a head with a job server: this checkout shipped as the working
    directory, `precompute run --address auto` run by the job's driver, token auth on."""
    cache = tmp_path / "cache"
    with LoopbackCluster([2], dashboard=True, log_dir=tmp_path) as cluster:
        deadline = time.time() + 120
        while subprocess.run(["ray", "job", "list", "--address", cluster.dashboard], capture_output=True,
                             env=cluster.env).returncode != 0:
            assert time.time() < deadline, "the job server did not come up"
            time.sleep(2)
        result = subprocess.run(
            ["bash", str(ROOT / "jobs" / "ray" / "submit.sh"), "precompute", "run", "--expert", "vit-cls", "--shards",
             "shapes", "--model", str(tiny_vit_dir), "--cache", str(cache), "--limit", "100", "--shard-size", "50",
             "--no-progress"],
            capture_output=True, text=True, timeout=400,
            env={**cluster.env, "RAY_ADDRESS": cluster.dashboard, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and "succeeded" in result.stdout + result.stderr, result.stderr[-3000:]
    assert "--address auto" in result.stdout
    assert validate_cache(cache) == (2, [])
