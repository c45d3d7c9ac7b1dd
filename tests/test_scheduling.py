"""The driver's bookkeeping without a cluster (work queue and retries, worker pool, scaling, progress, the
scheduler on a simulated cluster), then the Ray driver's own answers on the tests' local Ray: every ready
ref per wait, the one line when no actor can be placed, the one line when the cluster has no GPU."""

from __future__ import annotations

import pathlib
import time
from typing import Any

import pytest

from batchseg.errors import BatchsegError
from batchseg.format.output import ShardRecord
from batchseg.io.manifest import Plan, Shard
from batchseg.segment.config import SegmentConfig
from batchseg.segment.scheduling import (
    QUEUE_PER_ACTOR,
    Progress,
    ScalingPolicy,
    Scheduler,
    WorkerPool,
    WorkQueue,
    duration,
    empty_run,
)
from tests.processes import wait_for
from tests.simcluster import SimulatedCluster


def shards(count: int) -> list[Shard]:
    return [Shard(i, [str(i)], [f"/images/{i}.jpg"]) for i in range(count)]


def test_work_queue_hands_out_retries_first_then_gives_up_after_max_attempts() -> None:
    a, b, c = shards(3)
    queue = WorkQueue(iter([a, b, c]), max_attempts=2)
    assert queue and queue.next() == (a, 1)
    assert queue.failed((a, 1), "boom") is True  # attempt 2 comes next, before the manifest's shards
    assert queue.next() == (a, 2)
    assert queue.next() == (b, 1)
    assert queue.failed((a, 2), "boom again") is False
    assert queue.given_up == [{"shard": 0, "error": "boom again"}] and queue.retries == 2
    queue.put_back((b, 1))  # its actor died before starting it: the attempt does not count
    assert queue.next() == (b, 1) and queue.retries == 2
    assert queue.next() == (c, 1)
    assert not queue and queue.next() is None


def test_work_queue_reads_the_manifest_one_shard_ahead_only() -> None:
    taken: list[int] = []

    def stream():  # type: ignore[no-untyped-def]
        for shard in shards(1000):
            taken.append(shard.index)
            yield shard

    queue = WorkQueue(stream(), max_attempts=3)
    assert taken == [0]
    queue.next()
    assert taken == [0, 1]


def test_worker_pool_tracks_what_each_actor_holds() -> None:
    pool = WorkerPool()
    first = pool.add("actor-1", "ready-1")
    second = pool.add("actor-2", "ready-2")
    assert pool.starting() == 2 and pool.pending() == {"ready-1": first, "ready-2": second}
    assert pool.room(first) == 0, "an actor that is not up gets no work"
    pool.mark_up(first)
    assert pool.room(first) == QUEUE_PER_ACTOR and pool.starting() == 1 and not pool.busy()
    a, b = shards(2)
    pool.queue(first, "ref-a", (a, 1))
    pool.queue(first, "ref-b", (b, 1))
    assert pool.room(first) == 0 and pool.busy()
    assert pool.pending() == {"ready-2": second, "ref-a": first, "ref-b": first}
    assert pool.finished(first, "ref-b") == (b, 1)
    assert first.queue == [("ref-a", (a, 1))]
    assert pool.remove(first) == [(a, 1)] and len(pool) == 1 and not pool.busy()
    assert pool.pending() == {"ready-2": second}
    assert pool.remove(second) == [] and pool.pending() == {} and pool.starting() == 0


def run_simulated(
    cluster: SimulatedCluster,
    count: int,
    actors: tuple[int, int],
    attempts: int = 3,
    start_timeout: float = 600,
) -> Any:
    scheduler = Scheduler(
        cluster,
        iter(shards(count)),
        max_attempts=attempts,
        scaling=ScalingPolicy(*actors),
        total_images=count,
        start_timeout=start_timeout,
        clock=cluster.clock,
    )
    return scheduler, scheduler.run()


