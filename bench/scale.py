"""A million-image ``segment`` job on one machine with the model's forward stood in, then queries at that size.

Everything but the forward is the code users run: local Ray, real actors, image files read and decoded,
masks to RLE, Parquet, completion records, the summary. The stand-in replaces ``Predictor.forward`` in the
actors only, installed through Ray's ``worker_process_setup_hook``; it returns a fixed set of detections
per image at once (``--instances`` boxes with compact masks), so what is measured is the framework, the
part a GPU must never wait on. The manifest has ``--rows`` distinct image ids over a few hundred small
files made by ``batchseg synth``.
Usage: python bench/scale.py [--rows 1000000] [--files 300] [--shard-size 1000] [--instances 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import s3fs

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: the S3 server

from batchseg import log
from batchseg.analysis.results import open_results
from batchseg.demo import SHAPES_MODEL
from batchseg.format.output import OutputDir
from batchseg.segment.config import SegmentConfig
from batchseg.segment.driver import run_segment
from batchseg.segment.job import prepare_job, summarize
from batchseg.train.synth import write_dataset
from bench.standin import stand_in
from tests.s3server import running_s3

GOALS = {"rate": 1000.0, "driver_mib": 150.0, "rerun_s": 10.0}


class PeakRss:
    """This process's resident memory, sampled every 0.2 s in a thread (not only at the end)."""

    def __init__(self) -> None:
        self.base = self.peak = rss_mib()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, rss_mib())

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_mib())
        return self.peak - self.base


def rss_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def busy_seconds() -> float:
    """CPU seconds this machine has spent busy (all processes: the driver, Ray, the actors)."""
    fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def image_id(row: int) -> str:
    return f"img-{row:07d}"


def write_manifest(path: str, uris: list[str], rows: int) -> list[str]:
    ids = [image_id(i) for i in range(rows)]
    table = pa.table({"image_id": ids, "uri": [uris[i % len(uris)] for i in range(rows)]})
    pq.write_table(table, path)
    return ids


def segment(config: SegmentConfig, ids: list[str], label: str) -> dict[str, Any]:
    """Run the job; print its figures; check every id once; time a no-op rerun and the summary."""
    memory = PeakRss()
    busy, start = busy_seconds(), time.perf_counter()
    summary = run_segment(config)
    wall = time.perf_counter() - start
    cpu = busy_seconds() - busy
    grew = memory.close()
    assert summary["status"] == "complete", summary
    written = open_results(config.output, config.storage_options).to_table(columns=["image_id"])
    column = written.column("image_id")
    assert len(column) == len(ids) and set(column.to_pylist()) == set(ids), "rows exactly once"
    config = replace(config, overwrite=False)
    start = time.perf_counter()
    again = run_segment(config)
    rerun = time.perf_counter() - start
    assert again["images_this_run"] == 0 and again["shards_skipped"] == summary["shards_done"]
    start = time.perf_counter()
    with prepare_job(config) as job:
        summarize(OutputDir(config.output, config.storage_options).records(), job, {})
    records = time.perf_counter() - start
    figures = {
        "rows": len(ids),
        "shards": summary["shards_done"],
        "wall_s": wall,
        "img_per_s": len(ids) / wall,
        "cpu_us_per_image": cpu / len(ids) * 1e6,
        "driver_mib_over_imports": grew,
        "rerun_s": rerun,
        "summary_s": records,
        "instances": summary["instances"],
    }
    print(f"[{label}] {json.dumps({k: round(v, 3) for k, v in figures.items()})}", flush=True)
    print(
        f"[{label}] {figures['img_per_s']:.0f} img/s (goal: at least {GOALS['rate']:.0f}); "
        f"driver +{grew:.0f} MiB over its imports, peak while running (goal: at most {GOALS['driver_mib']:.0f}); "
        f"no-op rerun {rerun:.1f} s (goal: under {GOALS['rerun_s']:.0f} s); records + summary {records:.2f} s; "
        f"{figures['cpu_us_per_image']:.0f} us of machine CPU per image; every id exactly once",
        flush=True,
    )
    return figures


QUERIES = {
    "instances per category": (
        "SELECT category, count(*) AS n FROM instances GROUP BY category ORDER BY n DESC",
        "SELECT i.category, count(*) AS n FROM (SELECT UNNEST(instances) AS i FROM {rows}) "
        "GROUP BY i.category ORDER BY n DESC",
    ),
    "images with 2+ instances of category 1": (
        "SELECT count(*) AS images FROM (SELECT image_id FROM instances WHERE category_id = 1 "
        "GROUP BY image_id HAVING count(*) >= 2)",
        "SELECT count(*) AS images FROM (SELECT image_id FROM (SELECT image_id, UNNEST(instances) AS i "
        "FROM {rows}) WHERE i.category_id = 1 GROUP BY image_id HAVING count(*) >= 2)",
    ),
    "one image by image_id": (
        "SELECT image_id, uri, len(instances) AS n FROM images WHERE image_id = '{one}'",
        "SELECT image_id, uri, len(instances) AS n FROM {rows} WHERE image_id = '{one}'",
    ),
}


