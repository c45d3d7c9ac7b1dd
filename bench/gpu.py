"""GPU throughput: raw model loops (fp32, bf16) against batchseg's shard pipeline on the same images.

Raw loops run on images already decoded and resident on the device: ``model(images)`` as torchvision
ships it (its postprocess pastes every mask full-size), and the same forward without that paste (what
batchseg runs before its crop-based RLE). The pipeline is ``ShardProcessor``, the code every Ray actor
runs: JPEG files read in I/O threads, decoded in batches on the GPU, the model, masks to RLE on the
device, rows to Parquet. Needs no Ray.
Each model runs in two mask regimes, since the mask work grows with the runs per mask: its random mask
head (noisy masks, many runs), then a "compact" head (every mask fills its box, as for solid objects).
Prints runs per instance, and the goals beside the ratios. Then the shipped model's bf16 boxes against
fp32's on shapes images of about 1000 px at --min-size 1024 (bench/precision.py's measure, on the device).
Usage: python bench/gpu.py [--images 200] [--size 560] [--batch-size 4] [--models maskrcnn_resnet50_fpn_v2,...]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: the comparison
from batchseg.analysis.results import open_results
from batchseg.demo import SHAPES_MODEL
from batchseg.format.output import Resume
from batchseg.inference.models import build_model, resolve_weights
from batchseg.inference.predictor import Predictor
from batchseg.io.images import decode_image
from batchseg.io.manifest import Plan, Shard
from batchseg.segment.config import SegmentConfig
from batchseg.segment.job import Job
from batchseg.segment.processor import ShardProcessor
from batchseg.train.synth import write_dataset
from tests.agreement import agreement, scaled_shapes

# End to end, in both mask regimes: at least this fraction of the raw loop without paste, and this many
# times torchvision's own forward (bf16, on a GPU).
GOALS = {"maskrcnn_resnet50_fpn_v2": (0.90, 1.5), "maskrcnn_resnet50_fpn": (0.95, None)}


def timed(
    run: Any, images: list[torch.Tensor], batch: int, dtype: torch.dtype | None, warm_up: int = 2
) -> float:
    device = images[0].device
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for i in range(0, warm_up * batch, batch):
            run(images[i : i + batch])
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            run(images[i : i + batch])
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def compact_head(model: Any) -> None:
    """Every mask fills its box (one run of ones per column), as a trained head gives for solid objects: the
    mask logits' final layer with zero weights and a positive bias."""
    layer = model.roi_heads.mask_predictor.mask_fcn_logits
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(4.0)


def runs_per_instance(output: str) -> float:
    """Average number of COCO run lengths per instance in an output (each run length's last character is
    the one without the 0x20 'more' bit)."""
    instances = open_results(output).to_table(columns=["instances"]).column("instances")
    rles = [i["rle"] for row in instances.to_pylist() for i in row or [] if i["rle"] is not None]
    chars = np.frombuffer("".join(rles).encode(), dtype=np.uint8)
    return int((((chars - 48) & 0x20) == 0).sum()) / max(len(rles), 1)


