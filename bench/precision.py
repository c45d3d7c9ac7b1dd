"""Boxes under mixed precision: the shipped model's boxes with CPU bf16 autocast (the same autocast policy as
CUDA's) against fp32, on shapes images scaled to about 1000 px at --min-size 1024, and segm AP fp32 vs
bf16 on the demo's held-out images at the model's own resize.

Prints the mean |box difference| in pixels, the share of bf16 box coordinates at 512 px or more that lie
on a multiple of 4 px (bf16's grid there), and the goals beside them.
On a CPU without bf16 units (AVX512-BF16, AMX) torch emulates bf16: about two minutes an image at
--min-size 1024 on a 2-core VM; --device cuda on a GPU.
Usage: python bench/precision.py [--images 8] [--side 1000] [--min-size 1024] [--demo-images 50] [--device cpu]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: the comparison
from batchseg.demo import HELD_OUT_SEED, SHAPES_MODEL
from batchseg.inference.models import resolve_weights
from batchseg.inference.predictor import Predictor
from batchseg.train.data import CocoInstances
from batchseg.train.engine import evaluate_model
from batchseg.train.synth import write_dataset
from tests.agreement import agreement, scaled_shapes

GOAL_PX = 2.0  # bf16 boxes within this many pixels of fp32 on average
GOAL_GRID = 0.5  # and well under all of them on bf16's grid (fp32 boxes: about a quarter, at image borders)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--side", type=int, default=1000, help="scaled images' side, about")
    parser.add_argument("--min-size", type=int, default=1024)
    parser.add_argument("--demo-images", type=int, default=50, help="0: no AP")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = resolve_weights(str(SHAPES_MODEL))
    images = scaled_shapes(args.images, seed=0, side=args.side)
    sizes = [(int(p.shape[0]), int(p.shape[1])) for p in images]
    options = {"min_size": args.min_size, "max_size": 2 * args.min_size, "device": args.device}
    runs = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor.from_weights(weights, precision=precision, **options)
        start = time.perf_counter()
        runs[precision] = predictor(images)
        seconds = time.perf_counter() - start
        print(f"{precision}: {args.images} images in {seconds:.1f} s on {args.device}", flush=True)
    found = agreement(runs["fp32"], runs["bf16"], sizes)
    print(f"bf16 against fp32: {found.line()}", flush=True)
    print(
        f"bf16 boxes: {found.box_px:.2f} px from fp32 (goal <= {GOAL_PX}), {found.on_grid:.0%} on bf16's grid "
        f"(goal < {GOAL_GRID:.0%}); images of about {args.side} px, {sizes[0][1]}x{sizes[0][0]} the first, "
        f"at --min-size {args.min_size}",
        flush=True,
    )
    if args.demo_images:
        with tempfile.TemporaryDirectory() as tmp:
            data = write_dataset(tmp, args.demo_images, seed=HELD_OUT_SEED, size=128)
            dataset = CocoInstances(data.images, data.annotations)
            model = Predictor.from_weights(weights, device=args.device).model
            for precision in ("fp32", "bf16"):
                metrics = evaluate_model(model, dataset, precision=precision)
                print(
                    f"demo images ({args.demo_images}, the model's own resize), {precision}: segm AP "
                    f"{metrics['segm']['AP']:.3f}, bbox AP {metrics['bbox']['AP']:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
