"""Every Ray the project starts by itself listens on loopback only: `precompute run` and `trainer fit
--workers N` without `--address`. While each runs, every listening socket of every process below it
(the GCS server, the raylet, Ray's agents and monitor, the actors and Ray Train workers) is listed
with psutil and must be on 127.0.0.1 or ::1 (an exposed Ray endpoint runs code for whoever reaches it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from test_distributed_training import cache, settings  # noqa: F401  (the 2-worker test's cache fixture)


def listening(root: psutil.Process, members: dict[int, psutil.Process]) -> dict[tuple[str, str, int], str]:
    """{(process name, address, port): process title} of every LISTEN socket below `root`; adds
    every process found below it to `members`."""
    found = {}
    for process in root.children(recursive=True):
        members.setdefault(process.pid, process)
        with contextlib.suppress(psutil.Error):
            name = process.name()
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found[(name, connection.laddr.ip, connection.laddr.port)] = " ".join(process.cmdline())[:160]
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how a dual-stack gRPC socket shows it
    return (mapped or ip).is_loopback


def watch(command: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `command`, listing the listening sockets below it every 0.2 s until it exits; then end
    whatever of its own process tree is left (by pid, as psutil saw them: nothing else)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    root = psutil.Process(process.pid)
    members: dict[int, psutil.Process] = {}
    seen: dict[tuple[str, str, int], str] = {}
    deadline = time.time() + timeout
    try:
        while process.poll() is None and time.time() < deadline:
            seen.update(listening(root, members))
            time.sleep(0.2)
        output, _ = process.communicate(timeout=max(1.0, deadline - time.time()))
    finally:
        for member in [root, *members.values()]:
            with contextlib.suppress(psutil.Error):
                member.kill()  # psutil checks it is still the same process (pid and start time)
    return subprocess.CompletedProcess(command, process.returncode, output), seen


def ray_env(ray_tmp: str) -> dict[str, str]:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    return env


def assert_loopback_only(seen: dict[tuple[str, str, int], str], output: str) -> None:
    exposed = {key: title for key, title in seen.items() if not is_loopback(key[1])}
    assert not exposed, f"listening beyond loopback: {exposed}"
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names, f"the GCS server and raylet were not seen: {sorted(seen)}\n{output[-2000:]}"


@pytest.fixture
def ray_tmp():
    path = tempfile.mkdtemp(prefix="ec-lo-", dir="/tmp")  # short: Ray's socket paths live under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(300)
def test_precompute_run_listens_on_loopback_only(tiny_vit_dir, tmp_path, ray_tmp):
    command = [sys.executable, "-m", "precompute.cli", "run", "--expert", "vit-cls", "--shards", "shapes", "--limit", "48",
               "--shard-size", "8", "--batch-size", "4", "--model", str(tiny_vit_dir), "--cache", str(tmp_path / "cache"),
               "--no-progress"]
    result, seen = watch(command, ray_env(ray_tmp), timeout=280)
    assert result.returncode == 0, result.stdout[-3000:]
    assert_loopback_only(seen, result.stdout)
    assert any(name.startswith("ray::") for name, _, _ in seen), sorted(seen)  # the actors' own servers were listed too


@pytest.mark.timeout(300)
def test_trainer_fit_workers_listens_on_loopback_only(cache, tiny_lm_dir, tmp_path, ray_tmp):  # noqa: F811
    command = [sys.executable, "-m", "trainer.cli", "fit", "--out", str(tmp_path / "out"), "--workers", "2", "--no-progress",
               *settings(cache, tiny_lm_dir, 8, "save_every=4", "eval_split=null")]
    result, seen = watch(command, ray_env(ray_tmp), timeout=280)
    assert result.returncode == 0, result.stdout[-3000:]
    assert_loopback_only(seen, result.stdout)
    assert any("RayTrainWorker" in name + title for (name, _, _), title in seen.items()), sorted(seen)
