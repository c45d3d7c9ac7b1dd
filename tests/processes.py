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


def ray_worker_pids(title: str) -> list[int]:
    """PIDs of this machine's Ray worker processes whose title starts with ``ray::<title>`` (only this
    test session runs Ray here, so they are the test's own)."""
    prefix = f"ray::{title}".encode()
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(prefix):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids
