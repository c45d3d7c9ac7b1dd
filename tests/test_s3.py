"""Every path of the product against a real S3 server (SeaweedFS), including the server going away."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
import s3fs

from batchseg.analysis.evaluate import evaluate_output
from batchseg.analysis.query import run_query
from batchseg.analysis.results import open_results
from batchseg.analysis.verify import verify
from batchseg.cli import main
from batchseg.demo import SHAPES_MODEL
from batchseg.errors import CredentialsRejected
from batchseg.format.output import OutputDir, ShardRecord, shard_record
from batchseg.format.records import read_provenance
from batchseg.inference.models import resolve_weights
from batchseg.io import retries
from batchseg.io.manifest import Shard, default_image_id
from batchseg.segment.driver import run_segment
from batchseg.segment.job import SegmentConfig
from batchseg.segment.processor import ShardProcessor
from batchseg.train.synth import write_dataset
from tests.faults import KINDS, FaultProxy
from tests.latency import LatencyProxy
from tests.processes import wait_for
from tests.s3server import SECRET, S3Server
from tests.segmenting import segment_in_process


def bucket_fs(s3: S3Server) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, **s3.options())


def small_model_job(s3: S3Server, manifest: str, output: str, **changes: Any) -> SegmentConfig:
    return SegmentConfig(
        manifest=manifest,
        output=output,
        weights=str(SHAPES_MODEL),
        score_threshold=0.3,
        storage_options=s3.options(),
        **changes,
    )


def test_synth_segment_rerun_and_eval_on_s3(ray_address: str, s3: S3Server) -> None:
    data = write_dataset("s3://data/shapes", 12, seed=7, storage_options=s3.options())
    config = small_model_job(s3, data.manifest, "s3://out/seg", shard_size=5)
    summary = run_segment(config)
    assert (summary["status"], summary["ok"], summary["shards_done"]) == ("complete", 12, 3)
    table = open_results(config.output, s3.options()).to_table()
    assert table.column("uri").to_pylist() == data.uris
    assert table.column("uri").to_pylist()[0].startswith("s3://data/shapes/images/")
    fs = bucket_fs(s3)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.glob("out/seg/part-*.parquet")) == [
        "part-000000.parquet",
        "part-000001.parquet",
        "part-000002.parquet",
    ]
    with fs.open("out/seg/part-000000.parquet", "rb") as f:
        import pyarrow.parquet as pq

        assert read_provenance(pq.read_schema(f))["model"] == "maskrcnn_small"
    fs.pipe({"out/seg/part-00000-c0ffee.snappy.parquet": b"PAR1 another tool's", "out/seg/_done/x.txt": b""})
    fs.rm("out/seg/part-000001.parquet")  # by hand: its completion record stays, the rerun redoes it
    again = run_segment(config)
    assert (again["images_this_run"], again["shards_skipped"], again["images"]) == (5, 2, 12)
    assert (
        verify(config.output, storage_options=s3.options()).line().startswith("OK: s3://out/seg: 12 images")
    )
    metrics = evaluate_output(config.output, data.annotations, s3.options())
    assert metrics["images"]["matched"] == 12 and metrics["segm"]["AP"] > 0.3
    table = run_query(config.output, "SELECT count(*) AS n FROM instances", storage_options=s3.options())
    assert table.splitlines()[2].strip() == str(summary["instances"])
    redone = run_segment(replace(config, shard_size=4, overwrite=True))  # other settings: start over
    assert (redone["images_this_run"], redone["shards_done"], redone["shards_skipped"]) == (12, 3, 0)
    assert open_results(config.output, s3.options()).to_table().column("uri").to_pylist() == data.uris
    assert fs.exists("out/seg/part-00000-c0ffee.snappy.parquet") and fs.exists("out/seg/_done/x.txt")


def test_reads_behind_50_ms_of_latency_give_the_same_rows(s3: S3Server) -> None:
    """Many reads in flight on one event loop (and a prefetch of 1, one at a time) change nothing in the
    rows, bad objects included; the proxy really holds every request back. The shard processor's reads,
    without Ray: the job on S3 is test_synth_segment_rerun_and_eval_on_s3's."""
    data = write_dataset("s3://data/latency", 10, seed=5, storage_options=s3.options())
    fs = bucket_fs(s3)
    fs.pipe({"data/latency/not-an-image.jpg": b"plain text", "data/latency/empty.jpg": b""})
    uris = [*data.uris[:5], "s3://data/latency/not-an-image.jpg", "s3://data/latency/missing.jpg",
            "s3://data/latency/empty.jpg", *data.uris[5:]]  # fmt: skip
    fs.pipe_file("data/latency/manifest.csv", ("uri\n" + "".join(f"{u}\n" for u in uris)).encode())
    manifest = "s3://data/latency/manifest.csv"
    direct = small_model_job(s3, manifest, "s3://out/latency-direct", shard_size=6)
    segment_in_process(direct)
    expected = open_results(direct.output, s3.options()).to_table().to_pylist()
    assert [r["status"] for r in expected].count("error") == 3
    with LatencyProxy(s3.ports[3], 0.05) as proxy:
        slow = s3.options() | {"endpoint_url": proxy.endpoint}
        start = time.perf_counter()
        s3fs.S3FileSystem(skip_instance_cache=True, **slow).cat_file(data.uris[0])
        assert time.perf_counter() - start >= 0.05
        for prefetch in (64, 1):
            config = replace(
                direct, output=f"s3://out/latency-{prefetch}", prefetch=prefetch, storage_options=slow
            )
            assert segment_in_process(config)["status"] == "complete"
            assert open_results(config.output, s3.options()).to_table().to_pylist() == expected


