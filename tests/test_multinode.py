"""Fault tolerance across nodes: one real multi-node Ray cluster on this machine, shared by the scenarios."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.slow

Scenario = Callable[[str], dict[str, Any]]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """Runs a scenario of ``tests/multinode.py`` on its cluster (one process for the module, started here)
    and returns its outcome."""
    from tests.multinode import OUTCOME  # here, not at collection: it imports Ray Train

    root = tmp_path_factory.mktemp("multinode")
    log = (root / "cluster.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.multinode", str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=pathlib.Path(__file__).resolve().parent.parent,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def run(name: str) -> dict[str, Any]:
        proc.stdin.write(name + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith(OUTCOME):
                outcome: dict[str, Any] = json.loads(line.removeprefix(OUTCOME))
                assert "error" not in outcome, outcome["error"]
                return outcome
        raise AssertionError(f"the cluster's process ended: {(root / 'cluster.log').read_text()[-3000:]}")

    try:
        yield run
    finally:
        proc.stdin.close()  # the end of its scenarios: it stops the cluster
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_a_worker_node_removed_mid_job_loses_and_duplicates_nothing(scenario: Scenario) -> None:
    outcome = scenario("segment-node-loss")
    assert outcome["done_at_loss"] < outcome["shards_total"], "the node must go away mid-job"
    assert outcome["status"] == "complete"
    assert outcome["rows"] == outcome["unique"] == outcome["manifest_rows"]
    assert outcome["retries"] >= 1


def test_a_killed_driver_is_resumed_redoing_at_most_the_shards_in_flight(scenario: Scenario) -> None:
    outcome = scenario("driver-kill")
    assert outcome["status"] == "complete"
    assert outcome["rows"] == outcome["unique"] == outcome["manifest_rows"]
    assert outcome["kept"] == outcome["done_before_rerun"] >= 2  # finished shards were not redone
    # The rerun does exactly the shards it found without a record: an actor of the dead driver may still
    # finish writing a shard (its model done, its write under way) in the moments before Ray ends it, so
    # the rerun may find a record or two more than were there when the driver died.
    assert outcome["done_before_rerun"] <= outcome["skipped"] <= outcome["done_before_rerun"] + 4
    assert outcome["shards_this_run"] == outcome["shards_total"] - outcome["skipped"]


def test_a_node_lost_during_training_is_restored_from_the_last_checkpoint(scenario: Scenario) -> None:
    outcome = scenario("train-node-loss")
    assert outcome["step"] == outcome["planned"]  # the run went on to its planned end
    assert outcome["resumed_from"] >= 2