def test_scheduler_runs_every_shard_once_and_kills_its_actors() -> None:
    cluster = SimulatedCluster()
    scheduler, run = run_simulated(cluster, 500, (4, 4))
    assert sorted(cluster.done) == list(range(500))
    assert run == empty_run() | {"images_this_run": 500, "shards_this_run": 500}
    assert empty_run() == {
        "shards_failed": [],
        "images_this_run": 0,
        "shards_this_run": 0,
        "retries": 0,
        "shard_failures": 0,
        "actors_lost": 0,
        "actors_replaced": 0,
    }
    assert cluster.started == 4 and cluster.killed == 4 and not cluster.alive and len(scheduler.pool) == 0


def test_scheduler_scales_up_to_max_while_work_waits() -> None:
    cluster = SimulatedCluster()
    run_simulated(cluster, 400, (1, 16))
    assert cluster.started == 16 and sorted(cluster.done) == list(range(400))


def test_scheduler_retries_failed_shards_and_replaces_dead_actors_exactly_once() -> None:
    """One attempt in 7 raises, one in 11 kills its actor: each shard is done once, its queued neighbours
    move to other actors without losing an attempt, and the counts add up."""
    cluster = SimulatedCluster(fail_every=7, die_every=11)
    _, run = run_simulated(cluster, 300, (3, 3), attempts=5)
    assert sorted(cluster.done) == list(range(300)), "every shard exactly once"
    assert run["shards_failed"] == [] and run["shards_this_run"] == 300
    assert cluster.failed > 20 and cluster.died > 20
    assert run["retries"] == cluster.failed + cluster.died, "only the attempts that ran count"
    assert (run["shard_failures"], run["actors_lost"]) == (cluster.failed, cluster.died)
    assert cluster.started == 3 + cluster.died and not cluster.alive


def test_scheduler_gives_up_a_shard_after_max_attempts() -> None:
    cluster = SimulatedCluster(fail_every=1)
    _, run = run_simulated(cluster, 3, (1, 1), attempts=2)
    assert sorted(f["shard"] for f in run["shards_failed"]) == [0, 1, 2] and cluster.done == []
    assert run["retries"] == 6 and cluster.failed == 6, "every attempt that ran failed"


def test_work_queue_hands_a_failed_shard_to_another_actor_unless_every_actor_up_failed_it() -> None:
    a, b, c, d = shards(4)
    queue = WorkQueue(iter([a, b, c, d]), max_attempts=3)
    up = {"x": None, "y": None}
    assert queue.next("x", up) == (a, 1)
    queue.failed((a, 1), "CUDA error", "x")
    assert queue.next("x", up) == (b, 1), "x failed shard 0: it takes the manifest's next shard"
    assert queue.next("y", up) == (a, 2), "another actor takes the retry first"
    queue.failed((a, 2), "CUDA error", "y")
    assert queue.next("x", up) == (a, 3), "every actor up failed it: one of them tries again"
    queue.failed((b, 1), "CUDA error", "x")
    assert queue.next("x", {"x": None}) == (b, 2), "no other actor is up: the one that failed it retries"
    queue.done((b, 2))
    assert queue.failed_by == {0: ["x", "y"]}, "who failed a shard is forgotten once it is done"
    assert queue.failed((a, 3), "CUDA error", "x") is False and queue.failed_by == {}, "or given up"


def test_an_actor_that_fails_every_shard_costs_no_shard() -> None:
    """The issue's cluster: 8 actors, one on a GPU that raises at once on every shard, as does each fresh
    actor that takes its place there. Failing fast, it takes work first: it cost 191 of 400 shards when a
    failed shard went straight back to it. Now each shard it fails goes to another actor, and it is
    replaced after failing 2 in a row."""
    cluster = SimulatedCluster(bad_places=1)
    _, run = run_simulated(cluster, 400, (8, 8))
    assert run["shards_failed"] == [] and sorted(cluster.done) == list(range(400)), "every shard exactly once"
    assert run["shard_failures"] == run["retries"] == cluster.failed > 0 and run["actors_lost"] == 0
    assert run["actors_replaced"] > 10, "the bad place's actors are replaced again and again"
    assert run["shard_failures"] - 2 * run["actors_replaced"] in (0, 1), (
        "replaced on its 2nd failure in a row"
    )
    assert cluster.started - 8 in (run["actors_replaced"], run["actors_replaced"] - 1), (
        "a fresh one each time"
    )
    for (shard, attempt), actor in cluster.ran_on.items():
        if attempt > 1:
            assert actor != cluster.ran_on[shard, attempt - 1], "a failed shard goes to another actor"


