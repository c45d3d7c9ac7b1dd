"""Training data at archive scale: a worker's peak memory and time to its first step, COCO JSON against a
Parquet training set, for 10,000 to 1,000,000 images; and the driver's ``--from-results --where`` selection.

Each figure is a fresh process doing what a training worker does before its first step, with the images and
the model stood in (the data path's memory and time are the question, not the pixels'): open the training
set (``open_training_set``: COCO JSON loaded by pycocotools, or Parquet footers), place the epoch
(``EpochOrder``, rank 0's share of ``--workers``), read the examples of the first batch (one row group) and
decode their masks. Peak memory is the process's high-water mark (VmHWM); a process over ``--cap-mib`` is
stopped and shown as over it. The data: ``--instances`` masks per image of 640 x 480 (rectangles and
ellipses, RLE as segment writes them), image URIs made up. ``select`` is the driver's one-off materialisation
of ``--where "score >= 0.8"`` from an output of the same rows (scores 0.99 down to 0.6: two instances of each
image kept, so each image must come back as one row with both).
Usage: python bench/train_data.py [--sizes 10000,100000,1000000] [--coco-max 100000] [--cap-mib 6000]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

WHERE = "score >= 0.8"  # two of each image's five instances (scores 0.99 down to 0.6): grouped back by image
GOALS = {
    "first_step_s": 60.0,
    "flat": 1.10,
}  # Parquet: the first step within 60 s; 1M's peak within 10% of 10k's
WIDTH, HEIGHT, BATCH = 640, 480, 8


def masks(count: int) -> list[tuple[str, list[float], int]]:
    """``count`` distinct masks of a 640 x 480 image as (RLE, box, area): rectangles and ellipses of 40 to 160
    pixels, as a segment output's instances are."""
    import numpy as np

    from batchseg.format.rle import encode_rle

    rng = np.random.default_rng(0)
    out = []
    ys, xs = np.mgrid[:HEIGHT, :WIDTH]
    for k in range(count):
        w, h = (int(v) for v in rng.integers(40, 160, size=2))
        x, y = int(rng.integers(0, WIDTH - w)), int(rng.integers(0, HEIGHT - h))
        if k % 2:
            mask = ((xs - x - w / 2) / (w / 2)) ** 2 + ((ys - y - h / 2) / (h / 2)) ** 2 <= 1
        else:
            mask = (xs >= x) & (xs < x + w) & (ys >= y) & (ys < y + h)
        out.append((encode_rle(mask), [float(x), float(y), float(w), float(h)], int(mask.sum())))
    return out


def image_id(i: int) -> str:
    return f"img-{i:07d}"


