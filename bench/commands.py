"""Command start-up: wall time of `batchseg --help` and of a one-line `batchseg query`, against the same SQL run
by DuckDB directly on the output's Parquet files, each in a fresh process (median of --repeat runs).

Needs an output: `make demo` writes one to demo-output/results.
Usage: python bench/commands.py [--output demo-output/results] [--repeat 5]
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

SQL = "SELECT count(*) AS images, sum(len(instances)) AS instances FROM images"


def median_seconds(argv: list[str], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output/results")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not list(pathlib.Path(args.output).glob("part-*.parquet")):
        sys.exit(f"no part-*.parquet under {args.output}: run `make demo` first, or pass --output")
    batchseg = shutil.which("batchseg") or str(pathlib.Path(sys.executable).parent / "batchseg")
    glob = str(pathlib.Path(args.output) / "part-*.parquet")
    direct_sql = SQL.replace("FROM images", f"FROM read_parquet({glob!r})")
    direct = f"import duckdb; print(duckdb.sql({direct_sql!r}))"
    timings = {  # command, goal (issue #10: --help under 0.5 s; query has none, DuckDB is the reference)
        "batchseg --help": ([batchseg, "--help"], "goal: under 0.50 s"),
        "batchseg query (one line)": ([batchseg, "query", args.output, SQL], "reference: DuckDB below"),
        "DuckDB directly, same SQL": ([sys.executable, "-c", direct], ""),
    }
    for name, (argv, goal) in timings.items():
        seconds = median_seconds(argv, args.repeat)
        print(f"{name:<28} {seconds:6.2f} s (median of {args.repeat})  {goal}", flush=True)


if __name__ == "__main__":
    main()
