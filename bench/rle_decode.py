"""Decoding masks on the host: batchseg's ``decode_rle`` against ``pycocotools.mask.decode``, same RLEs.

The read side (``ImageResult.masks``, render, report) decodes each instance's COCO RLE into an H x W bool
mask. pycocotools does it in C; batchseg's is numpy (``np.repeat`` of the run lengths, a transposed view)
after a Python loop over the compressed string. Checks that both give the same masks, then prints the
median time per mask of each, for simple masks (discs) and ragged ones (noise: many short runs).
Usage: python bench/rle_decode.py [--masks 200] [--height 800] [--width 1333] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import pycocotools.mask as coco_mask

from batchseg.format.rle import decode_rle, encode_rle


def discs(rng: np.random.Generator, n: int, h: int, w: int) -> list[np.ndarray]:
    yy, xx = np.ogrid[:h, :w]
    out = []
    for _ in range(n):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(8, min(h, w) // 4)
        out.append(((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
    return out


def ragged(rng: np.random.Generator, n: int, h: int, w: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        mask = np.zeros((h, w), bool)
        y, x = rng.integers(0, h - 64), rng.integers(0, w - 64)
        mask[y : y + 64, x : x + 64] = rng.random((64, 64)) < 0.5
        out.append(mask)
    return out


def median_ms(fn: Callable[[], object], repeat: int, count: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=200)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    h, w, n = args.height, args.width, args.masks
    for name, make in (("discs", discs), ("ragged 64x64 noise", ragged)):
        counts = [encode_rle(m) for m in make(rng, n, h, w)]
        ours = [decode_rle(c, h, w) for c in counts]
        theirs = [coco_mask.decode({"size": [h, w], "counts": c}).astype(bool) for c in counts]
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True)), "masks differ"
        mean_runs = statistics.mean(len(c) for c in counts)
        batchseg = median_ms(lambda counts=counts: [decode_rle(c, h, w) for c in counts], args.repeat, n)
        coco = median_ms(
            lambda counts=counts: [
                coco_mask.decode({"size": [h, w], "counts": c}).astype(bool) for c in counts
            ],
            args.repeat,
            n,
        )
        print(
            f"{name:<20} {h}x{w}, {mean_runs:6.0f} chars of RLE a mask: batchseg {batchseg:6.3f} ms, "
            f"pycocotools {coco:6.3f} ms a mask (same masks; goal: the faster one is the one used)"
        )


if __name__ == "__main__":
    main()
