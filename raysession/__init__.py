"""Starting or joining Ray, the one way both stages do it (`precompute run`, `trainer fit --workers`).

Its own small package because `precompute` and `trainer` must not import each other, and both need
the same guarantee: a Ray the project starts by itself listens on loopback only.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import ray
from ray._private import ray_constants


def init_ray(address: str | None, **local_options: Any) -> None:
    """Join a cluster (`auto` or HOST:PORT), or start a private local one on loopback
    (`start_local_ray`, which `local_options` go to). A Ray already started in this process is kept:
    a run over several splits, or a test session, pays for one start."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level="WARNING")
    else:
        start_local_ray(**local_options)


# Ray's switch for a node that serves only this machine (its default on macOS and Windows): read as
# ray._private.ray_constants.ENABLE_RAY_CLUSTER, once, when Ray is imported.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def local_only_ray() -> Iterator[None]:
    """While it is open, a Ray node started here takes 127.0.0.1 as its address, and its processes
    listen on loopback only.

    Ray rewrites a requested node address of 127.0.0.1 to the machine's outside address
    (`services.resolve_ip_for_localhost`) unless clusters are switched off (`LOCAL_ONLY_ENV=0`,
    which keeps a lone node on 127.0.0.1). Given 127.0.0.1, the GCS server, the raylet and every
    worker bind their gRPC servers to it, and the dashboard agent, runtime-env agent and the
    autoscaler's metrics server bind to the node address. Ray read the variable when it was
    imported, so the read value is switched too; the processes Ray starts inherit the variable.
    Both are put back afterwards: this process may later join a real cluster.
    """
    saved_env, saved_constant = os.environ.get(LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = saved_env


def start_local_ray(**options: Any) -> None:
    """A private local Ray that listens on loopback only, with no dashboard: an exposed Ray endpoint
    runs arbitrary code for whoever reaches it. It is asked for by name (`address="local"`): left
    unnamed, Ray joins whatever cluster `ray start` last started on this machine. `options` go to
    `ray.init` (the trainer adds a runtime env)."""
    with local_only_ray():
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING",
                 **options)
    address = ray.get_runtime_context().gcs_address
    if not address.startswith("127.0.0.1:"):  # Ray changed how it picks a node's address
        ray.shutdown()
        raise RuntimeError(f"local Ray started on {address}, not on loopback; refusing to run on an exposed Ray")


__all__ = ["init_ray", "local_only_ray", "start_local_ray"]
