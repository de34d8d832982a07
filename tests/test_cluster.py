"""A real two-node Ray cluster on loopback: `ray start --head` and a second `ray start --address`,
separate process trees with a CPU each, as Slurm or KubeRay would start them on two machines.
`precompute run --address` spreads its actors over both nodes; when one node is killed mid-run
(SIGKILL to its raylet and workers: a lost machine, not a polite shutdown) the run finishes on the
other, and the cache validates.

The nodes use 127.0.0.2: Ray rewrites "127.0.0.1" and "localhost" to the machine's outside address
when it starts a node that joins a cluster, and a test cluster must stay on loopback.
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps a single node on 127.0.0.1, but then no second node may
join.) Token authentication is on, as on a real cluster: every process gets the same random token
through RAY_AUTH_TOKEN.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cache_schema import validate_cache
from precompute.cli import build_parser as precompute_parser
from trainer.cli import build_parser as trainer_parser
from test_engine import CLI, wait_for_commits

HOST = "127.0.0.2"
TOKEN = secrets.token_hex(32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own process group, so the whole node can be killed at once."""
    with log.open("w") as out:
        return subprocess.Popen(["ray", "start", *args, f"--node-ip-address={HOST}", "--num-cpus=1", "--block"],
                                stdout=out, stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True)


def alive_nodes(address: str) -> int:
    probe = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
             "print(sum(node['Alive'] for node in ray.nodes()))" % address)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ray_env(),
                            timeout=60)
    return int(result.stdout.split()[-1]) if result.returncode == 0 and result.stdout.split() else 0


def kill_node(node: subprocess.Popen) -> None:
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    node.wait()


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """(address, the joining node's process); both nodes torn down afterwards."""
    address = f"{HOST}:{free_port()}"
    temp_dir = tempfile.mkdtemp(prefix="ec-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    head = start_node(["--head", f"--port={address.split(':')[1]}", "--include-dashboard=false",
                       "--disable-usage-stats", f"--temp-dir={temp_dir}"], tmp_path / "head.log")
    nodes = [head]
    try:
        deadline = time.time() + 120
        while not (Path(temp_dir) / "ray_current_cluster").exists():
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(0.5)
        nodes.append(start_node([f"--address={address}"], tmp_path / "worker.log"))
        while alive_nodes(address) < 2:
            assert nodes[1].poll() is None and time.time() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(1)
        yield address, nodes[1]
    finally:
        for node in reversed(nodes):
            node.terminate()
        for node in reversed(nodes):
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            kill_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def committed_nodes(commits: Path) -> set[str]:
    nodes = set()
    for path in commits.glob("*.json"):
        try:
            nodes.add(json.loads(path.read_text())["node"])
        except (OSError, ValueError, KeyError):
            pass  # a record being renamed into place
    return nodes


