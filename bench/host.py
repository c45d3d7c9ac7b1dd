"""Host time per image for everything but the model: reading, masks to run lengths, COCO strings and
instance dicts, Parquet rows.

Synthetic detections as a Mask R-CNN gives them (boxes of 30 to 300 px sides in 800x800 images, 28x28 mask
probabilities), in two regimes: "random" (noisy probabilities, as in bench/masks.py: many runs per mask)
and "compact" (every mask fills its box, as a mask head with zero final weights and a positive bias gives).
Each stage is the real code, one torch thread:
  0. read: ``ImageLoader`` as a GPU actor runs it on JPEG files of 640x480 on local disk (fetch, format
     and size check, EXIF orientation, left encoded for the device): CPU time of this process per image
     (an S3 GET adds botocore's own, which ``bench/storage.py`` reports);
  1. device stage, here on the CPU: ``Predictor.to_host`` (crop, threshold, run lengths, the copies);
  2. host stage after the copy: ``Predictor.instances`` (COCO strings, then the instance dicts);
  3. Parquet: ``records.ok_row`` and ``records.to_parquet`` of a shard of ``--images`` images.
Usage: python bench/host.py [--images 100] [--instances 20] [--size 800] [--batch-size 4] [--repeat 5]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from storage import photo_like_jpegs

from batchseg.format.records import ok_row, to_parquet
from batchseg.inference.models import resolve_weights
from batchseg.inference.paste import rle_strings
from batchseg.inference.predictor import Detections, Predictor
from batchseg.io.images import EncodedJpeg
from batchseg.io.loader import ImageLoader

HOST_GOAL_US = 2000  # host stages 2 + 3, compact masks, one core


def detections(
    rng: np.random.Generator, regime: str, images: int, instances: int, size: int
) -> list[Detections]:
    result = []
    for _ in range(images):
        sides = rng.uniform(30, 300, size=(instances, 2))
        corners = rng.uniform(0, 1, size=(instances, 2)) * (size - sides)
        boxes = np.concatenate([corners, corners + sides], axis=1)
        if regime == "random":
            masks = torch.sigmoid(torch.from_numpy(rng.normal(0, 3, size=(instances, 1, 28, 28))).float())
        else:
            masks = torch.ones((instances, 1, 28, 28))
        out = {
            "boxes": torch.from_numpy(boxes).float(),
            "scores": torch.from_numpy(np.sort(rng.uniform(0.5, 1, instances))[::-1].copy()).float(),
            "labels": torch.from_numpy(rng.integers(1, 91, instances)),
            "masks": masks,
        }
        result.append((out, size, size))
    return result


def read_stage(images: int) -> float:
    """CPU seconds per image of this process for an actor's read stage over local JPEG files."""
    jpegs = photo_like_jpegs(20)
    with tempfile.TemporaryDirectory() as tmp:
        uris = []
        for i in range(images):
            path = pathlib.Path(tmp, f"{i:05d}.jpg")
            path.write_bytes(jpegs[i % len(jpegs)])
            uris.append(str(path))
        loader = ImageLoader(keep_jpegs=True)
        list(loader(uris[:100]))  # warm-up
        start = time.process_time()
        loaded = list(loader(uris))
        seconds = time.process_time() - start
    assert all(isinstance(x, EncodedJpeg) for x in loaded)
    return seconds / images


def median_seconds(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_regime(predictor: Predictor, regime: str, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    n, b = args.images, args.batch_size
    batches = [detections(rng, regime, min(b, n - i), args.instances, args.size) for i in range(0, n, b)]
    on_host = [predictor.to_host(batch) for batch in batches]
    rows = [
        ok_row(str(i), f"s3://bucket/{i}.jpg", args.size, args.size, instances)
        for i, instances in enumerate(x for f in on_host for x in predictor.instances(f))
    ]
    per_image = 1e6 / n
    device = median_seconds(lambda: [predictor.to_host(batch) for batch in batches], args.repeat)
    host = median_seconds(lambda: [predictor.instances(f) for f in on_host], args.repeat)
    strings = median_seconds(lambda: [rle_strings(f.runs) for f in on_host if f.runs], args.repeat)
    parquet = median_seconds(
        lambda: to_parquet(
            [ok_row(r["image_id"], r["uri"], r["width"], r["height"], r["instances"]) for r in rows],
            {"bench": True},
        ),
        args.repeat,
    )
    runs = np.concatenate([f.runs.lengths for f in on_host if f.runs])
    total = (host + parquet) * per_image
    goal = f"goal: at most {HOST_GOAL_US} us per image for compact masks on one core"
    print(f"{regime} masks: {runs.mean():.0f} runs per instance (median {np.median(runs):.0f})")
    print(f"  1. device stage, on the CPU here (Predictor.to_host) {device * per_image:7.0f} us/image")
    print(f"  2. host: COCO strings + dicts (Predictor.instances)  {host * per_image:7.0f} us/image")
    print(f"     of which the COCO strings (rle_strings)          {strings * per_image:7.0f} us/image")
    print(f"  3. Parquet: ok_row + to_parquet, a shard of {n:<4}    {parquet * per_image:7.0f} us/image")
    print(f"  host total (2 + 3)                                  {total:7.0f} us/image  ({goal})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="images per shard")
    parser.add_argument("--instances", type=int, default=20, help="instances per image")
    parser.add_argument("--size", type=int, default=800, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    predictor = Predictor.from_weights(resolve_weights("none", "maskrcnn_resnet50_fpn"), device="cpu")
    print(
        f"{args.images} images of {args.size}x{args.size}, {args.instances} instances each, "
        f"batches of {args.batch_size}, 1 torch thread, median of {args.repeat}"
    )
    read = read_stage(2000)
    print(f"  0. read: local JPEG 640x480, fetch + header + EXIF (CPU)  {read * 1e6:7.0f} us/image")
    for regime in ("random", "compact"):
        bench_regime(predictor, regime, args)


if __name__ == "__main__":
    main()
