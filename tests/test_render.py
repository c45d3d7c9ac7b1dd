"""Overlays and colour splash drawn from output rows, checked pixel by pixel against the masks."""

from __future__ import annotations

import io
import json
import pathlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from PIL import Image

from batchseg.analysis.render import (
    COCO_SKELETON,
    MASK_ALPHA,
    View,
    draw_overlay,
    instance_colour,
    render_rows,
    safe_name,
)
from batchseg.cli import main
from batchseg.errors import BatchsegError, ImageError
from batchseg.format.output import shard_object
from batchseg.format.records import error_row, ok_row, to_parquet
from batchseg.format.rle import compress_counts, decode_rle, encode_rle
from batchseg.io import storage
from batchseg.io.images import decode_image
from batchseg.train.synth import SynthDataset, write_dataset
from tests.refusals import refusal

# --- a segmentation output made without Ray or a model: ground truth as predictions --------------------


@dataclass
class Output:
    uri: str  # the output folder, as `batchseg segment --output` would hold it
    rows: list[dict[str, Any]]  # every row, in output order
    data: SynthDataset
    summary: dict[str, Any]


ERROR_URI_SUFFIX = "missing <b>&.jpg"  # HTML-special characters, for the report's escaping


def person(x: float, y: float, score: float = 0.8) -> dict[str, Any]:
    """A box-only instance with 17 COCO keypoints, a stick figure 30 x 60 px with its top-left at (x, y);
    the left knee (13) is not visible."""
    points = [(15, 4), (13, 2), (17, 2), (11, 3), (19, 3), (8, 14), (22, 14), (5, 26), (25, 26), (4, 36),
              (26, 36), (10, 36), (20, 36), (9, 48), (21, 48), (9, 59), (21, 59)]  # fmt: skip
    keypoints: list[float] = []
    for k, (px, py) in enumerate(points):
        keypoints += [x + px, y + py, 0.0 if k == 13 else 2.0]
    return {
        "category_id": 100,
        "category": "person",
        "score": score,
        "bbox": [x, y, 30.0, 61.0],
        "area": 30 * 61,
        "rle": None,
        "keypoints": keypoints,
    }


