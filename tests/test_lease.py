"""The output's lease (#25: nothing stopped two jobs writing one output): a second job is refused in one
line naming the holder before it writes anything, ``--overwrite`` included; a lease whose heartbeat stopped
is taken over with a warning; a job whose lease another job took stops. On local disk and on a real S3
server (SeaweedFS); no Ray: the refusals come before it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import s3fs

from batchseg.errors import BatchsegError
from batchseg.format.lease import Lease
from batchseg.format.output import LEASE_FILE, OutputDir, ShardRecord, settings_of, shard_object
from batchseg.format.records import ok_row, to_parquet
from batchseg.io.manifest import iter_shards
from batchseg.segment.config import SegmentConfig
from batchseg.segment.job import prepare_job
from tests.refusals import refusal
from tests.s3server import S3Server
from tests.segmenting import segment_in_process

HOLDER = re.compile(
    rf"output (\S+) is being written by another job \(host {re.escape(socket.gethostname())}, pid {os.getpid()}, "
    r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, last heartbeat \d+ s ago\); wait for it to end or stop it, "
    rf"or choose another --output \(its lease, {LEASE_FILE}, goes stale 120 s after its last heartbeat\)"
)


def job_config(tmp_path: pathlib.Path, output: str, **changes: Any) -> SegmentConfig:
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("".join(f"{tmp_path}/img{i}.png\n" for i in range(4)))
    options = {"weights": "none", "model": "maskrcnn_small", "shard_size": 2, "score_threshold": 0.3}
    return SegmentConfig(manifest=str(manifest), output=output, **(options | changes))


def write_first_shard(job: Any) -> None:
    """What the first job has written so far: shard 0, as its processor writes it."""
    shard = next(iter_shards(job.plan))
    rows = [ok_row(i, u, 2, 2, []) for i, u in zip(shard.image_ids, shard.uris, strict=True)]
    record = ShardRecord.of(
        shard, rows, attempt=1, seconds=0, storage_retries=0, settings=settings_of(job.provenance)
    )
    OutputDir(job.config.output, job.config.io_options).write_shard(
        shard, to_parquet(rows, job.provenance), record
    )


def snapshot(output: OutputDir) -> dict[str, bytes]:
    """Every file under the output and its bytes (the lease's heartbeat aside)."""
    paths = [p for p in output.fs.find(output.path) if not p.endswith(LEASE_FILE)]
    return {p: output.fs.cat_file(p) for p in paths}


def test_a_second_job_is_refused_in_one_line_naming_the_holder_and_touches_nothing(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out")
    config = job_config(tmp_path, out)
    with prepare_job(config) as first:
        write_first_shard(first)
        before = snapshot(OutputDir(out))
        assert len(before) == 3  # the job file, shard 0 and its record
        argv = [
            "segment",
            "--manifest",
            config.manifest,
            "--output",
            out,
            "--weights",
            "none",
            "--shard-size",
            "2",
        ]
        err = refusal([*argv, "--score-threshold", "0.3"], capsys)
        assert HOLDER.search(err) and f"output {out} is being" in err, err
        # #25: --overwrite with other settings cleared the output while the first job still wrote it
        err = refusal([*argv, "--overwrite", "--score-threshold", "0.7"], capsys)
        assert HOLDER.search(err), err
        assert snapshot(OutputDir(out)) == before
        assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["owner"] == first.lease.me.owner
    assert not (tmp_path / "out" / LEASE_FILE).exists()  # released at the end
    summary = segment_in_process(replace(config, overwrite=True, score_threshold=0.7))  # now it may
    assert summary["shards_done"] == 2 and not (tmp_path / "out" / LEASE_FILE).exists()


def test_a_second_job_on_s3_is_refused_and_touches_nothing(tmp_path: pathlib.Path, s3: S3Server) -> None:
    config = job_config(tmp_path, "s3://out/leased", storage_options=s3.options())
    with prepare_job(config) as first:
        write_first_shard(first)
        output = OutputDir(config.output, s3.options())
        before = snapshot(output)
        for changes in ({}, {"overwrite": True, "score_threshold": 0.7}):
            with pytest.raises(BatchsegError) as refused:
                prepare_job(replace(config, **changes))
            assert HOLDER.fullmatch(str(refused.value)), str(refused.value)
        assert snapshot(output) == before
    assert not output.fs.exists(f"{output.path}/{LEASE_FILE}")


def test_a_stale_lease_is_taken_over_with_a_warning(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stopped = time.time() - 600
    held = {"owner": "dead", "host": "gone-host", "pid": 4242, "started": stopped - 60, "heartbeat": stopped}
    (out / LEASE_FILE).write_text(json.dumps(held))
    os.utime(out / LEASE_FILE, (stopped, stopped))  # its age is the store's: its last write
    config = job_config(tmp_path, str(out))
    with caplog.at_level(logging.WARNING, logger="batchseg"):
        segment_in_process(config)
    warnings = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(warnings) == 1 and "host gone-host, pid 4242" in warnings[0], warnings
    assert re.search(r"last heartbeat 60\d s ago; stale after 120 s", warnings[0]), warnings
    assert not (out / LEASE_FILE).exists()
    output = OutputDir(str(out))
    job = output.read_job()
    assert job is not None
    records = output.records()
    assert [r.settings for r in records] == [settings_of(job)] * 2  # what the processor wrote
    assert [r.md5 for r in records] == [
        hashlib.md5((out / shard_object(i)).read_bytes()).hexdigest() for i in (0, 1)
    ]


def test_a_lease_that_is_not_yet_stale_is_refused(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    beat = time.time() - 100  # under 120 s
    (out / LEASE_FILE).write_text(
        json.dumps({"owner": "o", "host": "busy-host", "pid": 7, "started": beat, "heartbeat": beat})
    )
    os.utime(out / LEASE_FILE, (beat, beat))
    with pytest.raises(
        BatchsegError, match=r"another job \(host busy-host, pid 7, .*last heartbeat 10\d s ago\)"
    ):
        prepare_job(job_config(tmp_path, str(out)))
    assert os.listdir(out) == [LEASE_FILE]


def test_a_lease_that_does_not_read_as_one_is_refused_as_such_until_stale(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_FILE).write_text("written by hand")
    with pytest.raises(BatchsegError) as refused:
        prepare_job(job_config(tmp_path, str(out)))
    assert re.search(
        r"another job \(its lease does not read as batchseg's; last written \d s ago\)", str(refused.value)
    )
    stale = time.time() - 600
    os.utime(out / LEASE_FILE, (stale, stale))
    with prepare_job(job_config(tmp_path, str(out))) as job:
        assert json.loads((out / LEASE_FILE).read_text())["owner"] == job.lease.me.owner


def test_the_heartbeat_renews_the_lease_and_a_lease_taken_by_another_job_stops_this_one(
    tmp_path: pathlib.Path,
) -> None:
    output = OutputDir(str(tmp_path / "out"))
    lease = Lease(output, heartbeat_s=0.05)
    lease.take()
    path = tmp_path / "out" / LEASE_FILE
    first = json.loads(path.read_text())["heartbeat"]
    deadline = time.time() + 10
    while json.loads(path.read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.02)
    assert json.loads(path.read_text())["heartbeat"] > first
    lease.check()  # still this run's
    taker = {"owner": "other", "host": "h2", "pid": 9, "started": time.time(), "heartbeat": time.time()}
    path.write_text(json.dumps(taker))
    while lease.lost is None and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(BatchsegError, match=r"this job's lease was taken by another job \(host h2, pid 9"):
        lease.check()
    lease.release()
    assert json.loads(path.read_text())["owner"] == "other"  # not this run's to remove


def test_a_lease_whose_process_ended_on_this_machine_is_taken_over_at_once(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rerun right after ``kill -9`` of the driver (or its crash) need not wait 120 s."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    out = tmp_path / "out"
    out.mkdir()
    me = Lease(OutputDir(str(out))).me
    held = {
        "owner": "killed",
        "host": me.host,
        "pid": ended.pid,
        "started": time.time(),
        "heartbeat": time.time(),
    }
    (out / LEASE_FILE).write_text(json.dumps(held | {"pid_namespace": me.pid_namespace}))
    with (
        caplog.at_level(logging.WARNING, logger="batchseg"),
        prepare_job(job_config(tmp_path, str(out))) as job,
    ):
        assert json.loads((out / LEASE_FILE).read_text())["owner"] == job.lease.me.owner
    assert any(f"pid {ended.pid}" in r.getMessage() and "ended" in r.getMessage() for r in caplog.records)
    # another machine's (or another PID namespace's) live lease is not for this one to judge
    (out / LEASE_FILE).write_text(json.dumps(held | {"pid_namespace": "pid:[1]"}))
    with pytest.raises(BatchsegError, match="is being written by another job"):
        prepare_job(job_config(tmp_path, str(out)))


class IgnoresConditions(s3fs.S3FileSystem):
    """A store without conditional writes that ignores the header (older S3-compatible servers)."""

    async def _pipe_file(self, path: str, data: bytes, mode: str = "overwrite", **kwargs: Any) -> Any:
        return await super()._pipe_file(path, data, **kwargs)


class RefusesConditions(s3fs.S3FileSystem):
    """A store without conditional writes that answers the header with 501 NotImplemented."""

    async def _pipe_file(self, path: str, data: bytes, mode: str = "overwrite", **kwargs: Any) -> Any:
        if mode == "create":
            raise OSError(errno.ENOSYS, "NotImplemented: If-None-Match")
        return await super()._pipe_file(path, data, **kwargs)


def racing_outputs(
    where: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest, name: str
) -> OutputDir:
    """An output on local disk, on the S3 server, or on it seen through a store without conditional writes."""
    if where == "local":
        (tmp_path / name).mkdir()
        return OutputDir(str(tmp_path / name))
    s3: S3Server = request.getfixturevalue("s3")
    output = OutputDir(f"s3://out/{name}-{where}-{time.time_ns()}", s3.options())
    store = {
        "s3": None,
        "s3-ignores-conditions": IgnoresConditions,
        "s3-refuses-conditions": RefusesConditions,
    }
    if store[where] is not None:
        output.fs = store[where](**output.fs.storage_options, skip_instance_cache=True)
    return output


@contextlib.contextmanager
def one_holds(leases: list[Lease]) -> Iterator[Lease]:
    """Each lease taken at once from its own thread: exactly one holds it (yielded); all released after."""
    results = [""] * len(leases)
    start = threading.Barrier(len(leases))

    def take(i: int) -> None:
        start.wait()
        try:
            leases[i].take()
            results[i] = "held"
        except BatchsegError:
            results[i] = "refused"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert sorted(results) == ["held"] + ["refused"] * (len(leases) - 1)
        yield leases[results.index("held")]
    finally:
        for lease in leases:
            lease.release()


@pytest.mark.parametrize("where", ["local", "s3", "s3-ignores-conditions", "s3-refuses-conditions"])
def test_of_jobs_taking_a_lease_at_once_exactly_one_holds_it(
    tmp_path: pathlib.Path, where: str, request: pytest.FixtureRequest
) -> None:
    """The lease is created only if absent (a hard link; S3's If-None-Match): no check-then-write race.
    Where the store cannot create only if absent, the last writer wins, and every other job learns it
    before it writes anything (the lease is read back after a pause)."""
    output = racing_outputs(where, tmp_path, request, "race")
    with one_holds([Lease(output) for _ in range(6)]) as holder:
        assert json.loads(output.fs.cat_file(holder.path))["owner"] == holder.me.owner


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_jobs_taking_over_one_stale_lease_at_once_exactly_one_holds_it(
    tmp_path: pathlib.Path, where: str, request: pytest.FixtureRequest
) -> None:
    """Two reruns after a crash both find the lease stale: one takes it over, the other is refused (a
    takeover removed the lease only if it was still the stale one, then read it back after a pause)."""
    output = racing_outputs(where, tmp_path, request, "takeover")
    stale = {"owner": "dead", "host": "gone-host", "pid": 4242, "started": 0.0, "heartbeat": 0.0}
    output.fs.pipe_file(f"{output.path}/{LEASE_FILE}", json.dumps(stale).encode())
    leases = [Lease(output, stale_after_s=1) for _ in range(6)]
    time.sleep(1.5)
    with one_holds(leases) as holder:
        assert json.loads(output.fs.cat_file(holder.path))["owner"] == holder.me.owner


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_live_holder_whose_clock_is_behind_is_not_taken_over(
    tmp_path: pathlib.Path, where: str, request: pytest.FixtureRequest
) -> None:
    """The heartbeat's age is the store's: the time of its last write against the store's time now. A
    holder whose clock is 10 minutes slow is still alive; one whose clock is fast has still stopped."""
    output = racing_outputs(where, tmp_path, request, "skewed")
    path = f"{output.path}/{LEASE_FILE}"
    slow = time.time() - 600
    held = {"owner": "slow-clock", "host": "h", "pid": 7, "started": slow, "heartbeat": slow}
    output.fs.pipe_file(path, json.dumps(held).encode())
    with pytest.raises(BatchsegError, match=r"another job \(host h, pid 7, .*last heartbeat [0-9] s ago\)"):
        Lease(output).take()
    if where == "local":  # a holder whose clock runs 10 minutes ahead, stopped 10 minutes ago
        fast = time.time() + 600
        output.fs.pipe_file(path, json.dumps(held | {"started": fast, "heartbeat": fast}).encode())
        os.utime(path, (time.time() - 600, time.time() - 600))
        with Lease(output) as lease:
            assert json.loads(output.fs.cat_file(path))["owner"] == lease.me.owner


def test_a_lease_probe_left_on_s3_by_a_killed_job_is_removed_by_the_next_and_nothing_else(
    tmp_path: pathlib.Path, s3: S3Server
) -> None:
    """A job killed while it timed a lease (its probe, lying aside as unfinished writes do) leaves an
    object that only batchseg would name so: the next job on the output removes it, on S3 as on disk."""
    config = job_config(tmp_path, "s3://out/probed", storage_options=s3.options())
    output = OutputDir(config.output, s3.options())
    probe = f"{output.path}/.{LEASE_FILE}.tmp-{'0123456789abcdef' * 2}"
    theirs = f"{output.path}/.notes.tmp-{'0123456789abcdef' * 2}"
    for path in (probe, theirs):
        output.fs.pipe_file(path, b"")
    with prepare_job(config):
        output.fs.invalidate_cache()
        assert not output.fs.exists(probe) and output.fs.exists(theirs)
