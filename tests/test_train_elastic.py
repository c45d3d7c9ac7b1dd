"""Elastic training on real Ray Train: a run on ``--workers 1,2`` loses a worker mid-way and stops; the same
command resumed on one worker goes on with the step count, the images seen and the learning-rate schedule
where they were, and ends after the images the run planned. The plan is ``sampling.Progress`` and
``engine.lr_factor`` (their unit tests in test_train_data.py show that it trains each position of each epoch
once, on any sequence of worker counts); this shows that the workers follow it."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from batchseg.errors import BatchsegError
from batchseg.train.config import ADAMW_LR, TrainConfig
from batchseg.train.engine import lr_factor
from batchseg.train.sampling import Progress
from batchseg.train.synth import write_dataset
from batchseg.train.trainer import CHECKPOINT_PREFIX, run_training
from tests.processes import all_cpus_free, ray_worker_pids, wait_for

EXAMPLES, BATCH, ITERATIONS, EVERY, WARMUP = 16, 2, 12, 3, 2
PLANNED = 2  # --workers 1,2: --iterations counts steps of 2 workers
TOTAL = ITERATIONS * BATCH * PLANNED  # 48 images, 3 epochs
CHEAP = {"rois_per_image": 16, "min_sizes": (64,), "max_size": 96}


@dataclass(frozen=True)
class Resumed:
    config: TrainConfig
    error: BaseException | None  # what the killed run raised
    stopped: dict[str, Any]  # the metrics of the last checkpoint registered before the resume
    metrics: dict[str, Any]  # what the resumed run returned
    registered: list[dict[str, Any]]  # the metrics of the checkpoints registered at the end, oldest first
    folders: list[str]  # the run folder's checkpoint folders at the end
    last: dict[str, Any]  # the newest checkpoint


def registered(run: pathlib.Path) -> list[dict[str, Any]]:
    """Each checkpoint Ray Train has registered (its snapshot), oldest first: its folder and metrics."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        return [r["metrics"] | {"folder": r["checkpoint_dir_name"]} for r in snapshot["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


@pytest.fixture(scope="module")
def resumed(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    root = tmp_path_factory.mktemp("elastic")
    data = write_dataset(str(root / "data"), EXAMPLES, seed=2, size=64)
    run = root / "run"
    config = TrainConfig(
        images=data.images,
        annotations=data.annotations,
        output=str(run),
        workers=(1, PLANNED),
        iterations=ITERATIONS,
        checkpoint_every=EVERY,
        warmup_iterations=WARMUP,
        batch_size=BATCH,
        max_failures=0,  # the lost worker ends the run: it is resumed below on one worker
        **CHEAP,
    )
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            outcome.update(run_training(config))
        except BaseException as e:  # looked at in the tests
            outcome["error"] = e

    all_cpus_free()  # the run starts with 2 workers, the most of its range, only if both CPUs are free
    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        wait_for(
            lambda: registered(run) and ray_worker_pids("RayTrainWorker"), 180, "a registered checkpoint"
        )
        os.kill(ray_worker_pids("RayTrainWorker")[0], signal.SIGKILL)
    finally:
        trainer.join(timeout=200)
    assert not trainer.is_alive(), "the killed run did not end in 200 s"
    stopped = registered(run)[-1]
    metrics = run_training(replace(config, workers=1))
    checkpoints = registered(run)
    folders = sorted(p.name for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    last = torch.load(run / checkpoints[-1]["folder"] / "model.pt", weights_only=True)
    return Resumed(config, outcome.get("error"), stopped, metrics, checkpoints, folders, last)


def lr_at(images: int) -> float:
    return ADAMW_LR * lr_factor(images, TOTAL, WARMUP * BATCH * PLANNED, "cosine")


@pytest.mark.slow
def test_a_run_that_lost_a_worker_stopped_mid_way_at_a_checkpoint_of_two_workers(resumed: Resumed) -> None:
    assert isinstance(resumed.error, BatchsegError), resumed.error  # max_failures 0: no restart
    stopped = resumed.stopped
    assert stopped["workers"] == PLANNED  # the range's most: the 2 CPUs of the test's Ray
    assert EVERY <= stopped["step"] < ITERATIONS and stopped["step"] % EVERY == 0
    assert stopped["images_seen"] == stopped["step"] * BATCH * PLANNED
    assert stopped["lr"] == pytest.approx(lr_at(stopped["images_seen"]))


@pytest.mark.slow
def test_resumed_on_one_worker_the_steps_images_and_schedule_go_on_to_the_planned_end(
    resumed: Resumed,
) -> None:
    k = resumed.stopped["step"]
    one_worker = ITERATIONS * 2 - k  # the images left, 2 a step
    assert (resumed.metrics["resumed_from"], resumed.metrics["step"]) == (k, one_worker)
    assert (resumed.metrics["images_seen"], resumed.metrics["workers"]) == (TOTAL, 1)
    after = [c for c in resumed.registered if c["resumed_from"] == k]
    assert [c["step"] for c in after] == [one_worker - EVERY, one_worker]  # the 2 newest kept
    # the plan: k steps of 2 workers, then one worker's; each checkpoint's images and rate on it
    for checkpoint in after:
        planned = Progress.after_steps(EXAMPLES, k, PLANNED, BATCH)
        while planned.step < checkpoint["step"]:
            planned = planned.advance(
                min(planned.steps(1, BATCH), checkpoint["step"] - planned.step), 1, BATCH
            )
        assert checkpoint["images_seen"] == planned.images_seen == 4 * k + 2 * (checkpoint["step"] - k)
        assert checkpoint["epoch"] == planned.epoch
        assert checkpoint["lr"] == pytest.approx(lr_at(checkpoint["images_seen"]), abs=1e-12)
    assert resumed.registered[-1]["lr"] == pytest.approx(0, abs=1e-12)  # cosine to zero at the planned end


@pytest.mark.slow
def test_the_last_checkpoint_records_the_whole_run_and_no_unregistered_folder_is_left(
    resumed: Resumed,
) -> None:
    last = resumed.last
    assert last["progress"] == {
        "step": resumed.metrics["step"],
        "epoch": TOTAL // EXAMPLES,
        "remaining": [[0, EXAMPLES]],
        "images_seen": TOTAL,
    }
    assert last["planned_workers"] == PLANNED and last["scheduler"]["last_epoch"] == resumed.metrics["step"]
    # batchseg's checkpoint folders are the registered ones: none a lost worker left behind is kept
    assert resumed.folders == sorted(c["folder"] for c in resumed.registered)
    assert all(name.startswith(CHECKPOINT_PREFIX) for name in resumed.folders)