def bench_model(name: str, uris: list[str], tmp: str, args: argparse.Namespace) -> None:
    weights = resolve_weights("none", name)
    options = {"score_threshold": args.score_threshold, "max_instances": args.max_instances}
    tensors = [
        torch.from_numpy(decode_image(pathlib.Path(u).read_bytes())).permute(2, 0, 1).to(args.device).float()
        / 255
        for u in uris
    ]
    model = build_model(
        weights, box_score_thresh=args.score_threshold, box_detections_per_img=args.max_instances
    ).to(args.device)
    predictor = Predictor.from_weights(weights, device=args.device, precision="fp32", **options)
    config = SegmentConfig(
        manifest=f"{tmp}/data/manifest.csv",
        output=f"{tmp}/out-{name}",
        model=name,
        weights="none",
        batch_size=args.batch_size,
        shard_size=len(uris),
        **options,
    )
    job = Job(
        config,
        weights,
        Plan(config.manifest, len(uris), len(uris)),
        {"bench": True},
        Resume(1, frozenset(), (), ()),
    )
    processor = ShardProcessor.for_job(job, device=args.device)
    ids = [str(i) for i in range(len(uris))]
    goal_paste, goal_torchvision = GOALS.get(name, (None, None))
    for regime in ("random", "compact"):
        if regime == "compact":
            for m in (model, predictor.model, processor.predictor.model):
                compact_head(m)
        label = f"{name} [{regime} masks]"
        warm_up = 2 if regime == "random" else 0  # the same shapes again: already warm
        rows = []
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            if dtype is not None and not args.device.startswith("cuda"):
                continue
            with_paste = timed(model, tensors, args.batch_size, dtype, warm_up)
            without = timed(predictor.forward, tensors, args.batch_size, dtype, warm_up)
            rows.append((precision, with_paste, without))
            print(
                f"{label} raw loop {precision}: {with_paste:7.2f} img/s torchvision forward, "
                f"{without:7.2f} img/s without its full-size paste",
                flush=True,
            )
        if regime == "random" and args.device.startswith("cuda"):
            predictor.model.to(memory_format=torch.channels_last)
            channels_last = timed(predictor.forward, tensors, args.batch_size, torch.bfloat16)
            predictor.model.to(memory_format=torch.contiguous_format)
            print(
                f"{label} raw loop bf16 without paste, channels_last weights: {channels_last:7.2f} img/s",
                flush=True,
            )
        if warm_up:
            processor.process(Shard(0, ids[: 2 * args.batch_size], uris[: 2 * args.batch_size]))
        start = time.perf_counter()
        record = processor.process(Shard(0, ids, uris))
        e2e = len(uris) / (time.perf_counter() - start)
        print(
            f"{label} end to end ({processor.predictor.precision}, decode on "
            f"{'device' if processor.decode_on_device else 'CPU'}, JPEG files -> Parquet): {e2e:7.2f} img/s; "
            f"{record.instances / len(uris):.1f} instances/image, {runs_per_instance(config.output):.0f} "
            "runs/instance",
            flush=True,
        )
        precision, torchvision, without = rows[-1]
        print(
            f"{label} end to end / raw {precision} without paste: {e2e / without:.2f}"
            + (f" (goal >= {goal_paste:.2f})" if goal_paste else "")
            + f"; / raw {precision} torchvision forward: {e2e / torchvision:.2f}x"
            + (f" (goal >= {goal_torchvision:.1f}x)" if goal_torchvision and precision == "bf16" else ""),
            flush=True,
        )


def bench_boxes(device: str, images: int = 16) -> None:
    """bf16 boxes against fp32's: the shipped model at --min-size 1024 on images of about 1000 px."""
    pixels = scaled_shapes(images, seed=0, side=1000)
    weights = resolve_weights(str(SHAPES_MODEL))
    options = {"min_size": 1024, "max_size": 2048, "device": device}
    runs = [Predictor.from_weights(weights, precision=p, **options)(pixels) for p in ("fp32", "bf16")]
    found = agreement(*runs, [p.shape[:2] for p in pixels])
    print(
        f"shipped model, {images} images of about 1000 px at --min-size 1024, bf16 against fp32: {found.line()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument(
        "--size", type=int, default=560, help="generated image side (COCO images are ~640x480)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--models", default="maskrcnn_resnet50_fpn_v2,maskrcnn_resnet50_fpn")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--score-threshold", type=float, default=0.9)
    parser.add_argument("--max-instances", type=int, default=20)
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    # Random weights (nothing can be downloaded there); the score threshold and instance cap keep the
    # instance count near a COCO model's on photos, so the mask work is of a realistic size.
    with tempfile.TemporaryDirectory() as tmp:
        uris = write_dataset(f"{tmp}/data", args.images, seed=0, size=args.size).uris
        for name in args.models.split(","):
            bench_model(name, uris, tmp, args)
    print(
        f"{args.images} images of about {args.size}x{args.size} (resized by the model to 800 on the short "
        f"side), batch {args.batch_size}"
    )
    if args.device.startswith("cuda"):  # bf16 on a CPU without bf16 units takes minutes: bench/precision.py
        bench_boxes(args.device)


if __name__ == "__main__":
    main()
