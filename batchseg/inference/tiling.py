"""Huge images in tiles: the grid of overlapping tiles, which tile owns each instance, and one image's tiles
stitched back into its instances (the model sees each tile as an image).

The rule (StarDist's, for ``predict_instances_big``, extended to objects larger than the overlap): every
tile has a *core*, the part of the image nearer to it than to its neighbours (cores split each overlap at
its middle, so they cover the image exactly once). A detection whose box touches no inner edge of its tile
was seen whole; it is kept by the tile whose core holds its box's centre, so an object seen whole by two
tiles is kept once. (If a tile sees a box whole, so does the tile whose core holds its centre: the box lies
on the centre's side of the overlap's middle, within the overlap.) A detection cut by an inner edge is
dropped when another tile holds its whole box and reaches past each edge that cut it: that tile sees more
of the object (all of it, or a larger part). The cut parts no tile sees more of are the pieces of objects
larger than the overlap; pieces from neighbouring tiles whose masks (boxes, for a box-only model) agree
where both tiles see them are merged into one instance. Only boxes decide ownership, so it costs nothing
per pixel; masks are compared for the few pieces only.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms

from batchseg.inference.paste import encode_crops

# A box this close (pixels) to an inner edge of its tile is taken as cut by it: a box the model draws at
# an object that leaves the tile ends on the edge, give or take its regression's fraction of a pixel.
EDGE = 2.0
# Two pieces are one object when their masks' intersection over union, where both tiles see, is at least
# this: parts of one object agree pixel for pixel there; neighbouring objects barely overlap.
MERGE_IOU = 0.5

# The overlap of two boxes of one category above which they are one object: torchvision's detection
# models' own (``box_nms_thresh``), applied across tiles as each model applies it within one.
NMS_IOU = 0.5

KEEP, DROP, PIECE = 0, 1, 2  # a detection's fate (TileGrid.fates)

Crop = tuple[int, int, np.ndarray]  # top, left (image pixels) and a bool mask


@dataclass(frozen=True)
class Tile:
    """A window of the image (``top, left, height, width``, in its pixels) and the part of the image it
    owns, ``core = (top, left, bottom, right)`` (bottom and right exclusive)."""

    index: int
    top: int
    left: int
    height: int
    width: int
    core: tuple[int, int, int, int]

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width


def starts(length: int, size: int, overlap: int) -> list[int]:
    """Where tiles of ``size`` start along an axis of ``length`` pixels, neighbours sharing at least
    ``overlap``; the last one is moved back to end at the edge (so every tile is full size) and then
    shares more. One tile (at 0) when the axis fits it."""
    if length <= size:
        return [0]
    step = size - overlap
    count = -(-(length - size) // step) + 1
    return [min(i * step, length - size) for i in range(count)]


def _cores(first: list[int], size: int, length: int) -> list[tuple[int, int]]:
    """Each tile's owned span along an axis: from the middle of its overlap with the one before to the
    middle of its overlap with the one after."""
    size = min(size, length)
    cuts = [0] + [(a + size + b) // 2 for a, b in itertools.pairwise(first)] + [length]
    return list(itertools.pairwise(cuts))


@dataclass(frozen=True)
class TileGrid:
    """The tiles of a ``height x width`` image, row by row (see :func:`starts`)."""

    height: int
    width: int
    size: int
    overlap: int
    rows: tuple[int, ...] = field(init=False)
    columns: tuple[int, ...] = field(init=False)
    tiles: tuple[Tile, ...] = field(init=False)

    def __post_init__(self) -> None:
        rows, columns = (
            starts(self.height, self.size, self.overlap),
            starts(self.width, self.size, self.overlap),
        )
        row_cores, column_cores = _cores(rows, self.size, self.height), _cores(columns, self.size, self.width)
        h, w = min(self.size, self.height), min(self.size, self.width)
        tiles = [
            Tile(r * len(columns) + c, top, left, h, w, (core_top, core_left, core_bottom, core_right))
            for r, (top, (core_top, core_bottom)) in enumerate(zip(rows, row_cores, strict=True))
            for c, (left, (core_left, core_right)) in enumerate(zip(columns, column_cores, strict=True))
        ]
        object.__setattr__(self, "rows", tuple(rows))
        object.__setattr__(self, "columns", tuple(columns))
        object.__setattr__(self, "tiles", tuple(tiles))

    def neighbours(self, tile: Tile) -> list[Tile]:
        """The other tiles that share pixels with ``tile``."""
        h, w = tile.height, tile.width
        rows = [r for r, top in enumerate(self.rows) if top < tile.bottom and top + h > tile.top]
        columns = [c for c, left in enumerate(self.columns) if left < tile.right and left + w > tile.left]
        return [
            self.tiles[r * len(self.columns) + c]
            for r in rows
            for c in columns
            if r * len(self.columns) + c != tile.index
        ]

    def fates(self, tile: Tile, boxes: np.ndarray) -> np.ndarray:
        """:data:`KEEP`, :data:`DROP` or :data:`PIECE` for each of ``tile``'s detections, whose ``boxes``
        (``N x 4``, ``x1 y1 x2 y2``) are in the image's pixels (see the module's rule)."""
        x1, y1, x2, y2 = boxes[:, :4].T
        cut = {
            "left": (tile.left > 0) & (x1 <= tile.left + EDGE),
            "right": (tile.right < self.width) & (x2 >= tile.right - EDGE),
            "top": (tile.top > 0) & (y1 <= tile.top + EDGE),
            "bottom": (tile.bottom < self.height) & (y2 >= tile.bottom - EDGE),
        }
        any_cut = cut["left"] | cut["right"] | cut["top"] | cut["bottom"]
        core_top, core_left, core_bottom, core_right = tile.core
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        owned = (core_left <= cx) & (cx < core_right) & (core_top <= cy) & (cy < core_bottom)
        seen_better = np.zeros(len(boxes), dtype=bool)
        for other in self.neighbours(tile) if any_cut.any() else []:
            holds = (other.left <= x1) & (x2 <= other.right) & (other.top <= y1) & (y2 <= other.bottom)
            past = (
                (~cut["left"] | (other.left < tile.left))
                & (~cut["right"] | (other.right > tile.right))
                & (~cut["top"] | (other.top < tile.top))
                & (~cut["bottom"] | (other.bottom > tile.bottom))
            )
            seen_better |= holds & past
        return np.where(any_cut, np.where(seen_better, DROP, PIECE), np.where(owned, KEEP, DROP))


@dataclass(frozen=True)
class Piece:
    """A detection cut by its tile that no other tile sees more of: its instance (box and keypoints in the
    image's pixels; ``rle`` and ``area`` still to be made), its box, and its mask cut to the tile (None for
    a box-only model)."""

    tile: int
    instance: dict[str, Any]
    box: tuple[float, float, float, float]
    mask: Crop | None


class Stitcher:
    """One tiled image's instances, gathered tile by tile (from any thread), then stitched: the instances
    kept whole, and the pieces merged (:func:`piece_groups`, :func:`merged_instances`); the best ``limit``
    by score.

    Pieces are merged as the tiles come: a group of pieces is final once every tile next to one of its
    pieces is done (no later piece can join it), and is then encoded and its masks let go. Tiles come
    row by row, so about two rows of tiles' pieces are held, whatever the image's size."""

    def __init__(self, grid: TileGrid, limit: int) -> None:
        self.grid = grid
        self.limit = limit
        self.kept: list[dict[str, Any]] = []
        self.pieces: list[Piece] = []  # not yet merged: some tile next to them is still to come
        self.merged: list[dict[str, Any]] = []
        self.near: list[int] = []  # kept instances whose box reaches into a neighbour's core
        self.done = [False] * len(grid.tiles)
        self.remaining = len(grid.tiles)
        self.since_settled = 0
        self.failed = False
        self.lock = threading.Lock()

    def add(self, tile: Tile, kept: list[dict[str, Any]], pieces: list[Piece]) -> bool:
        """One tile's results; whether it was the image's last one (and none failed): then it is time for
        :meth:`instances`."""
        with self.lock:
            self.kept.extend(kept)
            self.near.extend(
                i for i, instance in enumerate(kept, len(self.kept) - len(kept)) if self._near(tile, instance)
            )
            self.pieces.extend(pieces)
            self.done[tile.index] = True
            self.remaining -= 1
            self.since_settled += 1
            if self.failed:
                self.pieces = []
            elif self.remaining == 0 or self.since_settled >= len(self.grid.columns):
                self._settle()  # once a row of tiles: each settling compares the pending pieces again
            return self.remaining == 0 and not self.failed

    def _settle(self) -> None:
        """Merge and encode the groups of pieces no later tile can add to; keep the others pending."""
        self.since_settled = 0
        if not self.pieces:
            return
        final: list[list[Piece]] = []
        pending: list[Piece] = []
        for group in piece_groups(self.pieces, self.grid):
            if all(self._settled(p.tile) for p in group):
                final.append(group)
            else:
                pending.extend(group)
        self.merged.extend(merged_instances(final, self.grid))
        self.pieces = pending

    def _settled(self, index: int) -> bool:
        """Whether tile ``index`` and every tile next to it are done."""
        tile = self.grid.tiles[index]
        return self.done[index] and all(self.done[other.index] for other in self.grid.neighbours(tile))

    def fail(self) -> bool:
        """Mark the image failed (one of its tiles could not be read or run); whether it was the first
        failure, which gives the image its error row."""
        with self.lock:
            first, self.failed = not self.failed, True
            self.pieces = []
            return first

    def instances(self) -> list[dict[str, Any]]:
        """The image's instances, best score first, at most ``limit``.

        One object seen whole by two tiles is kept by both when the two boxes the model drew for it put
        its centre on either side of the cores' border (a fraction of a pixel may do). Among the kept
        instances whose boxes reach into a neighbour's core (the only ones that can be kept twice), the
        model's own rule then applies across tiles: of boxes of one category overlapping by more than
        ``NMS_IOU``, the best is kept, as the model keeps one within a tile."""
        drop = set(self.near) - set(self._best(self.near))
        kept = [instance for i, instance in enumerate(self.kept) if i not in drop]
        return sorted(kept + self.merged, key=lambda i: -i["score"])[: self.limit]

    def _near(self, tile: Tile, instance: dict[str, Any]) -> bool:
        x, y, w, h = instance["bbox"]
        return any(
            x < right and x + w > left and y < bottom and y + h > top
            for top, left, bottom, right in (other.core for other in self.grid.neighbours(tile))
        )

    def _best(self, indices: list[int]) -> list[int]:
        """Of the kept instances ``indices``, those torchvision's batched NMS keeps."""
        if not indices:
            return []
        chosen = [self.kept[i] for i in indices]
        boxes = torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (i["bbox"] for i in chosen)], dtype=torch.float32
        )
        scores = torch.tensor([i["score"] for i in chosen], dtype=torch.float32)
        labels = torch.tensor([i["category_id"] for i in chosen])
        return [indices[k] for k in batched_nms(boxes, scores, labels, NMS_IOU).tolist()]


