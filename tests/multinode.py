"""Fault scenarios on one real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head
without CPUs and two worker nodes of one CPU each, shared by every scenario (each leaves two worker nodes).

Run as ``python -m tests.multinode WORKDIR``: starts the cluster, then runs each scenario named on a line
of stdin, in ``WORKDIR/SCENARIO``, and answers one line, ``OUTCOME`` and a JSON object of what happened
(``error``: the traceback, if the scenario raised); stops the cluster at the end of stdin. A separate
process, because the test session's own Ray instance cannot share a process with a second cluster.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import replace
from typing import Any

import ray
from ray.cluster_utils import Cluster

from batchseg.analysis.results import open_results
from batchseg.demo import SHAPES_MODEL
from batchseg.segment.driver import run_segment
from batchseg.segment.job import SegmentConfig
from batchseg.train.synth import write_dataset
from batchseg.train.trainer import TrainConfig, run_training
from tests.processes import wait_for

OUTCOME = "OUTCOME "

# The shipped small model: a real Mask R-CNN at a tenth of a second a shard of 3; 30 shards, so that a
# fault after two finished shards still lands mid-job.
SMALL_MODEL = {"weights": str(SHAPES_MODEL)}
IMAGES = 90
TRAIN_ITERATIONS = 12


def done_markers(output: pathlib.Path) -> list[str]:
    folder = output / "_done"
    return sorted(p.name for p in folder.glob("*.json")) if folder.exists() else []


def segment_node_loss(cluster: Cluster, workers: list[Any], root: pathlib.Path) -> dict[str, Any]:
    data = write_dataset(str(root / "data"), IMAGES, seed=4, size=96)
    config = SegmentConfig(
        manifest=data.manifest,
        output=str(root / "out"),
        shard_size=3,
        batch_size=1,
        actors=(2, 2),
        cpus_per_actor=1,
        **SMALL_MODEL,
    )
    result: dict[str, Any] = {}
    job = threading.Thread(target=lambda: result.update(run_segment(config)))
    job.start()
    wait_for(lambda: len(done_markers(root / "out")) >= 2, 300, "two finished shards")
    cluster.remove_node(workers.pop(0))
    done_at_loss = len(done_markers(root / "out"))
    job.join(timeout=600)
    workers.append(cluster.add_node(num_cpus=1))  # for the next scenario
    cluster.wait_for_nodes()
    ids = open_results(config.output).to_table().column("image_id").to_pylist()
    return {
        "status": result.get("status"),
        "rows": len(ids),
        "unique": len(set(ids)),
        "manifest_rows": IMAGES,
        "done_at_loss": done_at_loss,
        "shards_total": result.get("shards_total"),
        "retries": result.get("retries"),
    }


def driver_kill(cluster: Cluster, workers: list[Any], root: pathlib.Path) -> dict[str, Any]:
    data = write_dataset(str(root / "data"), IMAGES, seed=5, size=96)
    output = root / "out"
    args = [sys.executable, "-m", "batchseg.cli", "segment", "--manifest", data.manifest, "--output", str(output),
            "--shard-size", "3", "--batch-size", "1", "--actors", "2", "--cpus-per-actor", "1",
            "--address", cluster.address] + [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_MODEL.items()]  # fmt: skip
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(done_markers(output)) >= 2, 300, "two finished shards")
    driver.kill()
    driver.wait()
    before = {n: (output / "_done" / n).read_bytes() for n in done_markers(output)}
    config = SegmentConfig(
        manifest=data.manifest,
        output=str(output),
        shard_size=3,
        batch_size=1,
        actors=(2, 2),
        cpus_per_actor=1,
        **SMALL_MODEL,
    )
    summary = run_segment(config)
    after = {n: (output / "_done" / n).read_bytes() for n in done_markers(output)}
    ids = open_results(config.output).to_table().column("image_id").to_pylist()
    return {
        "status": summary["status"],
        "rows": len(ids),
        "unique": len(set(ids)),
        "manifest_rows": IMAGES,
        "done_before_rerun": len(before),
        "kept": sum(after[n] == b for n, b in before.items()),
        "skipped": summary["shards_skipped"],
        "shards_this_run": summary["shards_this_run"],
        "shards_total": summary["shards_total"],
    }


def train_node_loss(cluster: Cluster, workers: list[Any], root: pathlib.Path) -> dict[str, Any]:
    data = write_dataset(str(root / "data"), 16, seed=1, size=96)
    config = TrainConfig(
        images=data.images,
        annotations=data.annotations,
        output=str(root / "run"),
        workers=2,
        iterations=TRAIN_ITERATIONS,
        checkpoint_every=2,
        batch_size=2,
        max_failures=2,
        # a quick step (the model's own: 64 proposals, 112 to 144 pixels, up to 256): the node is lost
        # after the first checkpoint (step 2) with 10 steps to go
        rois_per_image=16,
        min_sizes=(64,),
        max_size=96,
    )
    snapshot = root / "run" / "checkpoint_manager_snapshot.json"

    def registered() -> int:
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return 0

    result: dict[str, Any] = {}
    trainer = threading.Thread(target=lambda: result.update(run_training(replace(config))))
    trainer.start()
    wait_for(lambda: registered() >= 1, 300, "a registered checkpoint")
    cluster.remove_node(workers.pop(0))
    workers.append(cluster.add_node(num_cpus=1))  # the autoscaler's replacement
    trainer.join(timeout=600)
    return {
        "step": result.get("step"),
        "resumed_from": result.get("resumed_from"),
        "planned": TRAIN_ITERATIONS,
    }


SCENARIOS = {
    "segment-node-loss": segment_node_loss,
    "driver-kill": driver_kill,
    "train-node-loss": train_node_loss,
}


def main() -> None:
    root = pathlib.Path(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        for line in sys.stdin:
            scenario = line.strip()
            start = time.time()
            try:
                outcome = SCENARIOS[scenario](cluster, workers, root / scenario)
            except Exception:
                outcome = {"error": traceback.format_exc()}
            print(OUTCOME + json.dumps(outcome | {"seconds": round(time.time() - start, 1)}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
