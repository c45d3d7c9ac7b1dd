"""Tiled inference: the grid, the ownership rule and the stitching (exact objects, no model), then huge
images through the shard processor with the shipped model: one row per image, instances in its pixels."""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import pycocotools.mask as coco_mask
import pytest
import tifffile
from PIL import Image

from batchseg.analysis.results import open_results
from batchseg.analysis.verify import verify
from batchseg.demo import SHAPES_MODEL
from batchseg.errors import BatchsegError
from batchseg.inference.models import resolve_weights
from batchseg.inference.paste import encode_crops
from batchseg.inference.tiling import DROP, KEEP, PIECE, Piece, Stitcher, TileGrid, piece_groups, starts
from batchseg.io.manifest import Shard
from batchseg.options import check
from batchseg.segment.config import SegmentConfig
from batchseg.segment.processor import ShardProcessor
from batchseg.segment.ray_data import Segmenter
from batchseg.train.synth import draw_scene
from tests.segmenting import segment_in_process
from tests.tiffs import geo_tags, random_pixels, write_tiled


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
        assert tile.top >= 0 and tile.bottom <= height and tile.left >= 0 and tile.right <= width
        top, left, bottom, right = tile.core
        assert tile.top <= top < bottom <= tile.bottom and tile.left <= left < right <= tile.right
        owners[top:bottom, left:right] += 1
        seen[tile.top : tile.bottom, tile.left : tile.right] += 1
    assert (owners == 1).all()
    for axis, length in ((grid.rows, height), (grid.columns, width)):
        assert axis[0] == 0 and axis[-1] + min(size, length) == length
        assert all(b - a <= size - overlap for a, b in itertools.pairwise(axis))
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


def stitched(grid: TileGrid, shapes: list[np.ndarray], pending: list[int] | None = None) -> list[dict]:
    """What the stitcher makes of a perfect model: in each tile, each object's part there, its box the
    part's box. ``pending`` gets the number of pieces held after each tile."""
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
        stitcher.add(tile, kept, pieces)
        if pending is not None:
            pending.append(len(stitcher.pieces))
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


SIDE = 336  # three tiles of 160 a side, sharing 48 (and more at the end)


