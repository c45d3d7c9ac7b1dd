"""Fault tolerance across nodes: a real multi-node Ray cluster on this machine, one per scenario."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def scenario(name: str, root: pathlib.Path) -> dict[str, Any]:
    """Run ``tests/multinode.py`` in its own process (its own cluster), bounded in time."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.multinode", name, str(root)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=pathlib.Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_worker_node_removed_mid_job_loses_and_duplicates_nothing(tmp_path: pathlib.Path) -> None:
    outcome = scenario("segment-node-loss", tmp_path)
    assert outcome["done_at_loss"] < 10, "the node must go away mid-job"
    assert outcome["status"] == "complete"
    assert outcome["rows"] == outcome["unique"] == outcome["manifest_rows"]
    assert outcome["retries"] >= 1


def test_a_killed_driver_is_resumed_redoing_at_most_the_shards_in_flight(tmp_path: pathlib.Path) -> None:
    outcome = scenario("driver-kill", tmp_path)
    assert outcome["status"] == "complete"
    assert outcome["rows"] == outcome["unique"] == outcome["manifest_rows"]
    assert outcome["kept"] == outcome["done_before_rerun"] >= 2  # finished shards were not redone
    # 2 actors with 2 shards queued each: at most 4 shards were in flight when the driver died.
    assert outcome["shards_this_run"] == outcome["shards_total"] - outcome["done_before_rerun"]


def test_a_node_lost_during_training_is_restored_from_the_last_checkpoint(tmp_path: pathlib.Path) -> None:
    outcome = scenario("train-node-loss", tmp_path)
    assert outcome["step"] == 30
    assert outcome["resumed_from"] >= 2
