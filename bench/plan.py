"""Driver scale: time and peak memory to plan shards for 10k, 100k and 1M-row manifests.

Each size runs in a fresh process, so its peak RSS is its own. Prints one line per size.
Usage: python bench/plan.py [--sizes 10000,100000,1000000] [--format parquet|csv|txt]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq


def write_manifest(path: str, rows: int, fmt: str) -> None:
    uris = pa.array([f"s3://my-archive/images/{i // 1000:06d}/{i:09d}.jpg" for i in range(rows)])
    if fmt == "parquet":
        pq.write_table(pa.table({"uri": uris}), path, row_group_size=65_536)
    else:
        with open(path, "w") as f:
            f.write("uri\n" if fmt == "csv" else "")
            f.writelines(f"{u}\n" for u in uris.to_pylist())


def peak_rss_kib() -> int:
    """VmHWM: this process's own peak RSS (ru_maxrss would include the parent's, inherited at fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def measure(path: str) -> None:
    import batchseg.io.manifest as m

    base = peak_rss_kib()
    start = time.perf_counter()
    plan = m.plan_shards(path, 1000)
    planned = time.perf_counter() - start
    start = time.perf_counter()
    shards = sum(1 for _ in m.iter_shards(plan))
    streamed = time.perf_counter() - start
    peak = peak_rss_kib()
    print(
        f"{plan.num_rows:>9,} rows  plan {planned:6.2f} s  stream {shards} shards {streamed:6.2f} s  "
        f"peak RSS {peak / 1024:7.1f} MiB (+{(peak - base) / 1024:6.1f} MiB over the imports)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--format", default="parquet", choices=["parquet", "csv", "txt"])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (int(s) for s in args.sizes.split(",")):
            path = os.path.join(tmp, f"manifest-{rows}.{args.format}")
            write_manifest(path, rows, args.format)
            subprocess.run([sys.executable, __file__, "--measure", path], check=True)


if __name__ == "__main__":
    main()