def test_a_huge_image_tiled_finds_its_objects_once_in_its_own_pixels(tmp_path) -> None:
    """A scene three tiles wide with shapes everywhere, across tile borders too: the tiled row finds the
    objects (matched to the truth by mask) as well as the model does on the scene at its native scale,
    and none twice; its masks decode with plain pycocotools at the scene's size; verify passes. Images
    that fit a tile get today's rows, unchanged."""
    drawn = draw_scene(np.random.default_rng(2), images=9, side=SIDE, size=88, whole=False)
    pixels = drawn.pixels
    truth = []
    for top, left, part in drawn.parts:
        for _, mask in part.instances:
            full = np.zeros((SIDE, SIDE), dtype=bool)
            full[top : top + mask.shape[0], left : left + mask.shape[1]] = mask
            truth.append(full)
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    (tmp_path / "scene.txt").write_text(str(tmp_path / "scene.png"))
    small = [tmp_path / f"small{k}.png" for k in range(3)]
    for k, path in enumerate(small):
        Image.fromarray(pixels[k * 100 : k * 100 + 150, 40:190]).save(path)
    (tmp_path / "small.txt").write_text("\n".join(str(p) for p in small))
    model = {"weights": str(SHAPES_MODEL), "batch_size": 4}
    tiling = {"tile": 160, "tile_overlap": 48}
    native = SegmentConfig(
        str(tmp_path / "scene.txt"), str(tmp_path / "native"), **model, min_size=SIDE, max_size=SIDE
    )
    tiled = SegmentConfig(str(tmp_path / "scene.txt"), str(tmp_path / "tiled"), **model, **tiling)
    alone = SegmentConfig(str(tmp_path / "small.txt"), str(tmp_path / "alone"), **model)
    small_tiled = SegmentConfig(str(tmp_path / "small.txt"), str(tmp_path / "small_tiled"), **model, **tiling)
    for config in (native, tiled, alone, small_tiled):
        segment_in_process(config)
    assert (
        open_results(small_tiled.output).to_table().to_pylist()
        == open_results(alone.output).to_table().to_pylist()
    )
    assert verify(tiled.output).ok
    (row,) = open_results(tiled.output).to_table().to_pylist()
    assert (row["status"], row["width"], row["height"]) == ("ok", SIDE, SIDE)
    found = row["instances"]
    rles = [{"size": [SIDE, SIDE], "counts": i["rle"]} for i in found]
    decoded = coco_mask.decode(rles)
    assert decoded.shape == (SIDE, SIDE, len(found))
    assert [int(d.sum()) for d in np.moveaxis(decoded, -1, 0)] == [i["area"] for i in found]
    truths = [coco_mask.encode(np.asfortranarray(m.astype(np.uint8))) for m in truth]

    def recall(instances: list[dict]) -> float:
        masks = [{"size": [SIDE, SIDE], "counts": i["rle"]} for i in instances]
        return float((coco_mask.iou(truths, masks, [0] * len(masks)).max(axis=1) >= 0.5).mean())

    # The same scene as a tiled TIFF, read window by window: the same pixels, so the same row.
    write_tiled(tmp_path / "scene.tif", pixels, tile=64)
    (tmp_path / "tif.txt").write_text(str(tmp_path / "scene.tif"))
    from_tiff = SegmentConfig(str(tmp_path / "tif.txt"), str(tmp_path / "from_tiff"), **model, **tiling)
    segment_in_process(from_tiff)
    (tif_row,) = open_results(from_tiff.output).to_table().to_pylist()
    assert tif_row["instances"] == found
    # Ray Data's Segmenter, given the scene's bytes, makes the same row.
    segmenter = Segmenter(device="cpu", **model, **tiling)
    table = segmenter({"bytes": np.array([(tmp_path / "scene.png").read_bytes()], dtype=object)})
    assert table.column("instances").to_pylist() == [found]
    (whole,) = open_results(native.output).to_table().to_pylist()
    assert recall(found) >= min(0.9, recall(whole["instances"])), (recall(found), recall(whole["instances"]))
    # No object found twice: as in any output of the model, no two boxes of one category overlap by more
    # than its NMS threshold (0.5), however the tiles cut them.
    for instances in (found, whole["instances"]):
        for category in {i["category_id"] for i in instances}:
            boxes = [i["bbox"] for i in instances if i["category_id"] == category]
            among = coco_mask.iou(boxes, boxes, [0] * len(boxes))
            np.fill_diagonal(among, 0)
            assert among.max() <= 0.5, "an object found twice"


def test_a_corrupt_tiff_tile_is_its_own_error_row_and_geotiffs_are_placed(tmp_path) -> None:
    """A tile that cannot be decoded fails its image's row, in one line, and nothing else: the images after
    it in the shard are segmented; GeoTIFFs' rows carry their placement on the map."""
    path = write_tiled(tmp_path / "broken.tif", random_pixels(200, 200), tile=64)
    with tifffile.TiffFile(path) as tiff:
        offset, count = tiff.pages[0].dataoffsets[4], tiff.pages[0].databytecounts[4]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\x00garbage" * (count // 8) + b"\x00" * (count % 8)
    path.write_bytes(bytes(data))
    Image.fromarray(random_pixels(120, 90)).save(tmp_path / "fine.png")
    # A GeoTIFF that fits a tile (read whole), and one tiled: their rows say where they lie on the map.
    small = write_tiled(tmp_path / "small.tif", random_pixels(90, 80), tile=32, extratags=geo_tags())
    placed = write_tiled(
        tmp_path / "placed.tif",
        random_pixels(150, 260),
        tile=32,
        extratags=geo_tags(4326, origin=(12.5, 41.9), pixel=(0.001, 0.002), geographic=True),
    )
    (tmp_path / "m.txt").write_text(f"{path}\n{tmp_path / 'fine.png'}\n{small}\n{placed}")
    config = SegmentConfig(str(tmp_path / "m.txt"), str(tmp_path / "out"), weights=str(SHAPES_MODEL), tile=96)
    segment_in_process(config)
    broken, fine, whole, tiled = open_results(config.output).to_table().to_pylist()
    assert (whole["status"], whole["width"], whole["height"]) == ("ok", 80, 90)
    assert (whole["geo_transform"], whole["crs"]) == (
        [500_000.0, 10.0, 0.0, 4_600_000.0, 0.0, -10.0],
        "EPSG:32633",
    )
    assert (tiled["status"], tiled["width"], tiled["height"]) == ("ok", 260, 150)
    assert (tiled["geo_transform"], tiled["crs"]) == ([12.5, 0.001, 0.0, 41.9, 0.0, -0.002], "EPSG:4326")
    assert (fine["geo_transform"], fine["crs"], broken["geo_transform"]) == (None, None, None)
    assert (broken["status"], broken["width"], broken["height"]) == ("error", 200, 200)
    assert broken["error"].startswith("corrupt_image: cannot decode TIFF tile 4 of level 0: ")
    assert "\n" not in broken["error"]
    assert fine["status"] == "ok"
    assert verify(config.output).ok


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tile": 31}, "--tile must be at least 32, not 31"),
        ({"tile": -5}, "--tile must be at least 32, not -5"),
        ({"tile": 64, "tile_overlap": 64}, "--tile-overlap must be below --tile (64), not 64"),
        ({"tile": 64, "tile_overlap": -1}, "--tile-overlap must be at least 0, not -1"),
        ({"tile_overlap": 8}, "--tile-overlap needs --tile"),
        ({"tile": 64, "max_instances": 0}, "--max-instances must be at least 1, not 0"),
    ],
)
def test_bad_tile_options_are_refused_in_one_line(options: dict, message: str) -> None:
    with pytest.raises(BatchsegError, match=f"^{re.escape(message)}$"):
        check(SegmentConfig("m.txt", "out", **options))