def test_a_success_resets_an_actors_failures_in_a_row() -> None:
    cluster = SimulatedCluster(fail_every=2)  # odd shards fail their first attempt; each second one is fine
    _, run = run_simulated(cluster, 20, (1, 1))
    assert sorted(cluster.done) == list(range(20)) and run["shard_failures"] == 10
    assert run["actors_replaced"] == 0 and cluster.started == 1, "it never failed twice in a row"


def test_the_job_ends_with_one_line_when_no_actor_can_be_placed() -> None:
    cluster = SimulatedCluster(capacity=0)
    with pytest.raises(BatchsegError) as ended:
        run_simulated(cluster, 10, (2, 2), start_timeout=60)
    assert (
        str(ended.value)
        == "no actor could start in 60 s: each needs 1 place; the cluster has 0 in all, 0 free"
    )
    assert 60 <= cluster.now <= 62, "at the time limit, not later"
    assert cluster.killed == 2 and not cluster.alive


def test_with_fewer_actors_placed_than_asked_the_job_goes_on_and_says_so_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster = SimulatedCluster(capacity=3)
    _, run = run_simulated(cluster, 200, (8, 8), start_timeout=60)
    assert sorted(cluster.done) == list(range(200)) and run["shards_failed"] == []
    said = [line for line in capsys.readouterr().err.splitlines() if "could not start" in line]
    assert said == [
        "batchseg: warning: 5 of 8 actors could not start in 60 s: going on with 3; the others join when the "
        "cluster has room (each needs 1 place; the cluster has 3 in all, 0 free)"
    ]
    assert cluster.started == cluster.killed == 8 and not cluster.alive


def test_every_ready_result_is_handled_per_wait() -> None:
    cluster = SimulatedCluster(jitter=0)  # the 4 actors finish their shards at the same moments
    _, run = run_simulated(cluster, 80, (4, 4))
    assert sorted(cluster.done) == list(range(80)) and run["shards_this_run"] == 80
    assert cluster.waits <= 80 / 4 + 2, "one wait for each moment results are ready, not one per result"


def test_scaling_doubles_while_work_waits_up_to_max() -> None:
    policy = ScalingPolicy(1, 6)
    assert policy.to_start(running=1, starting=1, work_waiting=True) == 0, "wait for starting actors"
    assert policy.to_start(running=1, starting=0, work_waiting=False) == 0, "no work waits: stay small"
    started = [policy.to_start(running=n, starting=0, work_waiting=True) for n in (1, 2, 4, 6)]
    assert started == [1, 2, 2, 0]
    assert ScalingPolicy(3, 3).to_start(running=0, starting=0, work_waiting=True) == 1
    assert not policy.gives_up(17) and policy.gives_up(18)


def test_progress_line_counts_rate_and_eta() -> None:
    now = [100.0]
    progress = Progress(5000, clock=lambda: now[0], every=5.0)
    assert not progress.due()
    progress.shard_done(
        ShardRecord(rows=100, ok=98, errors={"not_found": 2}, instances=0, seconds=9.0, attempt=1, shard=0)
    )
    now[0] += 40.0
    assert progress.due()
    assert progress.line(partial=20) == "120/5000 images (2.4%) | 3.00 img/s | 2 errors | ETA 27m06s"
    assert not progress.due(), "a line resets the interval"
    assert (progress.images, progress.shards, progress.errors) == (100, 1, 2)
    assert Progress(10, clock=lambda: 0.0).line() == "0/10 images (0.0%) | 0.00 img/s | 0 errors | ETA ?"
    # A tiled image in progress counts by its share of tiles done.
    assert Progress(2, clock=lambda: 0.0).line(partial=0.43).startswith("0.4/2 images (20.0%)")
    progress.shard_failures, progress.actors_replaced = 3, 1
    assert (
        progress.line()
        == "100/5000 images (2.0%) | 2.50 img/s | 2 errors | 3 shard failures, 1 actor replaced | ETA 32m40s"
    )
    progress.shard_failures, progress.actors_lost = 1, 2
    assert "| 2 errors | 1 shard failure, 2 actors lost, 1 actor replaced | ETA" in progress.line()
    assert duration(3 * 3600 + 61) == "3h01m01s"