@pytest.mark.slow
def test_the_s3_server_stopping_mid_job_is_survived_exactly_once(
    ray_address: str, s3: S3Server, tmp_path: pathlib.Path
) -> None:
    data = write_dataset("s3://data/outage", 60, seed=3, storage_options=s3.options())
    config = small_model_job(s3, data.manifest, "s3://out/outage", shard_size=3, batch_size=1)
    fs = bucket_fs(s3)
    result: dict[str, Any] = {}
    job = threading.Thread(target=lambda: result.update(run_segment(config)))
    job.start()
    try:
        wait_for(
            lambda: (
                len(fs.ls("out/outage/_done", refresh=True)) >= 2 if fs.exists("out/outage/_done") else False
            ),
            120,
            "two finished shards",
        )
        done_at_stop = len(fs.ls("out/outage/_done", refresh=True))
        s3.stop()
        time.sleep(5)
    finally:
        s3.start()
        job.join(timeout=400)
    assert done_at_stop < 20, "the server must go away mid-job"
    assert result["status"] == "complete"
    table = open_results(config.output, s3.options()).to_table()
    assert table.column("status").to_pylist() == ["ok"] * 60, "an outage must not turn images into error rows"
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 60


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong_secret", "cannot open manifest s3://data/shapes-errors/manifest.csv: access denied"),
        ("missing_bucket", "cannot use output s3://no-such-bucket/out: not found"),
        ("read_only", "cannot use output s3://out/read-only: access denied"),
        (  # a deterministic client error, not retried for minutes (nor printing the URL's password)
            "user_info_in_endpoint",
            "cannot open manifest s3://data/shapes-errors/manifest.csv: HTTPClientError: An HTTP Client "
            "raised an unhandled exception: Cannot combine AUTHORIZATION header",
        ),
    ],
)
def test_storage_problems_fail_early_in_one_line_leaving_nothing(
    s3: S3Server, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    data = write_dataset("s3://data/shapes-errors", 2, seed=0, storage_options=s3.options())
    output = {"missing_bucket": "s3://no-such-bucket/out", "read_only": "s3://out/read-only"}.get(
        case, "s3://out/x"
    )
    options = {
        "wrong_secret": s3.options(secret="not-the-secret"),
        "read_only": s3.options("AKIDREADER", "reader-secret"),
        "user_info_in_endpoint": s3.options() | {"endpoint_url": s3.endpoint.replace("://", "://u:pw@")},
    }
    import json

    storage = json.dumps(options.get(case, s3.options()))
    started = time.monotonic()
    code = main(["segment", "--manifest", data.manifest, "--output", output, "--weights", str(SHAPES_MODEL),
                 "--storage-options", storage])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert time.monotonic() - started < 20, "retried as if the store might recover"
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"batchseg: error: {message}"), err
    fs = bucket_fs(s3)
    prefix = output.removeprefix("s3://")
    assert not fs.exists(prefix) or not fs.find(prefix), "no partial output"


