"""GPU throughput: the bare model loop (fp32, bf16) against batchseg's shard pipeline on the same images.

The raw loop runs the model on images already decoded and resident on the device; the pipeline reads
JPEG files, decodes them in I/O threads, runs the same model, encodes masks as RLE and writes the
shard's Parquet file (``ShardProcessor``, the code every Ray actor runs). Needs no Ray.
Usage: python bench/gpu.py [--images 200] [--size 560] [--batch-size 4] [--device cuda]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np
import torch

from batchseg.images import decode_image
from batchseg.manifest import Plan, Shard
from batchseg.models import build_model, resolve_weights
from batchseg.segment import Job, SegmentConfig, ShardProcessor
from batchseg.synth import write_dataset


def raw_loop(
    model: torch.nn.Module, images: list[torch.Tensor], batch: int, dtype: torch.dtype | None
) -> float:
    device = images[0].device
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for i in range(0, 2 * batch, batch):  # warm-up
            model(images[i : i + batch])
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            out = model(images[i : i + batch])
            for o in out:  # what any user of the masks must do at least: threshold them
                (o["masks"] > 0.5).any()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument(
        "--size", type=int, default=560, help="generated image side (COCO images are ~640x480)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--model", default="maskrcnn_resnet50_fpn_v2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--score-threshold", type=float, default=0.9)
    parser.add_argument("--max-instances", type=int, default=20)
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    # Random weights (no download here); the score threshold and instance cap keep the instance count
    # near a real COCO model's on real photos, so mask work is of a realistic size.
    weights = resolve_weights("none", args.model)
    options = {"box_score_thresh": args.score_threshold, "box_detections_per_img": args.max_instances}
    with tempfile.TemporaryDirectory() as tmp:
        uris = write_dataset(f"{tmp}/data", args.images, seed=0, size=args.size).uris
        pixels = [decode_image(pathlib.Path(u).read_bytes()) for u in uris]
        tensors = [torch.from_numpy(p).to(args.device).permute(2, 0, 1).float().div(255) for p in pixels]
        model = build_model(weights, **options).to(args.device)
        fp32 = raw_loop(model, tensors, args.batch_size, None)
        print(f"raw model loop fp32: {fp32:8.2f} img/s", flush=True)
        bf16 = None
        if args.device.startswith("cuda"):
            bf16 = raw_loop(model, tensors, args.batch_size, torch.bfloat16)
            print(f"raw model loop bf16: {bf16:8.2f} img/s", flush=True)
        del model, tensors
        config = SegmentConfig(manifest=f"{tmp}/data/manifest.csv", output=f"{tmp}/out", model=args.model,
                               weights="none", score_threshold=args.score_threshold, max_instances=args.max_instances,
                               batch_size=args.batch_size, shard_size=args.images)  # fmt: skip
        plan = Plan(config.manifest, len(uris), args.images, "bench")
        job = Job(config, weights, plan, {"bench": True}, frozenset())
        processor = ShardProcessor(job, device=args.device)
        ids = [f"{i}" for i in range(len(uris))]
        processor.process(Shard(0, ids[: 2 * args.batch_size], uris[: 2 * args.batch_size]))  # warm-up
        start = time.perf_counter()
        record = processor.process(Shard(0, ids, uris))
        e2e = len(uris) / (time.perf_counter() - start)
        best_raw = bf16 or fp32
        print(
            f"end to end ({processor.predictor.precision}, JPEG files -> Parquet): {e2e:8.2f} img/s",
            flush=True,
        )
        print(f"instances per image: {record['instances'] / len(uris):.1f}; "
              f"end to end / raw {processor.predictor.precision}: {e2e / best_raw:.2f}")  # fmt: skip
        print(f"images {len(uris)}, mean size {np.mean([p.shape[1] for p in pixels]):.0f}x"
              f"{np.mean([p.shape[0] for p in pixels]):.0f}, batch {args.batch_size}, model {args.model}")  # fmt: skip


if __name__ == "__main__":
    main()
