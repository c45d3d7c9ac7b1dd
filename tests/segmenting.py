"""Segment outputs made without Ray, for tests that need an output (or rows) but do not test the job."""

from __future__ import annotations

import time
from typing import Any

import pytest

from batchseg.io.manifest import iter_shards
from batchseg.segment.job import SegmentConfig, finish, prepare_job
from batchseg.segment.processor import ShardProcessor
from batchseg.segment.scheduling import empty_run


def segment_in_process(config: SegmentConfig) -> dict[str, Any]:
    """What ``run_segment(config)`` writes (its shards, their records, ``summary.json``), and its summary,
    made in this process by the processor each of the job's actors holds: the same files and rows (a job's
    rows are the processor's, as ``tests/test_segment.py`` checks) without starting an actor, whose torch
    import and model load cost seconds."""
    started = time.time()
    with prepare_job(config) as job:  # holding the output's lease, as run_segment does
        processor = ShardProcessor.for_job(job)
        shards = list(iter_shards(job.plan, job.done, config.io_options))
        for shard in shards:
            processor.process(shard)
        images = sum(len(shard) for shard in shards)
        run = empty_run() | {"images_this_run": images, "shards_this_run": len(shards)}
        return finish(job, run, started)


def assert_same_rows(rows: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Equal rows, but scores and boxes to 1e-4: a model run with another number of torch threads (a
    Ray Data actor of 1 CPU, the segment actor of 2, the test's process of one per core) sums in another
    order. Masks must be identical."""
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        assert {k: v for k, v in row.items() if k != "instances"} == {
            k: v for k, v in want.items() if k != "instances"
        }
        for got, wanted in zip(row["instances"] or [], want["instances"] or [], strict=True):
            assert {k: v for k, v in got.items() if k not in ("score", "bbox")} == {
                k: v for k, v in wanted.items() if k not in ("score", "bbox")
            }
            assert got["score"] == pytest.approx(wanted["score"], abs=1e-4)
            assert got["bbox"] == pytest.approx(wanted["bbox"], abs=1e-3)
        assert len(row["instances"] or []) == len(want["instances"] or [])
