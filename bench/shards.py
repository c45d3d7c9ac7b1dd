"""Shards back to back behind storage latency: a whole ``segment`` job's rate with and without added delay.

Starts SeaweedFS on 127.0.0.1 (as the tests do), writes small shape images and their manifest to it,
then runs the job (local Ray, one actor, the shipped small model, images read and shards written on S3)
behind a TCP proxy that holds every request back by each added delay (``tests/latency.py``; 0 ms is the
same proxy without delay: the direct rate). Start-up (Ray's actor, the model load) is left out: the rate
is counted from the moment the actor is up to the last shard's record, and, steadier still, over the
records after the first (images of shards 2..n over the time from the first record to the last), which
shows the gap between shards: reads that begin only when a shard begins, and writes (two PUTs) before
the next one.
Usage: python bench/shards.py [--images 2000] [--shard-size 100] [--delays 0,100] [--repeats 1]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import ray

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: the S3 server and proxy

from batchseg import log
from batchseg.demo import SHAPES_MODEL
from batchseg.segment.config import SegmentConfig
from batchseg.segment.driver import Driver, init_ray
from batchseg.segment.job import prepare_job
from batchseg.train.synth import write_dataset
from tests.latency import LatencyProxy
from tests.s3server import running_s3


class TimedDriver(Driver):
    """The job's driver, noting when its actor is up and when each shard's record comes back."""

    def start_actor(self) -> tuple[Any, Any]:
        actor, ready = super().start_actor()
        ray.get(ready)
        self.up = time.perf_counter()
        self.records: list[tuple[float, int, float]] = []
        return actor, ready

    def result(self, ref: Any) -> Any:
        record = super().result(ref)
        if hasattr(record, "rows"):
            self.records.append((time.perf_counter(), record.rows, record.seconds))
        return record


def run_job(config: SegmentConfig) -> tuple[float, float, float]:
    """Images per second from the actor up to the last record, and over the records after the first; and
    the share of that time the model had a shard (the records' own seconds: the model's turn at each
    shard; before the shards overlapped, a shard's seconds also held the wait for its first reads)."""
    with prepare_job(config) as job:
        driver = TimedDriver(job)
        run = driver.run()
    assert not run["shards_failed"], run["shards_failed"]
    (first, first_rows, _), (last, _, _) = driver.records[0], driver.records[-1]
    total = sum(rows for _, rows, _ in driver.records)
    busy = sum(seconds for _, _, seconds in driver.records[1:]) / (last - first)
    return total / (last - driver.up), (total - first_rows) / (last - first), busy


def main() -> None:
    log.to_stderr()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--size", type=int, default=96, help="generated image side")
    parser.add_argument("--delays", default="0,100", help="added delay per request, in ms (0: direct)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per delay, interleaved")
    args = parser.parse_args()
    delays = [int(d) for d in args.delays.split(",")]
    init_ray(None)
    with tempfile.TemporaryDirectory() as tmp, running_s3(pathlib.Path(tmp), ("images", "out")) as server:
        data = write_dataset("s3://images/shapes", args.images, seed=0, size=args.size,
                             storage_options=server.options())  # fmt: skip
        print(f"{args.images} shape images of {args.size} px in SeaweedFS, shards of {args.shard_size}")
        rates: dict[int, list[tuple[float, float, float]]] = {d: [] for d in delays}
        for repeat in range(args.repeats):
            for delay in delays:
                with LatencyProxy(server.ports[3], delay / 1000) as proxy:
                    config = SegmentConfig(
                        manifest=data.manifest,
                        output=f"s3://out/run-{delay}-{repeat}",
                        weights=str(SHAPES_MODEL),
                        min_size=128,
                        max_size=192,
                        shard_size=args.shard_size,
                        storage_options=server.options() | {"endpoint_url": proxy.endpoint},
                    )
                    whole, steady, busy = run_job(config)
                rates[delay].append((whole, steady, busy))
                print(
                    f"added {delay:3d} ms per request: {whole:6.1f} img/s from the actor up, "
                    f"{steady:6.1f} img/s after the first shard, the model busy {busy:.2f} of that time",
                    flush=True,
                )
    direct = delays[0]
    for delay in delays[1:]:
        for i, what in enumerate(("from the actor up", "after the first shard")):
            rate, base = (statistics.median(r[i] for r in rates[d]) for d in (delay, direct))
            ratio = rate / base
            print(f"{delay} ms against {direct} ms, {what} (medians): {ratio:.2f} of the direct rate")


if __name__ == "__main__":
    main()