def piece_groups(pieces: Sequence[Piece], grid: TileGrid) -> list[list[Piece]]:
    """``pieces`` grouped by object: pieces of neighbouring tiles whose masks (boxes, for a box-only model)
    agree where both tiles see (:data:`MERGE_IOU`) are one object's."""
    parent = list(range(len(pieces)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_tile: dict[int, list[int]] = {}
    for i, piece in enumerate(pieces):
        by_tile.setdefault(piece.tile, []).append(i)
    for tile_index, members in by_tile.items():
        tile = grid.tiles[tile_index]
        for other in grid.neighbours(tile):
            if other.index < tile_index:
                continue  # each pair of tiles once
            window = (max(tile.top, other.top), max(tile.left, other.left),
                      min(tile.bottom, other.bottom), min(tile.right, other.right))  # fmt: skip
            for i, j in _agreeing(pieces, members, by_tile.get(other.index, []), window):
                parent[root(i)] = root(j)
    groups: dict[int, list[Piece]] = {}
    for i, piece in enumerate(pieces):
        groups.setdefault(root(i), []).append(piece)
    return list(groups.values())


def merged_instances(groups: Sequence[list[Piece]], grid: TileGrid) -> list[dict[str, Any]]:
    """One instance per group of pieces: the union of their masks and boxes, the best score, and the
    category and keypoints of the largest piece. Masks are encoded at the image's size from crops."""
    merged = [_merged(group) for group in groups]
    masks = [mask for _, mask in merged if mask is not None]
    if len(masks) == len(merged):
        for (instance, _), (rle, area) in zip(
            merged,
            encode_crops(masks, grid.height, grid.width),
            strict=True,
        ):
            instance["rle"], instance["area"] = rle, area
    return [instance for instance, _ in merged]


def _agreeing(
    pieces: Sequence[Piece], mine: list[int], theirs: list[int], window: tuple[int, int, int, int]
) -> list[tuple[int, int]]:
    """The pairs of pieces, one of ``mine`` and one of ``theirs``, that agree within ``window`` (top, left,
    bottom, right): their masks' intersection over union there is at least :data:`MERGE_IOU` (their boxes',
    for a box-only model). In numpy, a block of ``mine`` at a time; masks are compared only where their
    extents (:func:`_extent`) overlap. Comparing every pair in Python cost minutes for two tiles of a few
    thousand pieces each (a dense image, a low ``--score-threshold``)."""
    if not mine or not theirs:
        return []
    top, left, bottom, right = window
    limits = np.array([left, top, left, top]), np.array([right, bottom, right, bottom])
    a = np.clip(np.array([_extent(pieces[i]) for i in mine], dtype=np.float64), *limits)
    b = np.clip(np.array([_extent(pieces[j]) for j in theirs], dtype=np.float64), *limits)
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    boxes_only = all(pieces[k].mask is None for k in itertools.chain(mine, theirs))
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(a), 1024):
        block = a[start : start + 1024, None]
        wide = np.minimum(block[..., 2], b[:, 2]) - np.maximum(block[..., 0], b[:, 0])
        high = np.minimum(block[..., 3], b[:, 3]) - np.maximum(block[..., 1], b[:, 1])
        inter = np.clip(wide, 0, None) * np.clip(high, 0, None)
        if boxes_only:
            union = (block[..., 2] - block[..., 0]) * (block[..., 3] - block[..., 1]) + area_b - inter
            found = inter >= MERGE_IOU * union
            found &= union > 0
        else:
            found = inter > 0
        rows, columns = np.nonzero(found)
        for r, c in zip(rows.tolist(), columns.tolist(), strict=True):
            i, j = mine[start + r], theirs[c]
            if boxes_only or _mask_agreement(pieces[i], pieces[j], window) >= MERGE_IOU:
                pairs.append((i, j))
    return pairs


def _extent(piece: Piece) -> tuple[float, float, float, float]:
    """Where a piece can have pixels (x1, y1, x2, y2): its mask's crop (a pasted mask may reach a little
    past its box), its box for a box-only model."""
    if piece.mask is None:
        return piece.box
    y, x, mask = piece.mask
    return (x, y, x + mask.shape[1], y + mask.shape[0])


def _mask_agreement(a: Piece, b: Piece, window: tuple[int, int, int, int]) -> float:
    """Intersection over union of two pieces' masks within ``window`` (top, left, bottom, right)."""
    assert a.mask is not None and b.mask is not None
    planes = [_in_window(a.mask, window), _in_window(b.mask, window)]
    union = int(np.logical_or(*planes).sum())
    return int(np.logical_and(*planes).sum()) / union if union else 0.0


def _area(box: tuple[float, ...]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _in_window(crop: Crop, window: tuple[int, int, int, int]) -> np.ndarray:
    """A crop's pixels placed into ``window`` (top, left, bottom, right): a bool array of its size."""
    top, left, bottom, right = window
    plane = np.zeros((max(bottom - top, 0), max(right - left, 0)), dtype=bool)
    y, x, mask = crop
    y0, x0 = max(y, top), max(x, left)
    y1, x1 = min(y + mask.shape[0], bottom), min(x + mask.shape[1], right)
    if y1 > y0 and x1 > x0:
        plane[y0 - top : y1 - top, x0 - left : x1 - left] = mask[y0 - y : y1 - y, x0 - x : x1 - x]
    return plane


def _merged(group: list[Piece]) -> tuple[dict[str, Any], Crop | None]:
    """One instance from the pieces of one object (a group of one: that piece), and its mask."""
    largest = max(group, key=lambda p: int(p.mask[2].sum()) if p.mask is not None else _area(p.box))
    x1 = min(p.box[0] for p in group)
    y1 = min(p.box[1] for p in group)
    x2 = max(p.box[2] for p in group)
    y2 = max(p.box[3] for p in group)
    instance = dict(largest.instance)
    instance["score"] = max(p.instance["score"] for p in group)
    instance["bbox"] = [x1, y1, x2 - x1, y2 - y1]
    if largest.mask is None:
        instance["area"] = round((x2 - x1) * (y2 - y1))
        return instance, None
    masks = [p.mask for p in group if p.mask is not None and p.mask[2].size]
    if not masks:
        return instance, (int(y1), int(x1), np.zeros((0, 0), dtype=bool))
    top, left = min(m[0] for m in masks), min(m[1] for m in masks)
    bottom = max(m[0] + m[2].shape[0] for m in masks)
    right = max(m[1] + m[2].shape[1] for m in masks)
    union = np.zeros((bottom - top, right - left), dtype=bool)
    for y, x, mask in masks:
        union[y - top : y - top + mask.shape[0], x - left : x - left + mask.shape[1]] |= mask
    return instance, (top, left, union)