def test_the_default_overlap_and_instances_per_image() -> None:
    config = SegmentConfig("m.txt", "out", tile=512)
    assert (
        config.overlap,
        config.instances_per_image(tiled=True),
        config.instances_per_image(tiled=False),
    ) == (
        128,
        10_000,
        100,
    )
    assert SegmentConfig("m.txt", "out", tile=512, max_instances=7).instances_per_image(tiled=True) == 7


def test_a_tiled_image_in_the_model_shows_as_the_share_of_its_tiles_done(tmp_path, monkeypatch) -> None:
    """The progress line counts a tiled image by its tiles done: a slide keeps an actor for hours."""
    config = SegmentConfig("", "", weights=str(SHAPES_MODEL), tile=64, tile_overlap=0, batch_size=1)
    processor = ShardProcessor(config, resolve_weights(config.weights, None, {}))
    seen = []
    add = Stitcher.add

    def counting(stitcher: Stitcher, *args: Any) -> bool:
        last = add(stitcher, *args)
        seen.append(processor.images_in_progress)
        return last

    monkeypatch.setattr(Stitcher, "add", counting)
    pixels = random_pixels(128, 256)  # 2 x 4 tiles
    rows = processor.rows(Shard(0, ["a", "b"], ["a.png", "b.png"]), [pixels, pixels])
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert len(processor.stitching) == 2
    processor.rows(Shard(0, ["c"], ["c.png"]), [random_pixels(32, 32)])  # as a Segmenter calls it
    assert processor.stitching == set(), "a finished batch's tiled images are let go"
    assert seen == pytest.approx(
        [
            1 / 8,
            2 / 8,
            3 / 8,
            4 / 8,
            5 / 8,
            6 / 8,
            7 / 8,
            1,
            1 + 1 / 8,
            1 + 2 / 8,
            1 + 3 / 8,
            1 + 4 / 8,
            1 + 5 / 8,
            1 + 6 / 8,
            1 + 7 / 8,
            2,
        ]
    )


def test_an_object_kept_whole_by_two_tiles_is_kept_once() -> None:
    """The model draws one object's box a little differently in two tiles, which puts its centre on either
    side of the cores' border: both tiles keep it, and the stitcher keeps the better one (the model's own
    NMS across tiles); another category's box there, or a box apart, is left alone."""
    grid = TileGrid(272, 160, 160, 48)  # two tiles: rows 0..160 and 112..272, cores split at row 136
    upper, lower = grid.tiles
    near_border = [10.0, 120.0, 30.0, 31.6]  # centre row 135.8: upper's core
    moved = [10.0, 121.0, 30.0, 31.2]  # centre row 136.6: lower's core
    fates = [
        grid.fates(t, np.array([[x, y, x + w, y + h]]))
        for t, (x, y, w, h) in ((upper, near_border), (lower, moved))
    ]
    assert [int(f[0]) for f in fates] == [KEEP, KEEP]

    def instance(bbox: list[float], score: float, category: int = 1) -> dict:
        return {
            "category_id": category,
            "score": score,
            "bbox": bbox,
            "rle": "x",
            "area": 1,
            "keypoints": None,
        }

    stitcher = Stitcher(grid, limit=100)
    stitcher.add(upper, [instance(near_border, 0.9), instance([60.0, 10.0, 20.0, 20.0], 0.8)], [])
    stitcher.add(lower, [instance(moved, 0.95), instance(moved, 0.7, category=2)], [])
    assert [(i["score"], i["category_id"]) for i in stitcher.instances()] == [(0.95, 1), (0.8, 1), (0.7, 2)]


