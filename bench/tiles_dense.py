"""Stitching a dense tiled image: the seconds one image takes when each tile holds thousands of pieces.

A random-pixel image segmented tiled (``--tile 64 --tile-overlap 16``, each tile at native scale) by a
box-only model with random weights at ``--score-threshold 0``: each tile gives up to the tiled default of
10,000 detections, nearly all cut by an edge, so stitching compares thousands of pieces with thousands (a
dense slide or a low threshold does the same). The model's own forward passes are about 3 s of it here.
Usage: python bench/tiles_dense.py [--side 112] [--model fasterrcnn_resnet50_fpn_v2]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from batchseg.segment.ray_data import Segmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=112)
    parser.add_argument("--model", default="fasterrcnn_resnet50_fpn_v2")
    args = parser.parse_args()
    pixels = (np.random.default_rng(3).random((args.side, args.side, 3)) * 255).astype("uint8")
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    options = {"model": args.model, "weights": "none", "min_size": 64, "max_size": 64, "score_threshold": 0.0}
    tiled = Segmenter(device="cpu", tile=64, tile_overlap=16, **options)
    started = time.perf_counter()
    (row,) = tiled({"bytes": np.array([png.getvalue()], dtype=object)}).to_pylist()
    seconds = time.perf_counter() - started
    print(f"{args.model}, {args.side} x {args.side} px in tiles of 64: {row['status']}, "
          f"{len(row['instances'])} instances, {seconds:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
