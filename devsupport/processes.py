"""A test's own process tree: the processes a run it started spawned (its Ray's raylet, workers and
actors), found by ancestry and ended the same way.

Never by a name matched over the whole machine: `pgrep -f ray::ShardWorker` also finds another
job's Ray (a second test beside this one under pytest-xdist, or a user's cluster).
"""

from __future__ import annotations

import contextlib

import psutil


def title(process: psutil.Process) -> str:
    """The command line as one string, where Ray names a worker by its actor (`ray::ShardWorker`,
    `ray::RayTrainWorker`, `...__init__` while the constructor runs); "" once the process is gone."""
    with contextlib.suppress(psutil.Error):
        return " ".join(process.cmdline())
    return ""


def descendants(pid: int, named: str = "") -> list[psutil.Process]:
    """The processes below `pid` whose title contains `named` (all of them by default)."""
    with contextlib.suppress(psutil.Error):
        return [child for child in psutil.Process(pid).children(recursive=True) if named in title(child)]
    return []


def kill_tree(processes: list[psutil.Process]) -> None:
    """SIGKILL each of `processes` still running (psutil checks pid and start time, so a recycled
    pid is never hit)."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()


def mentioning(text: str) -> list[psutil.Process]:
    """Every process whose command line contains `text`: for a cluster a script started with its
    own nohup'd `ray start` (not below the test), named by the private temp dir only it uses."""
    return [process for process in psutil.process_iter() if text in title(process)]