def test_pieces_are_merged_as_the_tiles_come_not_held_for_the_whole_image() -> None:
    """A tall strip of long objects, each cut by tile edges: every object comes back whole, while the
    stitcher never holds more than the pieces of the last few rows of tiles (memory bounded by the
    image's width, not its area)."""
    height, width = 3000, 90
    shapes = []
    for top in range(10, height - 120, 150):  # 100 px tall bars: larger than the overlap, cut by edges
        mask = np.zeros((height, width), dtype=bool)
        mask[top : top + 100, 20:70] = True
        shapes.append(mask)
    pending: list[int] = []
    found = stitched(TileGrid(height, width, 96, 32), shapes, pending)
    assert sorted(i["area"] for i in found) == [5000] * len(shapes)
    assert sorted(i["rle"] for i in found) == sorted(
        coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode() for m in shapes
    )
    assert max(pending) <= 4, pending  # a few tiles' pieces, of the ~90 the image makes


def test_pieces_are_grouped_as_comparing_every_pair_groups_them() -> None:
    """piece_groups compares pairs in numpy, masks only where their crops meet: the same groups as taking
    every pair of neighbouring tiles' pieces and their intersection over union in the shared window."""
    rng = np.random.default_rng(11)
    grid = TileGrid(120, 170, 64, 24)
    for boxes_only in (False, True):
        pieces = []
        for tile in grid.tiles:
            for _ in range(int(rng.integers(0, 25))):
                x1, y1 = rng.integers(tile.left, tile.right - 4), rng.integers(tile.top, tile.bottom - 4)
                x2 = int(rng.integers(x1 + 2, min(x1 + 60, tile.right) + 1))
                y2 = int(rng.integers(y1 + 2, min(y1 + 60, tile.bottom) + 1))
                crop = None
                if not boxes_only:  # a mask that may reach a pixel or two past its box, as a pasted one may
                    top, left = max(int(y1) - 2, tile.top), max(int(x1) - 2, tile.left)
                    mask = rng.random((min(y2 + 2, tile.bottom) - top, min(x2 + 2, tile.right) - left)) < 0.8
                    crop = (top, left, mask)
                box = (float(x1), float(y1), float(x2), float(y2))
                pieces.append(Piece(tile.index, {"score": 1.0, "category_id": 1}, box, crop))
        got = sorted(sorted(id(p) for p in group) for group in piece_groups(pieces, grid))
        assert got == sorted(sorted(id(p) for p in group) for group in every_pair_groups(pieces, grid))


def every_pair_groups(pieces: list[Piece], grid: TileGrid) -> list[list[Piece]]:
    """The grouping by definition: every pair of pieces of neighbouring tiles, compared one by one."""

    def plane(piece: Piece, window: tuple[int, int, int, int]) -> np.ndarray:
        top, left, bottom, right = window
        full = np.zeros((grid.height, grid.width), dtype=bool)
        if piece.mask is None:
            x1, y1, x2, y2 = (round(v) for v in piece.box)
            full[y1:y2, x1:x2] = True
        else:
            y, x, mask = piece.mask
            full[y : y + mask.shape[0], x : x + mask.shape[1]] = mask
        return full[top:bottom, left:right]

    parent = list(range(len(pieces)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(len(pieces)), 2):
        a, b = grid.tiles[pieces[i].tile], grid.tiles[pieces[j].tile]
        if b not in grid.neighbours(a):
            continue
        window = (max(a.top, b.top), max(a.left, b.left), min(a.bottom, b.bottom), min(a.right, b.right))
        pa, pb = plane(pieces[i], window), plane(pieces[j], window)
        union = int((pa | pb).sum())
        if union and (pa & pb).sum() / union >= 0.5:
            parent[root(i)] = root(j)
    groups: dict[int, list[Piece]] = {}
    for i, piece in enumerate(pieces):
        groups.setdefault(root(i), []).append(piece)
    return list(groups.values())
