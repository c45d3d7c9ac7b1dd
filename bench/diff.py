"""``batchseg diff`` over two large outputs: time, and peak memory as the outputs grow.

Two outputs of the same ``--rows`` images are written directly as shards (no model): OLD in shards of 1000
rows, NEW in shards of 1000 (aligned: each NEW shard needs one OLD shard) or of 1500 rows (misaligned: most
need two). Each image holds ``--instances`` masks on a 64 x 64 image; in NEW every third is moved by two
pixels, every fifth dropped and every seventh image gains one. Each diff runs in its own process, so its
peak RSS (``ru_maxrss``) is its own; the same process with the imports only is the baseline.
Usage: python bench/diff.py [--rows 50000,200000] [--instances 4]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from batchseg.format.output import shard_object
from batchseg.format.records import ok_row, to_parquet
from batchseg.format.rle import encode_rle

SIDE = 64
MEASURE = """
import json, resource, sys, time
from batchseg.analysis.diff import diff_outputs
start = time.perf_counter()
diff = diff_outputs(sys.argv[1], sys.argv[2]) if len(sys.argv) > 1 else None
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "total": diff.total().as_dict() if diff else None}))
"""


def masks(count: int, shift: int) -> list[dict[str, object]]:
    out = []
    for k in range(count):
        mask = np.zeros((SIDE, SIDE), dtype=bool)
        x, y = 4 + 14 * (k % 4) + shift, 4 + 14 * (k // 4 % 4)
        mask[y : y + 10, x : x + 10] = True
        out.append(
            {"category_id": 1 + k % 3, "category": ("circle", "square", "triangle")[k % 3], "score": 0.9 - 0.01 * k,
             "bbox": [float(x), float(y), 10.0, 10.0], "area": 100, "rle": encode_rle(mask), "keypoints": None}
        )  # fmt: skip
    return out


def write(folder: pathlib.Path, rows: int, shard_size: int, instances: int, new: bool) -> str:
    folder.mkdir(parents=True)
    same, moved = masks(instances + 1, 0), masks(instances + 1, 2)
    for shard, start in enumerate(range(0, rows, shard_size)):
        batch = []
        for i in range(start, min(start + shard_size, rows)):
            kept = [
                moved[k] if new and (i + k) % 3 == 0 else same[k]
                for k in range(instances)
                if not (new and (i + k) % 5 == 0)
            ]
            if new and i % 7 == 0:
                kept.append(same[instances])
            batch.append(ok_row(f"img-{i:08d}", f"/images/{i}.jpg", SIDE, SIDE, kept))
        (folder / shard_object(shard)).write_bytes(to_parquet(batch, {"model": "bench", "shard": shard}))
    return str(folder)


def measure(*outputs: str) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *outputs], capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(proc.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="50000,200000")
    parser.add_argument("--instances", type=int, default=4)
    args = parser.parse_args()
    baseline = measure()["peak_mib"]
    print(f"imports only: peak RSS {baseline:.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (int(r) for r in args.rows.split(",")):
            root = pathlib.Path(tmp, str(rows))
            old = write(root / "old", rows, 1000, args.instances, new=False)
            for name, shard_size in (("aligned", 1000), ("misaligned", 1500)):
                new = write(root / name, rows, shard_size, args.instances, new=True)
                result = measure(old, new)
                print(
                    f"{rows:>9,} rows, {name:<10}: {result['seconds']:6.1f} s ({rows / result['seconds']:,.0f} "
                    f"images/s), peak RSS {result['peak_mib']:.0f} MiB ({result['peak_mib'] - baseline:+.0f} over "
                    f"the imports); {result['total']}"
                )


if __name__ == "__main__":
    main()