ROOT = Path(__file__).resolve().parents[1]


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
def test_precompute_spreads_over_two_nodes_and_survives_losing_one(tmp_path, tiny_vit_dir, two_nodes):
    address, joined_node = two_nodes
    cache = tmp_path / "cache"
    commits = cache / "shapes/train/_commits/vit-cls"
    process = subprocess.Popen(
        CLI + ["run", "--expert", "vit-cls", "--shards", "shapes", "--model", str(tiny_vit_dir), "--cache", str(cache),
               "--limit", "3000", "--shard-size", "20", "--batch-size", "1", "--source-opt", "num=3000",
               "--address", address, "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ray_env())
    wait_for_commits(commits, 4, process)
    deadline = time.time() + 120
    while len(committed_nodes(commits)) < 2:  # both nodes have committed shards before one is lost
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    committed_before = len(list(commits.glob("*.json")))

    kill_node(joined_node)
    out, err = process.communicate(timeout=480)

    assert process.returncode == 0, err[-3000:]
    assert committed_before < 150, "the run finished before a node could be lost; make it longer"
    assert "a worker died running shard" in out + err
    summary = out.strip().splitlines()[-1].split()
    assert summary[1:5] == ["150", "0", "150", "0"] and summary[-1] == "2", out[-2000:]
    assert len(committed_nodes(commits)) == 2
    assert validate_cache(cache) == (150, [])


SHIMS = {
    # The allocation: two node names, both this machine; `srun -w NODE CMD` runs CMD here.
    "scontrol": 'if [ "$1 $2" = "show hostnames" ]; then printf "node-a\\nnode-b\\n"; else exit 1; fi',
    "srun": 'while [ $# -gt 0 ]; do case "$1" in -w) shift 2 ;; -*) shift ;; *) break ;; esac; done; exec "$@"',
    "hostname": f'if [ "$1" = "--ip-address" ]; then echo {HOST}; else exec /bin/hostname "$@"; fi',
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slurm_script_runs_precompute_on_a_cluster_over_its_nodes(tmp_path, tiny_vit_dir):
    """jobs/slurm/precompute.sbatch as Slurm would run it, with scontrol / srun / hostname standing in
    for a two-node allocation on this machine: Ray head + worker, both used, then torn down."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, body in SHIMS.items():
        (shims / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (shims / name).chmod(0o755)
    ray_tmp = tempfile.mkdtemp(prefix="ec-slurm-", dir="/tmp")
    cache = tmp_path / "cache"
    env = {**ray_env(), "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": str(ROOT),
           "RAY_PORT": str(free_port()), "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_AUTH_TOKEN")  # the script makes the job's token
    script = ROOT / "jobs" / "slurm" / "precompute.sbatch"
    try:
        result = subprocess.run(
            ["bash", str(script), "--expert", "vit-cls", "--shards", "shapes", "--model", str(tiny_vit_dir),
             "--cache", str(cache), "--limit", "400", "--shard-size", "20", "--source-opt", "num=400", "--no-progress"],
            capture_output=True, text=True, env=env, timeout=540)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "2 node(s)" in result.stdout
        summary = result.stdout.strip().splitlines()[-1].split()
        assert summary[1:5] == ["20", "0", "20", "0"] and summary[-1] == "2", result.stdout[-2000:]
        assert validate_cache(cache) == (20, [])
        leftover = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True).stdout.split()
        assert not leftover, "the script left Ray processes running"
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_script_runs_precompute_on_the_cluster(tmp_path, tiny_vit_dir):
    """jobs/ray/submit.sh against a head with a job server: this checkout shipped as the working
    directory, `precompute run --address auto` run by the job's driver, token auth on."""
    port, dashboard_port = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ec-job-", dir="/tmp")
    env = {**ray_env(), "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1"}
    with (tmp_path / "head.log").open("w") as log:
        head = subprocess.Popen(["ray", "start", "--head", f"--node-ip-address={HOST}", f"--port={port}",
                                 f"--dashboard-host={HOST}", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
                                 "--disable-usage-stats", "--block"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while subprocess.run(["ray", "job", "list", "--address", f"http://{HOST}:{dashboard_port}"],
                             capture_output=True, env=env).returncode != 0:
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(2)
        cache = tmp_path / "cache"
        script = ROOT / "jobs" / "ray" / "submit.sh"
        result = subprocess.run(
            ["bash", str(script), "precompute", "run", "--expert", "vit-cls", "--shards", "shapes", "--model",
             str(tiny_vit_dir), "--cache", str(cache), "--limit", "100", "--shard-size", "50", "--no-progress"],
            capture_output=True, text=True, env={**env, "RAY_ADDRESS": f"http://{HOST}:{dashboard_port}"}, timeout=400)
        assert result.returncode == 0 and "succeeded" in result.stdout + result.stderr, result.stderr[-3000:]
        assert "--address auto" in result.stdout
        assert validate_cache(cache) == (2, [])
    finally:
        kill_node(head)
        subprocess.run(["pkill", "-9", "-f", ray_tmp], capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
