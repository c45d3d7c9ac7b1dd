"""Tiled inference: the grid, the ownership rule and the stitching (exact objects, no model), then huge
images through the shard processor with the shipped model: one row per image, instances in its pixels."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as coco_mask
import pytest

from batchseg.inference.paste import encode_crops
from batchseg.inference.tiling import DROP, KEEP, PIECE, Piece, Stitcher, TileGrid, starts


@pytest.mark.parametrize(
    ("height", "width", "size", "overlap"),
    [(1280, 1280, 160, 48), (1000, 333, 160, 48), (161, 900, 160, 0), (97, 50, 64, 63), (64, 64, 64, 16)],
)
def test_tiles_are_full_size_overlap_enough_and_their_cores_cover_the_image_once(
    height: int, width: int, size: int, overlap: int
) -> None:
    grid = TileGrid(height, width, size, overlap)
    owners = np.zeros((height, width), dtype=int)
    seen = np.zeros((height, width), dtype=int)
    for tile in grid.tiles:
        assert (tile.height, tile.width) == (min(size, height), min(size, width))
        assert 0 <= tile.top and tile.bottom <= height and 0 <= tile.left and tile.right <= width
        top, left, bottom, right = tile.core
        assert tile.top <= top < bottom <= tile.bottom and tile.left <= left < right <= tile.right
        owners[top:bottom, left:right] += 1
        seen[tile.top : tile.bottom, tile.left : tile.right] += 1
    assert (owners == 1).all()
    for axis, length in ((grid.rows, height), (grid.columns, width)):
        assert axis[0] == 0 and axis[-1] + min(size, length) == length
        assert all(b - a <= size - overlap for a, b in zip(axis, axis[1:], strict=False))
    assert starts(100, 160, 48) == [0]


def objects(rng: np.random.Generator, height: int, width: int, count: int) -> list[np.ndarray]:
    """Random ellipses and rectangles, small and large (some larger than any overlap), as full masks."""
    ys, xs = np.mgrid[:height, :width]
    shapes = []
    for _ in range(count):
        r = rng.integers(3, 70, size=2)
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        if rng.random() < 0.5:
            mask = ((ys - cy) / r[0]) ** 2 + ((xs - cx) / r[1]) ** 2 <= 1
        else:
            mask = (abs(ys - cy) <= r[0]) & (abs(xs - cx) <= r[1])
        if mask.any():
            shapes.append(mask)
    return shapes


def box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def stitched(grid: TileGrid, shapes: list[np.ndarray]) -> list[dict]:
    """What the stitcher makes of a perfect model: in each tile, each object's part there, its box the
    part's box."""
    stitcher = Stitcher(grid, limit=10_000)
    for tile in grid.tiles:
        parts = []
        for k, mask in enumerate(shapes):
            part = np.zeros_like(mask)
            part[tile.top : tile.bottom, tile.left : tile.right] = mask[
                tile.top : tile.bottom, tile.left : tile.right
            ]
            if part.any():
                parts.append((k, part))
        boxes = np.array([box_of(p) for _, p in parts]).reshape(-1, 4)
        kept, pieces = [], []
        for (k, part), fate, box in zip(parts, grid.fates(tile, boxes), boxes.tolist(), strict=True):
            x1, y1, x2, y2 = (int(v) for v in box)
            crop = (y1, x1, part[y1:y2, x1:x2])
            instance = {"category_id": k, "score": 0.9, "bbox": [x1, y1, x2 - x1, y2 - y1], "keypoints": None}
            if fate == KEEP:
                ((rle, area),) = encode_crops([crop], grid.height, grid.width)
                kept.append(instance | {"rle": rle, "area": area})
            elif fate == PIECE:
                pieces.append(Piece(tile.index, instance, (x1, y1, x2, y2), crop))
            else:
                assert fate == DROP
        stitcher.add(kept, pieces)
    return stitcher.instances()


def test_a_perfect_models_tiles_stitch_into_each_object_exactly_once() -> None:
    """Objects smaller than the overlap are kept once by the tile whose core holds them; larger ones,
    which no tile sees whole, are merged from their pieces: every object comes back with its exact mask,
    none twice, none cut (objects apart from each other, as a model separates them)."""
    rng = np.random.default_rng(5)
    height, width = 300, 420
    grid = TileGrid(height, width, 96, 32)
    for _ in range(6):
        shapes = []
        taken = np.zeros((height, width), dtype=bool)
        for mask in objects(rng, height, width, 25):
            grown = mask.copy()
            grown[1:] |= mask[:-1]
            grown[:, 1:] |= grown[:, :-1]
            if not (grown & taken).any():  # apart: no two objects touch
                shapes.append(mask)
                taken |= mask
        found = stitched(grid, shapes)
        want = sorted(
            coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode() for m in shapes
        )
        assert sorted(i["rle"] for i in found) == want
        assert sorted(i["area"] for i in found) == sorted(int(m.sum()) for m in shapes)
        for instance in found:
            mask = shapes[instance["category_id"]]
            x1, y1, x2, y2 = box_of(mask)
            assert instance["bbox"] == [x1, y1, x2 - x1, y2 - y1]
