"""A real two-node Ray cluster on loopback: `ray start --head` and a second `ray start --address`,
separate process trees with a CPU each, as Slurm or KubeRay would start them on two machines.
`precompute run --address` spreads its actors over both nodes; when one node is killed mid-run
(SIGKILL to its raylet and workers: a lost machine, not a polite shutdown) the run finishes on the
other, and the cache validates.

The nodes use 127.0.0.2: Ray rewrites "127.0.0.1" and "localhost" to the machine's outside address
when it starts a worker node, and the cluster must stay on loopback. A node that joins needs
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 to start at all; the head and the driver keep 0, which keeps
their own addresses on loopback. Token authentication is off on this loopback-only cluster.
"""

from __future__ import annotations

import json
import os
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

from cache_schema import validate_cache
from test_engine import CLI, wait_for_commits

HOST = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def ray_env(join: bool) -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if join else "0"}


def start_node(args: list[str], log: Path, join: bool) -> subprocess.Popen:
    """`ray start ... --block` in its own process group, so the whole node can be killed at once."""
    with log.open("w") as out:
        return subprocess.Popen(["ray", "start", *args, f"--node-ip-address={HOST}", "--num-cpus=1", "--block"],
                                stdout=out, stderr=subprocess.STDOUT, env=ray_env(join), start_new_session=True)


def alive_nodes(address: str) -> int:
    probe = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
             "print(sum(node['Alive'] for node in ray.nodes()))" % address)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ray_env(join=False),
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
                       "--disable-usage-stats", f"--temp-dir={temp_dir}"], tmp_path / "head.log", join=False)
    nodes = [head]
    try:
        deadline = time.time() + 120
        while not (Path(temp_dir) / "ray_current_cluster").exists():
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(0.5)
        nodes.append(start_node([f"--address={address}"], tmp_path / "worker.log", join=True))
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
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ray_env(join=False))
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