def test_credentials_from_the_environment_and_secrets_never_written(
    ray_address: str, s3: S3Server, tmp_path: pathlib.Path
) -> None:
    """A job whose secret key is SECRET: it must not appear in its output, its logs, or Ray's logs."""
    data = write_dataset("s3://data/secret", 4, seed=2, storage_options=s3.options())
    env = {"AWS_ACCESS_KEY_ID": "AKIDADMIN", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": s3.endpoint}
    args = [sys.executable, "-m", "batchseg.cli", "segment", "--manifest", data.manifest, "--output",
            "s3://out/secret-seg", "--weights", str(SHAPES_MODEL), "--address", ray_address]  # fmt: skip
    import os

    proc = subprocess.run(args, env=os.environ | env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fs = bucket_fs(s3)
    # training's runs with this secret: test_train.py::test_training_never_writes_the_secret_key
    written = fs.find("out/secret-seg")
    assert any(p.endswith("/_summary.json") for p in written)
    for path in written:
        assert SECRET.encode() not in fs.cat_file(path), path
    assert SECRET not in proc.stdout + proc.stderr
    import ray

    logs = pathlib.Path(ray._private.worker._global_node.get_logs_dir_path())  # this session's Ray's own
    assert logs.is_dir()
    for log in logs.rglob("*"):
        if log.is_file():
            assert SECRET.encode() not in log.read_bytes(), log
    assert default_image_id(data.uris[0])  # the rows were made from the env-configured storage


def test_a_flaky_store_gives_every_row_ok_exactly_once_and_counts_the_retries(
    ray_address: str, s3: S3Server
) -> None:
    """Every 8th request for an image or the output is, in turn, reset mid-body, answered 503 SlowDown,
    stalled past the read timeout or cut short, and so are its next four tries: as many as s3fs makes on
    its own (botocore's retries are off), so each fault reaches batchseg. aiohttp checks a body against
    its Content-Length (a ClientPayloadError), so a cut-short image is retried, never a corrupt_image row."""
    data = write_dataset("s3://data/chaos", 200, seed=4, size=64, storage_options=s3.options())
    config = small_model_job(s3, data.manifest, "s3://out/chaos", shard_size=50, actors=(2, 2))
    config = replace(config, connect_timeout=1, read_timeout=1)
    with FaultProxy(s3.ports[3], every=8, repeat=5, only=r" /data/chaos/images/| /out[/?]") as proxy:
        flaky = s3.options() | {
            "endpoint_url": proxy.endpoint,
            "config_kwargs": {"retries": {"total_max_attempts": 1}},
        }
        summary = run_segment(replace(config, storage_options=flaky))
        faults = proxy.counts()
    assert all(faults[kind] >= 5 for kind in KINDS), faults
    started = [f.split(" ", 1) for f in faults["faulted"]]  # [kind, "METHOD target"]
    assert any(key.startswith("PUT /out/chaos/") for _, key in started), started
    image_reads = {key for _, key in started if key.startswith("GET /data/chaos/images/")}
    assert (summary["status"], summary["ok"], summary["shards_failed"]) == ("complete", 200, [])
    assert summary["storage_retries"] >= len(image_reads), (summary["storage_retries"], faults)
    table = open_results(config.output, s3.options()).to_table()
    assert table.column("status").to_pylist() == ["ok"] * 200, "a storage fault must not become an error row"
    assert table.column("uri").to_pylist() == data.uris  # every image once, in manifest order


def test_many_shard_records_are_read_through_a_flaky_store(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk read tries again only the objects that failed: tried all or nothing, 40 records behind a store
    that breaks one request in eight (for five tries each) would almost never all come back."""
    monkeypatch.setattr(retries, "RETRY_SECONDS", 20.0)
    records = {
        f"out/records/{shard_record(i)}": ShardRecord(
            rows=1, ok=1, errors={}, instances=0, seconds=0.1, attempt=1, shard=i
        ).to_json()
        for i in range(40)
    }
    bucket_fs(s3).pipe({path: text.encode() for path, text in records.items()})
    with FaultProxy(s3.ports[3], every=8, repeat=5, only=r"/_done/part-") as proxy:
        flaky = s3.options() | {
            "endpoint_url": proxy.endpoint,
            "config_kwargs": {"retries": {"total_max_attempts": 1}},
        }
        read = OutputDir("s3://out/records", flaky | {"connect_timeout": 1, "read_timeout": 1}).records()
        assert all(proxy.counts()[kind] >= 5 for kind in KINDS)
    assert [r.shard for r in read] == list(range(40))


@pytest.mark.parametrize(
    ("case", "code"), [("wrong_secret", "SignatureDoesNotMatch"), ("unknown_key", "InvalidAccessKeyId")]
)
def test_credentials_the_store_refuses_fail_the_shard_and_write_nothing(
    s3: S3Server, tmp_path: pathlib.Path, case: str, code: str
) -> None:
    """Credentials the store refuses (as an expired or revoked session token is refused) are no image's
    fault: the shard fails, to be retried, said once, never recorded with a ``permission_denied`` row per
    image. The shard processor, without Ray: the job retries a shard that raises (test_segment.py)."""
    data = write_dataset("s3://data/refused", 3, seed=2, storage_options=s3.options())
    options = {"wrong_secret": s3.options(secret="not-the-secret"), "unknown_key": s3.options("AKIDNOBODY")}
    config = replace(small_model_job(s3, "", str(tmp_path / "out")), storage_options=options[case])
    shards = ShardProcessor(config, resolve_weights(config.weights, config.model))
    with pytest.raises(CredentialsRejected, match=f"the storage refused the credentials \\({code}: "):
        shards.process(Shard(0, ["a", "b", "c"], data.uris))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_the_test_server_starts_on_fresh_ports_when_one_it_chose_is_taken(tmp_path: pathlib.Path) -> None:
    """Ray's processes open and close ports around the suite: a port taken between choosing it and
    ``weed`` binding it once cost CI every S3 test (SeaweedFS exits when its master port is taken)."""
    import socket

    server = S3Server(tmp_path)
    chosen = list(server.ports)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", chosen[0]))
        taken.listen()
        try:
            server.start()
            assert server.ports != chosen
            assert s3fs.S3FileSystem(skip_instance_cache=True, **server.options()).ls("") == []
        finally:
            server.stop()
