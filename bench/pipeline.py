"""End-to-end efficiency: the whole ``segment`` job against a bare model loop on the same images.

Bare loop: the same model, weights, sizes and batch size, called as ``model(images)`` on images already
decoded in memory (what a user would write; it includes torchvision's own mask paste). Job: local Ray,
real JPEG files, fetch/decode in I/O threads, masks to RLE, Parquet written. Prints both throughputs and
their ratio, for the job's steady state (its shards' processing time) and for its whole wall time
(which adds Ray's start and the model load).
Usage: python bench/pipeline.py [--images 40] [--model maskrcnn_resnet50_fpn] [--min-size 512] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import torch

from batchseg import log
from batchseg.format.output import OutputDir
from batchseg.inference.models import build_model, resolve_weights
from batchseg.io.images import decode_image
from batchseg.segment.config import SegmentConfig
from batchseg.segment.driver import run_segment
from batchseg.train.synth import write_dataset


def bare_loop(config: SegmentConfig, uris: list[str]) -> float:
    weights = resolve_weights(config.weights, config.model)
    model = build_model(
        weights, min_size=config.min_size, max_size=config.max_size, box_score_thresh=config.score_threshold
    )
    images = [
        torch.from_numpy(decode_image(pathlib.Path(u).read_bytes())).permute(2, 0, 1).float() / 255
        for u in uris
    ]
    batch = config.batch_size
    with torch.inference_mode():
        model(images[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            model(images[i : i + batch])
        return len(images) / (time.perf_counter() - start)


def main() -> None:
    log.to_stderr()  # batchseg's progress, as the CLI prints it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--size", type=int, default=640, help="generated image side")
    parser.add_argument("--model", default="maskrcnn_resnet50_fpn")
    parser.add_argument("--min-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(f"{tmp}/data", args.images, seed=0, size=args.size)
        config = SegmentConfig(
            manifest=data.manifest,
            output=f"{tmp}/out",
            model=args.model,
            weights="none",
            min_size=args.min_size,
            max_size=args.min_size * 5 // 3,
            batch_size=args.batch_size,
            shard_size=max(1, args.images // 4),
        )
        raw = bare_loop(config, data.uris)
        print(f"bare model loop: {raw:.3f} img/s ({torch.get_num_threads()} torch threads)", flush=True)
        start = time.perf_counter()
        summary = run_segment(config)
        wall = time.perf_counter() - start
        busy = sum(r.seconds for r in OutputDir(config.output).records())
    steady = summary["images"] / busy
    print(f"segment job, steady state: {steady:.3f} img/s (shard processing {busy:.1f} s)")
    print(
        f"segment job, whole wall time: {summary['images'] / wall:.3f} img/s ({wall:.1f} s incl. Ray start, model load)"
    )
    print(
        f"efficiency (job / bare loop): steady state {steady / raw:.2f}, whole job {summary['images'] / wall / raw:.2f}"
    )
    print(
        f"{args.images} images ~{args.size}px, {args.model} (random weights) at min size {args.min_size}, "
        f"batch {args.batch_size}, {summary['instances'] / summary['images']:.1f} instances per image"
    )


if __name__ == "__main__":
    main()