def write_parquet(folder: str, images: int, instances: int, as_output: bool) -> None:
    """A training set (``as_output``: a segment output, ``part-NNNNNN.parquet`` of 1,000 rows each with its
    provenance) of ``images`` rows, ``instances`` each, built from one template row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchseg.format.output import shard_object
    from batchseg.format.records import SCHEMA, ok_row, to_table
    from batchseg.train.parquet import ROW_GROUP_IMAGES, TrainingSetWriter

    shapes, categories = masks(16), ["__background__", "circle", "square", "triangle"]
    scores = [0.99 - 0.39 * j / max(1, instances - 1) for j in range(instances)]
    template = to_table(
        [
            ok_row(
                "", "", WIDTH, HEIGHT,
                [
                    {"category_id": j % 3 + 1, "category": categories[j % 3 + 1], "score": scores[j],
                     "bbox": shapes[(i + j) % 16][1], "area": shapes[(i + j) % 16][2],
                     "rle": shapes[(i + j) % 16][0], "keypoints": None}
                    for j in range(instances)
                ],
            )
            for i in range(ROW_GROUP_IMAGES)
        ]
    )  # fmt: skip
    writer = None if as_output else TrainingSetWriter(folder, tuple(categories), {"bench": images})
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, images, ROW_GROUP_IMAGES)):
        ids = [image_id(i) for i in range(start, min(images, start + ROW_GROUP_IMAGES))]
        rows = template.slice(0, len(ids))
        rows = rows.set_column(0, "image_id", pa.array(ids)).set_column(
            1, "uri", pa.array(f"/a/{i}.jpg" for i in ids)
        )
        if writer is not None:
            writer.add(rows)
        else:
            provenance = json.dumps({"categories": categories, "shard": shard}).encode()
            pq.write_table(
                rows.replace_schema_metadata({b"batchseg": provenance}), f"{folder}/{shard_object(shard)}"
            )
    if writer is not None:
        writer.close()
    assert template.schema.remove_metadata() == SCHEMA


def write_coco(path: str, images: int, instances: int) -> None:
    """The same images as a COCO instances JSON, written a thousand images at a time."""
    shapes = masks(16)
    with open(path, "w") as f:
        f.write('{"categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, '
                '{"id": 3, "name": "triangle"}], "images": [')  # fmt: skip
        for start in range(0, images, 1000):
            part = [{"id": i, "file_name": f"{image_id(i)}.jpg", "width": WIDTH, "height": HEIGHT}
                    for i in range(start, min(images, start + 1000))]  # fmt: skip
            f.write(("," if start else "") + json.dumps(part)[1:-1])
        f.write('], "annotations": [')
        for start in range(0, images, 1000):
            part = [
                {"id": i * instances + j, "image_id": i, "category_id": j % 3 + 1, "iscrowd": 0,
                 "bbox": shapes[(i + j) % 16][1], "area": shapes[(i + j) % 16][2],
                 "segmentation": {"size": [HEIGHT, WIDTH], "counts": shapes[(i + j) % 16][0]}}
                for i in range(start, min(images, start + 1000)) for j in range(instances)
            ]  # fmt: skip
            f.write(("," if start else "") + json.dumps(part)[1:-1])
        f.write("]}")


def first_step(kind: str, path: str, workers: int) -> dict[str, Any]:
    """In a fresh process: what a worker does before its first step (see the module's docstring)."""
    started = time.time()
    from batchseg.format.rle import decode_rle
    from batchseg.train.examples import open_training_set
    from batchseg.train.sampling import EpochOrder, Progress, examples_at, positions

    base = status("VmRSS")
    data = open_training_set("/images" if kind == "coco" else None, path)
    order = EpochOrder(data.chunk_sizes, seed=0, epoch=0)
    examples = examples_at(data, order, positions(Progress.start(len(order)).share(0, workers, BATCH)))
    batch = [next(examples) for _ in range(BATCH)]
    pixels = sum(
        int(decode_rle(s["counts"], e.height, e.width).sum()) for e in batch for s in e.segmentations
    )
    assert pixels > 0
    return {"seconds": time.time() - started, "peak_mib": status("VmHWM"), "base_mib": base}


def select(output: str, run: str) -> dict[str, Any]:
    """In a fresh process: the driver's materialisation of :data:`WHERE`."""
    started = time.time()
    from batchseg.train.parquet import select_training_set

    base = status("VmRSS")
    _, record = select_training_set(output, WHERE, run)
    return {"seconds": time.time() - started, "peak_mib": status("VmHWM"), "base_mib": base, **record}


def status(key: str) -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def measured(argv: list[str], cap_mib: float) -> dict[str, Any]:
    """Run this script's ``--child`` in a fresh process, stopped when its memory passes ``cap_mib``."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", *argv], stdout=subprocess.PIPE, text=True)
    started, peak = time.time(), 0.0
    while proc.poll() is None:
        try:
            text = pathlib.Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(
                peak, next(int(x.split()[1]) / 1024 for x in text.splitlines() if x.startswith("VmRSS:"))
            )
        except (OSError, StopIteration):
            pass
        if peak > cap_mib:
            proc.kill()
            proc.wait()
            return {"seconds": time.time() - started, "peak_mib": peak, "over_cap": True}
        time.sleep(0.1)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"{argv} failed ({proc.returncode})")
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="training set sizes, in images")
    parser.add_argument("--instances", type=int, default=5, help="instances (masks) per image")
    parser.add_argument(
        "--coco-max", type=int, default=100_000, help="the largest COCO JSON to write and load"
    )
    parser.add_argument("--workers", type=int, default=8, help="the worker count whose rank 0 is measured")
    parser.add_argument("--cap-mib", type=float, default=6000, help="a process over this is stopped")
    parser.add_argument(
        "--kinds", default="parquet,select,coco", help="which of parquet, select, coco to run"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = select(*rest) if kind == "select" else first_step(kind, rest[0], args.workers)
        print(json.dumps(result))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[tuple[str, int], dict[str, Any]] = {}
    print(f"{'images':>9}  {'data':<8} {'written s':>9} {'first step s':>12} {'peak MiB':>9}  goal")
    with tempfile.TemporaryDirectory() as tmp:
        for images in sizes:
            root = pathlib.Path(tmp) / str(images)
            kinds = [k for k in args.kinds.split(",") if k != "coco" or images <= args.coco_max]
            for kind in kinds:
                start = time.time()
                if kind == "parquet":
                    path = str(root / "train")
                    write_parquet(path, images, args.instances, as_output=False)
                    argv = ["parquet", path]
                elif kind == "select":
                    path = str(root / "output")
                    write_parquet(path, images, args.instances, as_output=True)
                    argv = ["select", path, str(root / "run")]
                else:
                    path = str(root / "annotations.json")
                    write_coco(path, images, args.instances)
                    argv = ["coco", path]
                written = time.time() - start
                result = results[(kind, images)] = measured(argv, args.cap_mib)
                peak = f">{args.cap_mib:.0f}" if result.get("over_cap") else f"{result['peak_mib']:.0f}"
                goal = ""
                if kind == "parquet":
                    flat = result["peak_mib"] / results[("parquet", sizes[0])]["peak_mib"]
                    goal = (f"first step <= {GOALS['first_step_s']:.0f} s; peak {flat:.2f} x the "
                            f"{sizes[0]:,}-image set's (goal <= {GOALS['flat']:.2f})")  # fmt: skip
                elif kind == "select":
                    assert (result["images"], result["instances"]) == (images, 2 * images), result
                    goal = (
                        f"{result['images']:,} images, {result['instances']:,} instances kept (driver, once)"
                    )
                print(f"{images:>9,}  {kind:<8} {written:>9.1f} {result['seconds']:>12.1f} {peak:>9}  {goal}")
                if kind != "parquet":  # the training set is kept for the next size's comparison only
                    subprocess.run(["rm", "-rf", path, str(root / "run")], check=True)
            subprocess.run(["rm", "-rf", str(root)], check=True)
    parquet = [results[("parquet", n)] for n in sizes if ("parquet", n) in results]
    if not parquet:
        return
    ok = all(r["seconds"] <= GOALS["first_step_s"] for r in parquet) and (
        parquet[-1]["peak_mib"] <= GOALS["flat"] * parquet[0]["peak_mib"]
    )
    print(
        f"Parquet goals (first step within {GOALS['first_step_s']:.0f} s, memory flat): {'met' if ok else 'NOT met'}"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
