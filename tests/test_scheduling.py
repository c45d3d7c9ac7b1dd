"""The driver's bookkeeping without a cluster: work queue and retries, worker pool, scaling, progress."""

from __future__ import annotations

from typing import Any

from batchseg.format.output import ShardRecord
from batchseg.io.manifest import Plan, Shard
from batchseg.segment.scheduling import (
    QUEUE_PER_ACTOR,
    Progress,
    ScalingPolicy,
    Scheduler,
    WorkerPool,
    WorkQueue,
    duration,
)
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


def run_simulated(cluster: SimulatedCluster, count: int, actors: tuple[int, int], attempts: int = 3) -> Any:
    scheduler = Scheduler(
        cluster,
        iter(shards(count)),
        max_attempts=attempts,
        scaling=ScalingPolicy(*actors),
        total_images=count,
        clock=cluster.clock,
    )
    return scheduler, scheduler.run()


def test_scheduler_runs_every_shard_once_and_kills_its_actors() -> None:
    cluster = SimulatedCluster()
    scheduler, run = run_simulated(cluster, 500, (4, 4))
    assert sorted(cluster.done) == list(range(500))
    assert run == {"shards_failed": [], "images_this_run": 500, "shards_this_run": 500, "retries": 0}
    assert cluster.started == 4 and cluster.killed == 4 and not cluster.alive and len(scheduler.pool) == 0


def test_scheduler_scales_up_to_max_while_work_waits() -> None:
    cluster = SimulatedCluster()
    run_simulated(cluster, 400, (1, 16))
    assert cluster.started == 16 and sorted(cluster.done) == list(range(400))


def test_scheduler_retries_failed_shards_and_replaces_dead_actors_exactly_once() -> None:
    """Every 7th attempt raises, every 11th kills its actor: each shard is done once, its queued neighbours
    move to other actors without losing an attempt, and the counts add up."""
    cluster = SimulatedCluster(fail_every=7, die_every=11)
    _, run = run_simulated(cluster, 300, (3, 3), attempts=5)
    assert sorted(cluster.done) == list(range(300)), "every shard exactly once"
    assert run["shards_failed"] == [] and run["shards_this_run"] == 300
    assert cluster.failed > 20 and cluster.died > 20
    assert run["retries"] == cluster.failed + cluster.died, "only the attempts that ran count"
    assert cluster.started == 3 + cluster.died and not cluster.alive


def test_scheduler_gives_up_a_shard_after_max_attempts() -> None:
    cluster = SimulatedCluster(fail_every=1)
    _, run = run_simulated(cluster, 3, (1, 1), attempts=2)
    assert sorted(f["shard"] for f in run["shards_failed"]) == [0, 1, 2] and cluster.done == []
    assert run["retries"] == 6 and cluster.attempts == 6


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
    assert duration(3 * 3600 + 61) == "3h01m01s"


def test_rows_in_done_shards_counts_a_short_last_shard() -> None:
    plan = Plan("m.csv", num_rows=2500, shard_size=1000)
    assert plan.rows_in(frozenset({0, 2})) == 1500 and plan.rows_in(frozenset()) == 0