def run_command(argv: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB, the child's own VmHWM, polled: a forked child's ``ru_maxrss`` starts
    at its parent's) and stdout of a command run in its own process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        peak = 0.0
        status = pathlib.Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        seconds = time.perf_counter() - start
        sink.seek(0)
        stdout = sink.read().decode()
    assert process.returncode == 0, f"{argv[:4]} failed: {stdout[-2000:]}"
    return seconds, peak, stdout


def queries(output: str, rows_in_output: int, repeat: int) -> None:
    """``batchseg query`` against DuckDB run directly on the Parquet glob, each in a fresh process."""
    batchseg = [sys.executable, "-m", "batchseg.cli", "query", output]
    rows = f"read_parquet('{output}/part-*.parquet')"
    direct = [sys.executable, "-c", "import duckdb, sys; print(duckdb.sql(sys.argv[1]).fetchall())"]
    one = image_id(rows_in_output * 2 // 3)
    for name, (ours, theirs) in QUERIES.items():
        timings: dict[str, list[float]] = {"batchseg": [], "duckdb": []}
        memory: dict[str, float] = {"batchseg": 0.0, "duckdb": 0.0}
        for _ in range(repeat):
            for who, argv in (
                ("batchseg", [*batchseg, ours.format(one=one)]),
                ("duckdb", [*direct, theirs.format(one=one, rows=rows)]),
            ):
                seconds, peak, _ = run_command(argv)
                timings[who].append(seconds)
                memory[who] = max(memory[who], peak)
        a, b = statistics.median(timings["batchseg"]), statistics.median(timings["duckdb"])
        print(
            f"[query] {name}: batchseg query {a:.2f} s ({memory['batchseg']:.0f} MiB peak), DuckDB directly "
            f"{b:.2f} s ({memory['duckdb']:.0f} MiB); ratio {a / b:.2f} (goal: at most 1.25); median of {repeat}",
            flush=True,
        )


def read_side(output: str, tmp: str) -> None:
    """``export-coco``, ``report`` and ``verify`` (every shard's ids against the manifest; it must pass) over
    the whole output: time and peak memory."""
    cli = [sys.executable, "-m", "batchseg.cli"]
    for name, argv in (
        ("export-coco", [*cli, "export-coco", output, "--out", f"{tmp}/results.json"]),
        ("report", [*cli, "report", output, "--out", f"{tmp}/report.html"]),
        ("verify", [*cli, "verify", output]),
    ):
        seconds, peak, _ = run_command(argv)
        print(f"[read side] batchseg {name}: {seconds:.1f} s, {peak:.0f} MiB peak", flush=True)


def job_config(args: argparse.Namespace, manifest: str, output: str, **changes: Any) -> SegmentConfig:
    """The benchmark's job: the shipped small model (its forward stood in), one CPU per actor."""
    return SegmentConfig(
        manifest=manifest,
        output=output,
        weights=str(SHAPES_MODEL),
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        actors=(args.actors, args.actors),
        cpus_per_actor=1,
        **changes,
    )


def on_s3(args: argparse.Namespace, tmp: pathlib.Path) -> None:
    """The same job at ``--s3-rows`` on SeaweedFS (as the tests start it): images, manifest, shards,
    completion records and summary all on the object store."""
    (tmp / "s3").mkdir()
    with running_s3(tmp / "s3", ("bench",)) as server:
        options = server.options()
        uris = write_dataset(
            "s3://bench/files", args.files, seed=0, size=args.size, storage_options=options
        ).uris
        local = f"{tmp}/s3-manifest.parquet"
        ids = write_manifest(local, uris, args.s3_rows)
        s3fs.S3FileSystem(skip_instance_cache=True, **options).put_file(local, "bench/manifest.parquet")
        config = job_config(args, "s3://bench/manifest.parquet", "s3://bench/out", storage_options=options)
        segment(config, ids, f"S3, {args.s3_rows:,} rows")


def main() -> None:
    log.to_stderr()  # batchseg's progress, as the CLI prints it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=300, help="distinct image files behind the rows")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--instances", type=int, default=5, help="stand-in detections per image")
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--s3-rows", type=int, default=100_000, help="rows of the S3 run (0: none)")
    parser.add_argument(
        "--workdir", default=None, help="keep the files and output here (default: a temporary folder)"
    )
    parser.add_argument(
        "--queries-only", action="store_true", help="only the queries and read side, on --workdir's output"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each query (the median is shown)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        output = f"{tmp}/out"
        if not args.queries_only:
            ray.init(
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                configure_logging=False,
                logging_config=ray.LoggingConfig(log_level="ERROR"),
                runtime_env={"worker_process_setup_hook": stand_in(args.instances)},
            )
            uris = write_dataset(f"{tmp}/files", args.files, seed=0, size=args.size).uris
            ids = write_manifest(f"{tmp}/manifest.parquet", uris, args.rows)
            config = job_config(args, f"{tmp}/manifest.parquet", output, overwrite=True)
            segment(config, ids, f"local, {args.rows:,} rows")
            del ids
            if args.s3_rows:
                on_s3(args, pathlib.Path(tmp))
            ray.shutdown()
        queries(output, args.rows, args.repeat)
        read_side(output, tmp)


if __name__ == "__main__":
    main()
