"""Waiting on, and finding, the processes a test started (Ray names its workers in the process title)."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable
from typing import Any


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def all_cpus_free(timeout: float = 60) -> None:
    """Wait until every CPU of this process's Ray is free again: an earlier test's run that was killed or
    stopped lets go of its actors' CPUs a moment after its processes end, and a run on a range of workers
    (``--workers 1,2``) starts with as many as are free."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    wait_for(
        lambda: ray.available_resources().get("CPU", 0) >= total, timeout, f"all {total:g} CPUs of Ray free"
    )


def ray_worker_pids(title: str) -> list[int]:
    """PIDs of the Ray worker processes of the Ray instance this process started (``ray.init`` in the test
    session) whose title starts with ``ray::<title>``.

    Only the descendants of that instance's raylet count: other Ray instances on the machine (another test
    session, a benchmark) have workers of the same titles, and killing theirs would break their runs.
    """
    raylets = own_raylet_pids()
    prefix = f"ray::{title}".encode()
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(prefix):
                    pid = int(entry.name)
                    if raylets & set(ancestors(pid)):
                        pids.append(pid)
            except OSError:  # the process ended while we looked
                continue
    return pids


def own_raylet_pids() -> set[int]:
    """The raylets (one per node) that this process's ``ray.init`` started."""
    from ray._private import ray_constants, worker

    node = worker._global_node
    raylets = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []) if node is not None else []
    assert raylets, "this process started no Ray instance: whose workers would be its own is unknown"
    return {info.process.pid for info in raylets}


def ancestors(pid: int) -> list[int]:
    """``pid``'s parent, its parent's parent, and so on up to (not including) PID 1."""
    chain = []
    while True:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rpartition(")")[2].split()[1])  # the fields after the command name: state, ppid
        if pid <= 1:
            return chain
        chain.append(pid)
