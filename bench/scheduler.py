"""The driver's scheduling at a thousand actors: CPU time per shard of the real ``Scheduler`` loop.

A simulated cluster (``tests/simcluster.py``: actors on a virtual clock, no Ray, no sleeping) stands in for
Ray; everything the driver decides per shard is the real code: the work queue, the worker pool, the
scaling policy, the progress line. Prints the driver's CPU per shard beside the goal (under 1 ms), with
the simulation's own share measured apart, and what failed on the way. Every ready result is handled per
wait, as the Ray driver's wait returns them all: with ``--fail-every``/``--die-every``/``--bad-places`` the
retries go to other actors and the failing ones are replaced.
Usage: python bench/scheduler.py [--actors 1000] [--shards 100000] [--fail-every 0] [--die-every 0]
       [--bad-places 0]
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: the simulated cluster

from batchseg.io.manifest import Shard
from batchseg.segment.scheduling import ScalingPolicy, Scheduler
from tests.simcluster import SimulatedCluster

GOAL_MS = 1.0


class Count(logging.Handler):
    """Counts the lines it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


class Timed:
    """The cluster with the CPU time spent inside it counted apart."""

    def __init__(self, cluster: SimulatedCluster) -> None:
        self.cluster = cluster
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.cluster, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - start

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--fail-every", type=int, default=0, help="one attempt in N raises (0: never)")
    parser.add_argument(
        "--die-every", type=int, default=0, help="one attempt in N kills its actor (0: never)"
    )
    parser.add_argument(
        "--bad-places",
        type=int,
        default=0,
        help="places with a bad GPU: their actors fail every shard at once",
    )
    args = parser.parse_args()
    cluster = SimulatedCluster(
        start_seconds=30,
        shard_seconds=60,
        fail_every=args.fail_every,
        die_every=args.die_every,
        bad_places=args.bad_places,
    )
    timed = Timed(cluster)
    shards = (
        Shard(i, [f"{i}-{j}" for j in range(3)], [f"s3://b/{i}-{j}.jpg" for j in range(3)])
        for i in range(args.shards)
    )
    scheduler = Scheduler(
        timed,  # type: ignore[arg-type]
        shards,
        max_attempts=5,
        scaling=ScalingPolicy(args.actors, args.actors),
        total_images=args.shards * 3,
        start_timeout=600,
        clock=cluster.clock,
    )
    progress = logging.getLogger("batchseg.segment.scheduling")
    lines = Count()
    progress.addHandler(lines)
    progress.setLevel(logging.INFO)
    progress.propagate = False  # counted, not printed
    try:
        start = time.process_time()
        run = scheduler.run()
        cpu = time.process_time() - start
    finally:
        progress.removeHandler(lines)
        progress.propagate = True
    assert sorted(cluster.done) == list(range(args.shards)), "every shard exactly once"
    driver = (cpu - timed.seconds) / args.shards * 1000
    print(
        f"{args.shards:,} shards on {args.actors:,} simulated actors: {cluster.now / 3600:.1f} h of virtual "
        f"time, {cluster.waits:,} waits"
    )
    print(
        f"{run['retries']} retries: {run['shard_failures']} shard failures, {run['actors_lost']} actors lost; "
        f"{run['actors_replaced']} actors replaced, {cluster.started} started; "
        f"{len(run['shards_failed'])} shards given up"
    )
    print(f"scheduler CPU per shard: {driver:.3f} ms (goal: under {GOAL_MS} ms)")
    print(f"simulation's own CPU per shard (not the driver's): {timed.seconds / args.shards * 1000:.3f} ms")
    print(f"{lines.count} progress lines")


if __name__ == "__main__":
    main()