def write_segment_output(root: pathlib.Path, count: int = 7, seed: int = 3) -> Output:
    """Synthetic images, and an output folder whose rows are their ground truth: two Parquet shards and a
    _summary.json like ``batchseg segment`` writes. The last image's row has no instances, the first one
    also holds a keypoint "person", and two error rows (``not_found``, ``corrupt_image``) follow."""
    data = write_dataset(str(root / "data"), count, seed)
    coco = json.loads(pathlib.Path(data.annotations).read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    rows: list[dict[str, Any]] = []
    for index, (image, uri) in enumerate(zip(coco["images"], data.uris, strict=True)):
        instances = [
            {
                "category_id": a["category_id"],
                "category": names[a["category_id"]],
                "score": round(0.97 - 0.11 * j, 2),
                "bbox": [float(v) for v in a["bbox"]],
                "area": a["area"],
                "rle": a["segmentation"]["counts"],
                "keypoints": None,
            }
            for j, a in enumerate(a for a in coco["annotations"] if a["image_id"] == image["id"])
        ]
        if index == 0:
            instances.append(person(4.0, 4.0))
        if index == count - 1:
            instances = []
        rows.append(ok_row(str(image["id"]), uri, image["width"], image["height"], instances))
    missing = storage.join(data.images, ERROR_URI_SUFFIX)
    rows.append(error_row("missing", missing, ImageError("not_found", f"no such object: {missing}")))
    rows.append(
        error_row(
            "corrupt",
            storage.join(data.images, "corrupt.jpg"),
            ImageError("corrupt_image", "cannot decode image: broken data stream"),
        )
    )
    out = root / "output"
    out.mkdir()
    half = len(rows) // 2
    for shard, part in enumerate((rows[:half], rows[half:])):
        provenance = {"model": "maskrcnn_small", "weights": "ground-truth", "shard": shard}
        (out / shard_object(shard)).write_bytes(to_parquet(part, provenance))
    ok = [r for r in rows if r["status"] == "ok"]
    summary = {
        "images": len(rows),
        "ok": len(ok),
        "error": 2,
        "errors_by_kind": {"corrupt_image": 1, "not_found": 1},
        "instances": sum(len(r["instances"]) for r in ok),
        "shards_total": 2,
        "shards_done": 2,
        "manifest_rows": len(rows),
        "model": "maskrcnn_small",
        "weights": "ground-truth",
        "shards_failed": [],
        "images_this_run": len(rows),
        "shards_this_run": 2,
        "retries": 0,
        "shards_skipped": 0,
        "wall_seconds": 754.5,
        "images_per_second": 12.345,
        "status": "complete",
    }
    (out / "_summary.json").write_text(json.dumps(summary, indent=2))
    return Output(str(out), rows, data, summary)


@pytest.fixture
def output(tmp_path: pathlib.Path) -> Output:
    return write_segment_output(tmp_path)


# --- draw_overlay on a plain image, where every pixel's fate is known -----------------------------------

HEIGHT, WIDTH = 160, 200
GREY = 90


def plain() -> np.ndarray:
    return np.full((HEIGHT, WIDTH, 3), GREY, dtype=np.uint8)


def square(y0: int, y1: int, x0: int, x1: int, score: float = 0.93) -> dict[str, Any]:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return {
        "category_id": 2,
        "category": "square",
        "score": score,
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "area": int(mask.sum()),
        "rle": encode_rle(mask),
        "keypoints": None,
    }


def box_region(instance: dict[str, Any]) -> np.ndarray:
    x, y, w, h = (round(v) for v in instance["bbox"])
    region = np.zeros((HEIGHT, WIDTH), dtype=bool)
    region[y : y + h, x : x + w] = True
    return region


def label_zone(instance: dict[str, Any]) -> np.ndarray:
    """Generously, where a 10 px label at the box's top-left may go: above the box, or inside its top."""
    x, y = (round(v) for v in instance["bbox"][:2])
    zone = np.zeros((HEIGHT, WIDTH), dtype=bool)
    zone[max(0, y - 20) : y + 20, max(0, x - 2) : x + 110] = True
    return zone


def test_overlay_blends_each_mask_toward_its_colour_and_outlines_it() -> None:
    instances = [square(50, 110, 30, 90), square(60, 140, 120, 180, score=0.5)]
    pixels = plain()
    image = draw_overlay(pixels, instances)
    assert image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
    drawn = np.asarray(image).astype(int)
    assert (pixels == GREY).all(), "draw_overlay must not modify its input"
    for index, instance in enumerate(instances):
        colour = np.array(instance_colour(index))
        mask = decode_rle(instance["rle"], HEIGHT, WIDTH)
        interior = mask.copy()
        interior[:, :] = False
        ys, xs = np.nonzero(mask)
        interior[ys.min() + 3 : ys.max() - 2, xs.min() + 3 : xs.max() - 2] = True
        interior &= ~label_zone(instance)
        expected = np.rint(GREY * (1 - MASK_ALPHA) + colour * MASK_ALPHA)
        assert np.abs(drawn[interior] - expected).max() <= 1
        # blended toward the colour: closer to it than the original grey was, on every interior pixel
        assert (np.abs(drawn[interior] - colour).sum(axis=1) < np.abs(GREY - colour).sum()).all()
        # the outline: the mask's edge pixels are the full colour
        assert (drawn[ys.min(), xs.min() + 5 : xs.max() - 5] == colour).all()
        assert (drawn[ys.min() + 25 : ys.max() - 5, xs.max()] == colour).all()
        # the label's background, at the box's top-left, is the colour too
        assert (drawn[label_zone(instance)] == colour).all(axis=1).sum() > 100


def test_overlay_leaves_pixels_outside_masks_boxes_and_labels_unchanged() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    instances = [square(50, 110, 30, 90), square(60, 140, 120, 180)]
    drawn = np.asarray(draw_overlay(pixels, instances))
    covered = np.zeros((HEIGHT, WIDTH), dtype=bool)
    for instance in instances:
        covered |= box_region(instance) | label_zone(instance)
    assert (~covered).sum() > HEIGHT * WIDTH // 3
    assert (drawn[~covered] == pixels[~covered]).all()
    for instance in instances:
        mask = decode_rle(instance["rle"], HEIGHT, WIDTH)
        assert (drawn[mask] != pixels[mask]).any(axis=1).all()


def test_box_only_instance_draws_box_and_label_but_no_mask() -> None:
    instance = square(50, 110, 30, 90) | {"rle": None}
    drawn = np.asarray(draw_overlay(plain(), [instance])).astype(int)
    colour = np.array(instance_colour(0))
    assert (drawn[52:108, 32:88] == GREY).all(), "no blend inside a box without a mask"
    assert (drawn[50, 30:90] == colour).all() and (drawn[50:110, 89] == colour).all()
    assert (drawn[30:50, 30:60] == colour).all(axis=1).any(), "label above the box"


def test_keypoints_draw_the_skeleton_between_visible_points_only() -> None:
    figure = person(80.0, 60.0)
    points = np.array(figure["keypoints"]).reshape(17, 3)
    drawn = np.asarray(draw_overlay(plain(), [figure])).astype(int)
    colour = np.array(instance_colour(0))

    def midpoint(a: int, b: int) -> tuple[int, int]:
        x, y = (points[a, :2] + points[b, :2]) / 2
        return round(y), round(x)

    assert len(COCO_SKELETON) == 19 and all(0 <= a < 17 and 0 <= b < 17 for a, b in COCO_SKELETON)
    assert (drawn[midpoint(5, 11)] == colour).all(), "left shoulder - left hip"
    assert (drawn[midpoint(12, 14)] == colour).all(), "right hip - right knee"
    assert (drawn[midpoint(11, 13)] == GREY).all(), "the left knee is not visible: no thigh"
    assert (drawn[midpoint(13, 15)] == GREY).all(), "... and no shin"
    y, x = round(points[9, 1]), round(points[9, 0])
    assert (drawn[y, x] == colour).all(), "a dot on the left wrist"


def test_splash_keeps_masks_in_colour_and_greys_the_rest(output: Output) -> None:
    row = output.rows[1]
    pixels = decode_image(pathlib.Path(row["uri"]).read_bytes())
    drawn = np.asarray(draw_overlay(pixels, row["instances"], style="splash"))
    inside = np.zeros(pixels.shape[:2], dtype=bool)
    for instance in row["instances"]:
        inside |= decode_rle(instance["rle"], row["height"], row["width"])
    assert inside.any() and (~inside).any()
    assert (drawn[inside] == pixels[inside]).all()
    outside = drawn[~inside]
    assert (outside[:, 0] == outside[:, 1]).all() and (outside[:, 1] == outside[:, 2]).all()
    luma = pixels[~inside].astype(float) @ [0.299, 0.587, 0.114]
    assert np.abs(outside[:, 0] - luma).max() <= 1


def test_keypoints_and_boxes_move_and_scale_with_the_view() -> None:
    """A person at (1100, 2100) of a 6000 x 4000 image, in a 100 x 100 picture of its region (1000, 2000,
    200, 200): every point at ((x - 1000) / 2, (y - 2000) / 2)."""
    figure = person(1100.0, 2100.0)
    points = np.array(figure["keypoints"]).reshape(17, 3)
    picture = np.full((100, 100, 3), GREY, dtype=np.uint8)
    view = View(6000, 4000, (1000, 2000, 200, 200))
    drawn = np.asarray(draw_overlay(picture, [figure], view=view)).astype(int)
    colour = np.array(instance_colour(0))

    def midpoint(a: int, b: int) -> tuple[int, int]:
        x, y = (points[a, :2] + points[b, :2]) / 2
        return round((y - 2000) / 2), round((x - 1000) / 2)

    assert (drawn[midpoint(5, 11)] == colour).all(), "left shoulder - left hip"
    assert (drawn[midpoint(6, 12)] == colour).all(), "right shoulder - right hip"
    assert (drawn[50, 50] == colour).all() and (drawn[50, 64] == colour).all(), "the box's top corners"
    # Below the box's top (its label is above it), nothing right of the box or below the ankles' dots.
    assert (drawn[50:, 68:] == GREY).all() and (drawn[84:, :] == GREY).all()


def test_bad_style_and_bad_pixels_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown style 'sparkle'"):
        draw_overlay(plain(), [], style="sparkle")
    with pytest.raises(ValueError, match="uint8"):
        draw_overlay(np.zeros((4, 4), dtype=np.uint8), [])
    with pytest.raises(ValueError, match="RLE covers"):
        draw_overlay(plain()[:50], [square(10, 20, 10, 20)])


def test_instance_colours_are_fixed_and_distinct() -> None:
    colours = [instance_colour(i) for i in range(24)]
    assert colours == [instance_colour(i) for i in range(24)]
    assert len(set(colours)) == 24
    assert all(0 <= c <= 255 for colour in colours for c in colour)
    first = np.array(colours[:8])
    distances = np.abs(first[:, None, :] - first[None, :, :]).sum(axis=2)
    assert distances[~np.eye(8, dtype=bool)].min() > 60


# --- render_rows over a whole output ---------------------------------------------------------------------


def test_render_rows_writes_one_png_per_ok_row_with_every_mask_pixel_drawn(
    output: Output, tmp_path: pathlib.Path
) -> None:
    out = tmp_path / "rendered"
    written = render_rows(output.rows, str(out))
    ok = [r for r in output.rows if r["status"] == "ok"]
    assert written == [str(out / f"{r['image_id']}.png") for r in ok]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{r['image_id']}.png" for r in ok)
    for row, path in zip(ok, written, strict=True):
        original = decode_image(pathlib.Path(row["uri"]).read_bytes())
        with Image.open(path) as png:
            assert png.mode == "RGB" and png.size == (row["width"], row["height"])
            drawn = np.asarray(png)
        changed = (drawn != original).any(axis=2)
        masked = np.zeros(changed.shape, dtype=bool)
        for instance in row["instances"]:
            if instance["rle"] is not None:
                masked |= decode_rle(instance["rle"], row["height"], row["width"])
        assert (changed & masked).sum() == masked.sum(), f"{path}: every mask pixel is drawn"
        assert changed.sum() >= masked.sum()
        if not row["instances"]:
            assert not changed.any(), "an image with no instances comes out as it went in"


def test_render_rows_splash(output: Output, tmp_path: pathlib.Path) -> None:
    written = render_rows(output.rows[:2], str(tmp_path / "splash"), style="splash")
    assert len(written) == 2
    drawn = np.asarray(Image.open(written[1]))
    assert (drawn[..., 0] == drawn[..., 1]).mean() > 0.3, "most of a shapes image is background: grey"
    with pytest.raises(ValueError, match="unknown style"):
        render_rows(output.rows, str(tmp_path / "x"), style="outline")


def test_render_rows_skips_unreadable_and_resized_images_with_one_warning(
    output: Output, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = output.rows[0]
    gone = good | {"image_id": "gone", "uri": storage.join(output.data.images, "nope.jpg")}
    resized = good | {"image_id": "resized", "width": good["width"] + 1}
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    corrupt = good | {"image_id": "junk", "uri": str(junk)}
    badmask = good | {"image_id": "badmask", "instances": [square(1, 5, 1, 5)]}  # a 200 x 160 mask
    capsys.readouterr()
    written = render_rows([gone, good, resized, corrupt, badmask], str(tmp_path / "out"))
    assert [pathlib.Path(p).name for p in written] == [f"{good['image_id']}.png"]
    warnings = capsys.readouterr().err.splitlines()
    assert all(w.startswith("batchseg: warning: render: ") for w in warnings)
    assert len(warnings) == 1
    assert "skipped 4" in warnings[0] and "2 unreadable" in warnings[0] and "size differs" in warnings[0]
    assert "bad instances" in warnings[0]


def test_safe_names_are_file_names_and_never_collide() -> None:
    ids = ["123", "a/b", "a_b", "../../etc/passwd", "x y", "", "ü", "a" * 300, "img.01-2_b"]
    names = [safe_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", n) and len(n) <= 120 for n in names)
    assert safe_name("123") == "123" and safe_name("img.01-2_b") == "img.01-2_b"


def test_render_rows_names_files_after_safe_ids(output: Output, tmp_path: pathlib.Path) -> None:
    row = output.rows[0] | {"image_id": "photos/2024/cat 1.jpg"}
    (written,) = render_rows([row], str(tmp_path / "named"))
    assert pathlib.Path(written).parent == tmp_path / "named"
    assert pathlib.Path(written).name == f"{safe_name('photos/2024/cat 1.jpg')}.png"
    assert Image.open(io.BytesIO(pathlib.Path(written).read_bytes())).size == (row["width"], row["height"])


# --- huge images: a bounded picture, masks decoded for its pixels only ------------------------------------

BIG_W, BIG_H = 6000, 4000
BACKGROUND = (60, 120, 180)  # not grey, so that splash's grey shows
# Instances far apart (x, y, width, height in image pixels): top-left, bottom-right, middle.
FAR_APART = [(100, 100, 400, 300), (5200, 3300, 600, 500), (2900, 1900, 200, 200)]


def rectangle_rle(x: int, y: int, w: int, h: int, width: int = BIG_W, height: int = BIG_H) -> str:
    """The COCO RLE of a filled rectangle, from its runs: never a full-size mask, even in the test."""
    runs = [x * height + y] + [h, height - h] * (w - 1) + [h, height - y - h + (width - x - w) * height]
    return compress_counts(np.array(runs))


def big_instance(index: int) -> dict[str, Any]:
    x, y, w, h = FAR_APART[index]
    return {
        "category_id": 2,
        "category": "square",
        "score": 0.9,
        "bbox": [float(x), float(y), float(w), float(h)],
        "area": w * h,
        "rle": rectangle_rle(x, y, w, h),
        "keypoints": None,
    }


def blend(index: int) -> tuple[int, ...]:
    """A mask pixel's colour over the background: the ``MASK_ALPHA`` blend of ``draw_overlay``."""
    colour = instance_colour(index)
    return tuple(
        round(b * (1 - MASK_ALPHA) + c * MASK_ALPHA) for b, c in zip(BACKGROUND, colour, strict=True)
    )


def write_huge_images(
    folder: pathlib.Path, suffixes: tuple[str, ...] = ("png", "tif")
) -> dict[str, dict[str, Any]]:
    """A 6000 x 4000 PNG and the same image as a tiled TIFF, and their rows (three instances far apart)."""
    import tifffile

    pixels = np.empty((BIG_H, BIG_W, 3), dtype=np.uint8)
    pixels[...] = BACKGROUND
    if "png" in suffixes:
        Image.fromarray(pixels).save(folder / "scene.png", compress_level=1)
    if "tif" in suffixes:
        tifffile.imwrite(folder / "scene.tif", pixels, tile=(512, 512), compression="zlib", photometric="rgb")
    instances = [big_instance(i) for i in range(len(FAR_APART))]
    return {
        suffix: ok_row(f"scene-{suffix}", str(folder / f"scene.{suffix}"), BIG_W, BIG_H, instances)
        for suffix in suffixes
    }


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return write_huge_images(tmp_path_factory.mktemp("huge"))


def test_rectangle_rle_is_encode_rle_of_the_rectangle() -> None:
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:12, 30:47] = True
    assert rectangle_rle(30, 5, 17, 7, 60, 40) == encode_rle(mask)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_a_huge_image_is_drawn_at_the_bounded_size_with_each_instance_at_its_scaled_place(
    huge: dict[str, dict[str, Any]], suffix: str, tmp_path: pathlib.Path
) -> None:
    (written,) = render_rows([huge[suffix]], str(tmp_path), max_side=600)
    drawn = np.asarray(Image.open(written))
    assert drawn.shape == (400, 600, 3)  # scale 0.1
    for index, (x, y, w, h) in enumerate(FAR_APART):
        # The middle of the box's lower half, in picture pixels (a label may lie inside its top): the blend.
        x0, y0, x1, y1 = (round(v / 10) for v in (x + w / 4, y + h / 2, x + 3 * w / 4, y + 3 * h / 4))
        assert (drawn[y0:y1, x0:x1] == blend(index)).all(), index
        # Its outline (and box) in its own colour, at the box's scaled edges.
        assert (drawn[(y + h // 2) // 10, x // 10] == instance_colour(index)).all(), index
    assert (drawn[200:260, 100:250] == BACKGROUND).all(), "nothing drawn between the instances"


def test_splash_of_a_huge_image(huge: dict[str, dict[str, Any]], tmp_path: pathlib.Path) -> None:
    (written,) = render_rows([huge["tif"]], str(tmp_path), "splash", max_side=600)
    splash = np.asarray(Image.open(written))
    assert splash.shape == (400, 600, 3)
    assert (splash[330:380, 520:580] == BACKGROUND).all(), "instance 1 keeps its colour"
    assert (splash[200:260, 100:250] == splash[200:260, 100:250, :1]).all(), "the rest turns grey"


def test_a_region_shows_only_the_instances_inside_it(
    huge: dict[str, dict[str, Any]], tmp_path: pathlib.Path
) -> None:
    (written,) = render_rows([huge["png"]], str(tmp_path), max_side=600, region=(4800, 3000, 1200, 1000))
    drawn = np.asarray(Image.open(written))
    assert drawn.shape == (500, 600, 3)  # scale 0.5
    assert (drawn[200:350, 250:450] == blend(1)).all()  # instance 1: 5200..5800 x 3300..3800
    assert (drawn[160, 200] == instance_colour(1)).all()  # its outline, on its left edge
    for other in (0, 2):  # outside the region: no mask, box, outline or label of theirs
        assert not (drawn == instance_colour(other)).all(axis=2).any()
        assert not (drawn == blend(other)).all(axis=2).any()
    # A small region is drawn at full size: the instance is cut at the region's right and bottom edges.
    (small,) = render_rows([huge["tif"]], str(tmp_path / "small"), region=(5100, 3200, 300, 200))
    drawn = np.asarray(Image.open(small))
    assert drawn.shape == (200, 300, 3)
    assert (drawn[105:195, 105:295] == blend(1)).all() and (drawn[:80, :] == BACKGROUND).all()
    assert (drawn[150, 100] == instance_colour(1)).all() and (drawn[199, 200] == instance_colour(1)).all()


def test_drawing_a_huge_image_costs_its_picture_not_its_size(huge: dict[str, dict[str, Any]]) -> None:
    import tracemalloc

    picture = np.empty((400, 600, 3), dtype=np.uint8)
    picture[...] = BACKGROUND
    # Besides the three, an instance nearly as large as the image: its crop is the whole picture.
    instances = [
        *huge["png"]["instances"],
        big_instance(1) | {"rle": rectangle_rle(1, 1, BIG_W - 2, BIG_H - 2)},
    ]
    whole = View(BIG_W, BIG_H, (0, 0, BIG_W, BIG_H))
    tracemalloc.start()
    drawn = np.asarray(draw_overlay(picture, instances, view=whole))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert drawn.shape == (400, 600, 3) and (drawn[26:31, 20:40] != BACKGROUND).any(axis=2).all()
    # A full-size mask alone is BIG_W * BIG_H bytes (24 MB), the pixels 3 times that; drawing costs a few
    # float copies of the picture (2.9 MB each), whatever the image's size.
    assert peak < min(BIG_W * BIG_H * 3 // 4, 6 * picture.size * 4), peak


def test_a_scaled_down_picture_labels_only_objects_as_tall_as_a_label() -> None:
    """Thousands of nuclei on a slide, shrunk, would be all labels: a small one gets its mask and box."""
    picture = np.empty((400, 600, 3), dtype=np.uint8)
    picture[...] = BACKGROUND
    tiny = big_instance(0) | {"bbox": [3000.0, 1000.0, 30.0, 30.0], "rle": rectangle_rle(3000, 1000, 30, 30)}
    drawn = np.asarray(draw_overlay(picture, [tiny], view=View(BIG_W, BIG_H, (0, 0, BIG_W, BIG_H))))
    changed = np.argwhere((drawn != BACKGROUND).any(axis=2))
    assert changed.min(axis=0).tolist() == [100, 300] and changed.max(axis=0).tolist() == [102, 302]
    # At full size (a region of its own size), the same instance is labelled, as every instance always was.
    region = View(BIG_W, BIG_H, (2900, 900, 600, 400))
    drawn = np.asarray(draw_overlay(picture, [tiny], view=region))
    assert (drawn != BACKGROUND).any(axis=2).sum() > 30 * 30 + 200


def test_render_rows_of_small_images_is_unchanged_by_the_bound(
    output: Output, tmp_path: pathlib.Path
) -> None:
    row = output.rows[0]
    (default,) = render_rows([row], str(tmp_path / "default"))
    (exact,) = render_rows([row], str(tmp_path / "exact"), max_side=max(row["width"], row["height"]))
    pixels = decode_image(pathlib.Path(row["uri"]).read_bytes())
    expected = np.asarray(draw_overlay(pixels, row["instances"]))
    for path in (default, exact):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)
    (shrunk,) = render_rows([row], str(tmp_path / "shrunk"), max_side=max(row["width"], row["height"]) // 2)
    assert max(Image.open(shrunk).size) == max(row["width"], row["height"]) // 2


def test_render_command_draws_a_region_at_max_side(
    output: Output, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    argv = [
        "render",
        output.uri,
        "--out",
        str(out),
        "--limit",
        "1",
        "--max-side",
        "40",
        "--region",
        "10,5,60,30",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"1 images rendered to {out}"
    (png,) = out.iterdir()
    assert Image.open(png).size == (40, 20)


def test_a_region_outside_every_image_is_refused_and_nothing_is_written(
    output: Output, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok = sorted((r for r in output.rows if r["status"] == "ok"), key=lambda r: r["width"])
    narrow, wide = ok[0], ok[-1]
    assert narrow["width"] < wide["width"]
    with pytest.raises(BatchsegError, match=r"region \(0, 0, 100000, 5\) reaches beyond every image drawn"):
        render_rows(output.rows, str(tmp_path / "none"), region=(0, 0, 100_000, 5))
    assert not list((tmp_path / "none").iterdir())
    # Outside some images only: those are skipped, with the warning.
    capsys.readouterr()
    written = render_rows([narrow, wide], str(tmp_path / "some"), region=(1, 0, wide["width"] - 1, 5))
    assert [pathlib.Path(p).name for p in written] == [f"{wide['image_id']}.png"]
    assert Image.open(written[0]).size == (wide["width"] - 1, 5)
    assert "skipped 1 (1 region beyond the image" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 1 pixel"):
        render_rows(ok, str(tmp_path / "x"), max_side=0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-side", "0"], "argument --max-side: must be at least 1, not 0"),
        (["--max-side", "-5"], "argument --max-side: must be at least 1, not -5"),
        (["--max-side", "nan"], "argument --max-side: expected a whole number, not 'nan'"),
        (["--region", "0,0,0,10"], "argument --region: a region is LEFT,TOP,WIDTH,HEIGHT with"),
        (["--region=-1,0,10,10"], "argument --region: a region is LEFT,TOP,WIDTH,HEIGHT with"),
        (["--region", "0,0,10"], "argument --region: a region is LEFT,TOP,WIDTH,HEIGHT with"),
        (["--region", "nan,0,10,10"], "argument --region: expected numbers like LEFT,TOP,WIDTH,HEIGHT"),
        (
            ["--region", "0,0,100000,10"],
            "error: the region (0, 0, 100000, 10) reaches beyond every image drawn",
        ),
    ],
)
def test_render_refuses_bad_sizes_and_regions_with_one_line_and_writes_nothing(
    output: Output, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "rendered"
    assert message in refusal(["render", output.uri, "--out", str(out), *argv], capsys)
    assert not out.exists() or not list(out.iterdir())
