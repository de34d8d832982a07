"""A multi-node Ray cluster on one machine's loopback: how the tests and `bench/` exercise what a
real cluster does (actors spread over nodes, a node lost mid-run) without a second machine.

Each node is its own `ray start ... --block` process tree with its own CPUs, exactly as Slurm or
KubeRay start one per machine. The nodes use 127.0.0.2: Ray rewrites "127.0.0.1" and "localhost"
to the machine's outside address when it starts a node that joins a cluster, and a test cluster
must stay on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps a lone node on 127.0.0.1, but
then no second node may join). Token authentication is on, as on a real cluster: every process
started through `env` gets the cluster's random token. Ray's files go to a short private
directory (RAY_TMPDIR), so nothing here is found by, or finds, another Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devsupport.processes import kill_tree, mentioning

HOST = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """`with LoopbackCluster(cpus_per_node=[1, 1]) as cluster:` a head and one more node, 1 CPU each.

    `cluster.address` is what `precompute run --address` takes; `cluster.env` the environment a
    process needs to reach it; `cluster.kill(i)` SIGKILLs node i's whole process tree (a lost
    machine, not a polite shutdown). `dashboard=True` starts the head's job server at
    `cluster.dashboard` (for `ray job submit`).
    """

    def __init__(self, cpus_per_node: list[int], dashboard: bool = False, log_dir: Path | None = None,
                 timeout: float = 120):
        self.cpus_per_node, self.dashboard_enabled, self.timeout = cpus_per_node, dashboard, timeout
        self.temp_dir = tempfile.mkdtemp(prefix="ec-ray-", dir="/tmp")  # short: Ray's socket paths live under it
        self.log_dir = Path(log_dir or self.temp_dir)
        self.address = f"{HOST}:{free_port()}"
        self.dashboard = f"http://{HOST}:{free_port()}" if dashboard else None
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_TMPDIR": self.temp_dir}
        self.env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []

    def __enter__(self) -> LoopbackCluster:
        try:
            head = ["--head", f"--port={self.address.split(':')[1]}", "--disable-usage-stats"]
            if self.dashboard:
                head += [f"--dashboard-host={HOST}", f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}"]
            else:
                head += ["--include-dashboard=false"]
            self.start_node(head, self.cpus_per_node[0])
            for cpus in self.cpus_per_node[1:]:
                self.start_node([f"--address={self.address}"], cpus)
            self.wait_for_nodes(len(self.cpus_per_node))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start_node(self, args: list[str], cpus: int) -> None:
        log = (self.log_dir / f"node-{len(self.nodes)}.log").open("w")
        self.nodes.append(subprocess.Popen(
            ["ray", "start", *args, f"--node-ip-address={HOST}", f"--num-cpus={cpus}", "--block"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True))
        log.close()

    def alive_nodes(self) -> int:
        probe = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
                 "print(sum(node['Alive'] for node in ray.nodes()))" % self.address)
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=self.env, timeout=60)
        words = result.stdout.split()
        return int(words[-1]) if result.returncode == 0 and words else 0

    def wait_for_nodes(self, count: int) -> None:
        deadline = time.time() + self.timeout
        while self.alive_nodes() < count:
            for index, node in enumerate(self.nodes):
                if node.poll() is not None:
                    log = (self.log_dir / f"node-{index}.log").read_text()[-2000:]
                    raise RuntimeError(f"ray node {index} exited with {node.returncode}:\n{log}")
            if time.time() > deadline:
                raise TimeoutError(f"{count} Ray nodes did not come up in {self.timeout:.0f} s (see {self.log_dir})")
            time.sleep(1)

    def kill(self, index: int) -> None:
        try:
            os.killpg(self.nodes[index].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.nodes[index].wait()

    def close(self) -> None:
        """Stop every node (politely, then by force) and remove Ray's files."""
        for node in self.nodes:
            if node.poll() is None:
                node.terminate()
        for index, node in enumerate(self.nodes):
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            self.kill(index)
        kill_tree(mentioning(self.temp_dir))  # anything the trees left behind
        shutil.rmtree(self.temp_dir, ignore_errors=True)