def test_rows_in_done_shards_counts_a_short_last_shard() -> None:
    plan = Plan("m.csv", num_rows=2500, shard_size=1000)
    assert plan.rows_in(frozenset({0, 2})) == 1500 and plan.rows_in(frozenset()) == 0


def test_the_drivers_wait_returns_every_ready_ref(ray_address: str) -> None:
    import ray

    from batchseg.segment.driver import Driver

    refs = [ray.put(i) for i in range(5)]
    started = time.time()
    assert sorted(ray.get(Driver.wait(refs, timeout=10))) == [0, 1, 2, 3, 4]
    assert time.time() - started < 5, "returns once refs are ready, not at the timeout"


def one_image_manifest(tmp_path: pathlib.Path) -> str:
    (tmp_path / "manifest.csv").write_text("uri\n/images/a.jpg\n")  # never read: no actor starts
    return str(tmp_path / "manifest.csv")


def test_an_actor_that_cannot_be_placed_ends_the_job_with_one_line(
    ray_address: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An actor asking for a GPU on this GPU-less Ray waited forever (a 'waiting for an actor' line every 5 s)."""
    import ray

    from batchseg.cli import main

    started = time.time()
    code = main(
        ["segment", "--manifest", one_image_manifest(tmp_path), "--output", str(tmp_path / "out"),
         "--weights", "none", "--gpus-per-actor", "1", "--actor-start-timeout", "2", "--address", ray_address]
    )  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and time.time() - started < 30
    assert err[-1] == (
        "batchseg: error: no actor could start in 2 s: each needs 1 GPU and 2 CPU; the cluster has 0 GPU and "
        "2 CPU in all, 0 GPU and 2 CPU free"
    )
    assert sum(line.startswith("batchseg: error") for line in err) == 1
    cpus = ray.cluster_resources()["CPU"]
    wait_for(lambda: ray.available_resources().get("CPU") == cpus, 30, "the unplaced actor to be gone")


@pytest.mark.parametrize(
    ("joined", "gpus", "said"), [(True, None, True), (False, None, False), (True, 1.0, False)]
)
def test_no_gpu_in_a_cluster_the_job_joined_is_said_in_one_line(
    ray_address: str,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    joined: bool,
    gpus: float | None,
    said: bool,
) -> None:
    """A cluster that scales GPU nodes from zero has none when the job starts: its actors would run on the
    CPU. Said where the job joined a cluster by address (which may have an autoscaler), not on a laptop's
    own Ray, nor when --gpus-per-actor is given."""
    from batchseg.segment.driver import Driver
    from batchseg.segment.job import prepare_job

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = SegmentConfig(
        manifest=one_image_manifest(tmp_path),
        output=str(tmp_path / "out"),
        weights="none",
        address=ray_address if joined else None,
        gpus_per_actor=gpus,
    )
    with prepare_job(config) as job:
        driver = Driver(job)
    line = (
        "batchseg: no GPU in the cluster now: actors run on the CPU; pass --gpus-per-actor 1 to wait for GPU "
        "nodes an autoscaler adds"
    )
    assert capsys.readouterr().err.splitlines().count(line) == int(said)
    assert driver.device == ("cuda" if gpus else "cpu")


def test_each_kind_of_shard_failure_is_said_in_full_once(caplog: pytest.LogCaptureFixture) -> None:
    """Expired credentials or an outage fail every shard alike: one line of each kind, then the count."""
    cluster = SimulatedCluster(fail_every=3)
    with caplog.at_level("DEBUG", logger="batchseg"):
        _, run = run_simulated(cluster, 60, (2, 2))
    said = [r for r in caplog.records if "failed on attempt" in r.getMessage()]
    assert run["shard_failures"] >= 10
    assert [r.levelname for r in said].count("INFO") == 1
    assert len(said) == run["shard_failures"]  # the others at debug level, for --verbose
    assert "ValueError: simulated" in said[0].getMessage()
