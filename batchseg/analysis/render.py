"""Draw segmentation rows onto their images: mask overlays with boxes, labels and keypoints, or colour splash."""

from __future__ import annotations

import colorsys
import hashlib
import io
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from batchseg.errors import BatchsegError, job_errors
from batchseg.format.rle import decode_window
from batchseg.io import atomic, storage
from batchseg.io.windowed import preview

log = logging.getLogger(__name__)

STYLES = ("overlay", "splash")
MASK_ALPHA = 0.45
"""Weight of an instance's colour in its blended mask pixels (the image keeps ``1 - MASK_ALPHA``)."""

COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip
"""The 19 limbs of COCO's person keypoints (nose, eyes, ears, shoulders, elbows, wrists, hips, knees,
ankles), as pairs of 0-based keypoint indices: COCO's ``skeleton`` with 1 subtracted."""

DEFAULT_MAX_SIDE = 4096
"""The longest side of a drawn picture unless told otherwise: a larger image (a slide, a satellite scene) is
drawn scaled down to it, from a pyramid level where its file has one, and with its masks sampled at that
scale; a photo up to 4096 px a side (a 12 MP camera's 4032 x 3024) is drawn at full size, as always."""

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def instance_colour(index: int) -> tuple[int, int, int]:
    """The RGB colour (0-255 each) of the ``index``-th instance of an image, the same on every call.

    Hues step by the golden ratio, so neighbouring indices differ strongly and no two of the first few
    dozen are close; saturation and value stay high so the colour shows on photos and on grey.
    """
    hue = (0.05 + index * _GOLDEN_RATIO_CONJUGATE) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.8, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


@dataclass(frozen=True)
class View:
    """What a picture shows of an image: its ``region`` ``(left, top, width, height)``, in the pixels of the
    ``width x height`` image its row describes, stretched over the whole picture (each axis by its own
    scale, picture pixels per image pixel)."""

    width: int
    height: int
    region: tuple[int, int, int, int]

    @classmethod
    def whole(cls, width: int, height: int) -> View:
        return cls(width, height, (0, 0, width, height))

    def shows(self, instance: dict[str, Any]) -> bool:
        """Whether ``instance`` is drawn: a region leaves out instances whose box lies wholly outside it,
        while the whole image draws every instance, as it always has (a box off the image at its edge)."""
        bbox = instance.get("bbox")
        if self.region == (0, 0, self.width, self.height) or bbox is None or len(bbox) != 4:
            return True
        left, top, width, height = self.region
        x, y, w, h = (float(v) for v in bbox)
        return x < left + width and x + w > left and y < top + height and y + h > top


def draw_overlay(
    pixels: np.ndarray, instances: list[dict[str, Any]], style: str = "overlay", view: View | None = None
) -> Image.Image:
    """Draw one row's ``instances`` onto its image; returns a new RGB image of the same size.

    ``pixels`` is the image as displayed, ``(height, width, 3)`` ``uint8`` RGB (``images.decode_image``);
    it is not modified. ``instances`` are the row's structs (``records.INSTANCE``): ``bbox`` is
    ``[x, y, width, height]`` in pixels, ``rle`` COCO compressed RLE counts for a ``height x width``
    mask (or None for box-only models), ``keypoints`` flat ``x, y, v`` triplets in pixels (or None).
    The i-th instance is drawn in ``instance_colour(i)``. ``view`` says which part of the row's image
    ``pixels`` show, scaled to their size (default: all of it, at full size); masks are then decoded for
    the picture's pixels only (``rle.decode_window``), and boxes, keypoints and labels moved and scaled.

    ``style="overlay"``: each mask blended with its colour (weight ``MASK_ALPHA``) and outlined in it,
    the box, the keypoints with v > 0 (and, for COCO's 17, the skeleton between them) and a
    ``"category 0.93"`` label at the box's top-left (in a picture scaled down, only for a box at least as
    tall as the label's text). ``style="splash"``: pixels inside any mask (the
    box, for a box-only instance) keep their colour, all others become their luminance, as grey RGB.

    Raises ``ValueError`` for an unknown style, pixels of another shape or dtype, or an RLE that does
    not cover the row's ``height x width`` pixels.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: expected one of {', '.join(STYLES)}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be (height, width, 3) uint8, not {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    view = view or View.whole(width, height)
    shown = [(index, _placed(i, view, width, height)) for index, i in enumerate(instances) if view.shows(i)]
    if style == "splash":
        return Image.fromarray(_splash(pixels, shown, view))
    line = 1 if max(height, width) < 600 else 2  # a 2 px line vanishes less when a big image is shrunk
    blended = pixels.astype(np.float32)
    # Masks are decoded one at a time, for the picture's pixels within their extent only, and only their
    # edges kept (as flat pixel indices): a hundred masks at the picture's size would not fit together.
    outlines: list[tuple[int, np.ndarray]] = []
    for index, instance in shown:
        window = _mask(instance, view, height, width)
        if window is None:
            continue
        mask, y0, x0 = window
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            continue
        mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        y0, x0 = y0 + int(rows[0]), x0 + int(cols[0])
        region = blended[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        colour = np.asarray(instance_colour(index), dtype=np.float32)
        region[mask] = region[mask] * (1.0 - MASK_ALPHA) + colour * MASK_ALPHA
        ys, xs = np.nonzero(_boundary(mask, line))
        outlines.append((index, (ys + y0) * width + (xs + x0)))
    flat = blended.reshape(-1, 3)
    for index, edge in outlines:  # after every blend, so a later mask cannot fade an outline
        flat[edge] = instance_colour(index)
    # Rounded in place: a 4096 px picture is 200 MB as float32, and the copy would be as much again.
    image = Image.fromarray(np.rint(blended, out=blended).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for index, instance in shown:
        box = _box(instance.get("bbox"), width, height)
        if box is not None:
            draw.rectangle(box, outline=instance_colour(index), width=line)
        if instance.get("keypoints") is not None:
            _draw_keypoints(draw, instance["keypoints"], instance_colour(index), line + 1)
    # Labels last, so that no other instance's box or mask covers one.
    font_size = _font_size(width, height)
    font = ImageFont.load_default(font_size)
    scaled_down = width < view.region[2] or height < view.region[3]
    for index, instance in shown:
        box = _box(instance.get("bbox"), width, height)
        # A slide's thousands of small objects, shrunk, would be covered by their labels: there, only an
        # object at least as tall as a label's text gets one.
        if box is not None and not (scaled_down and box[3] - box[1] + 1 < font_size):
            _draw_label(draw, font, _label_text(instance), box, instance_colour(index), width, height)
    return image


def _placed(instance: dict[str, Any], view: View, width: int, height: int) -> dict[str, Any]:
    """``instance`` with its box and keypoints moved into a ``width x height`` picture of ``view``."""
    left, top, region_w, region_h = view.region
    sx, sy = width / region_w, height / region_h
    placed = dict(instance)
    bbox = instance.get("bbox")
    if bbox is not None and len(bbox) == 4:
        x, y, w, h = (float(v) for v in bbox)
        placed["bbox"] = [(x - left) * sx, (y - top) * sy, w * sx, h * sy]
    if instance.get("keypoints") is not None:
        points = np.asarray(instance["keypoints"], dtype=np.float64)
        points = points[: len(points) // 3 * 3].reshape(-1, 3)
        placed["keypoints"] = np.column_stack(
            ((points[:, 0] - left) * sx, (points[:, 1] - top) * sy, points[:, 2])
        ).ravel()
    return placed


def _mask(
    instance: dict[str, Any], view: View, height: int, width: int
) -> tuple[np.ndarray, int, int] | None:
    """The instance's mask in a ``height x width`` picture of ``view``: ``rle.decode_window``'s crop and its
    place, or None for a box-only instance."""
    rle = instance.get("rle")
    return None if rle is None else decode_window(rle, view.height, view.width, view.region, (height, width))


def _splash(pixels: np.ndarray, shown: list[tuple[int, dict[str, Any]]], view: View) -> np.ndarray:
    height, width = pixels.shape[:2]
    keep = np.zeros((height, width), dtype=bool)
    for _, instance in shown:
        window = _mask(instance, view, height, width)
        if window is not None:
            mask, y0, x0 = window
            keep[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] |= mask
        else:  # a box-only model's instance: its box is the best "inside" there is
            box = _box(instance.get("bbox"), width, height)
            if box is not None:
                keep[box[1] : box[3] + 1, box[0] : box[2] + 1] = True
    # ITU-R BT.601 luma, the weights of PIL's convert("L").
    luma = np.rint(pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    grey = np.repeat(np.clip(luma, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return np.where(keep[:, :, None], pixels, grey)


def _boundary(mask: np.ndarray, thickness: int) -> np.ndarray:
    """The mask pixels within ``thickness`` pixels (4-neighbour steps) of its edge or the image's edge."""
    inner = mask.copy()
    for _ in range(thickness):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[[0, -1], :] = False
        shrunk[:, [0, -1]] = False
        inner = shrunk
    return mask & ~inner


def _box(bbox: Any, width: int, height: int) -> tuple[int, int, int, int] | None:
    """COCO ``[x, y, w, h]`` as the inclusive pixel corners ``(x0, y0, x1, y1)`` PIL draws, inside the image."""
    if bbox is None or len(bbox) != 4:
        return None
    x, y, w, h = (float(v) for v in bbox)
    x0 = min(max(round(x), 0), width - 1)
    y0 = min(max(round(y), 0), height - 1)
    x1 = min(max(round(x + w) - 1, x0), width - 1)  # a w-pixel box covers x .. x + w - 1
    y1 = min(max(round(y + h) - 1, y0), height - 1)
    return x0, y0, x1, y1


def _font_size(width: int, height: int) -> int:
    # 10 px (the smallest that stays readable) up to ~600 px images, then growing with the image.
    return max(10, min(48, round(max(width, height) / 60)))


def _label_text(instance: dict[str, Any]) -> str:
    name = instance.get("category") or f"class {instance.get('category_id')}"
    score = instance.get("score")
    return name if score is None else f"{name} {score:.2f}"


def _draw_label(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    text: str,
    box: tuple[int, int, int, int],
    colour: tuple[int, int, int],
    width: int,
    height: int,
) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    label_w, label_h = right - left + 2 * pad, bottom - top + 2 * pad
    # Above the box where there is room, else just inside its top edge; always inside the image.
    x = max(0, min(box[0], width - label_w))
    y = box[1] - label_h if box[1] >= label_h else box[1]
    y = max(0, min(y, height - label_h))
    draw.rectangle((x, y, x + label_w - 1, y + label_h - 1), fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    draw.text((x + pad - left, y + pad - top), text, fill=ink, font=font)


def _draw_keypoints(
    draw: ImageDraw.ImageDraw, keypoints: Any, colour: tuple[int, int, int], line: int
) -> None:
    points = np.asarray(keypoints, dtype=np.float64)
    points = points[: len(points) // 3 * 3].reshape(-1, 3)
    visible = points[:, 2] > 0
    if len(points) == 17:  # the skeleton only means something for COCO's person keypoints
        for a, b in COCO_SKELETON:
            if visible[a] and visible[b]:
                draw.line(
                    [(points[a, 0], points[a, 1]), (points[b, 0], points[b, 1])], fill=colour, width=line
                )
    radius = line + 1
    for x, y, _ in points[visible]:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour, outline=(255, 255, 255))


def safe_name(image_id: str) -> str:
    """A file name (no extension) for ``image_id``: letters, digits, ``.``, ``_`` and ``-`` only.

    An id that had to be changed (or shortened to 100 characters) gets 10 hex digits of its SHA-1 appended,
    so that two ids never share a file (``a/b`` and ``a_b`` differ).
    """
    name = _UNSAFE_NAME.sub("_", image_id).lstrip(".")[:100]
    if name != image_id or not name:
        name = f"{name}-{hashlib.sha1(image_id.encode()).hexdigest()[:10]}".lstrip("-")
    return name


def render_rows(
    rows: Iterable[dict[str, Any]],
    out_dir: str,
    style: str = "overlay",
    storage_options: dict[str, Any] | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    region: tuple[int, int, int, int] | None = None,
) -> list[str]:
    """Draw each ``ok`` row onto its image (read again from the row's ``uri``) and write
    ``<out_dir>/<safe_name(image_id)>.png``; returns the URIs written, in row order.

    ``rows`` are output rows as dicts (``records.SCHEMA``; at least image_id, uri, width, height, status,
    instances); ``out_dir`` is any fsspec URI. Each picture shows the image, or its ``region`` ``(left,
    top, width, height)`` in image pixels, scaled down so that its longer side is at most ``max_side``
    (:func:`read_picture`). Error rows are skipped. An image that cannot be read or decoded, whose
    displayed size is not the row's, that does not hold the region, or whose row does not fit it, is
    skipped; one warning sums up the skipped images. Raises ``ValueError`` for an unknown style, a
    ``max_side`` under 1 or an empty region, and ``BatchsegError`` when ``out_dir`` cannot be written or
    the region reaches beyond every image (nothing is written then).
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: expected one of {', '.join(STYLES)}")
    check_picture_options(max_side, region)
    fs, root = storage.filesystem(out_dir, storage_options)
    if storage.is_local(fs):
        with job_errors(f"cannot write to {out_dir}"):
            fs.makedirs(root, exist_ok=True)
    written: list[str] = []
    skipped: Counter[str] = Counter()
    first: dict[str, str] = {}  # the first skipped image of each reason, for the warning
    for row in rows:
        if row.get("status") != "ok":
            continue
        image, reason = _render_row(row, style, storage_options, max_side, region)
        if image is None:
            skipped[reason.split(":", 1)[0]] += 1
            first.setdefault(reason.split(":", 1)[0], f"{row.get('uri')}: {reason}")
            continue
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        name = f"{safe_name(str(row['image_id']))}.png"
        with job_errors(f"cannot write {storage.join(out_dir, name)}"):
            atomic.write(fs, storage.join(root, name), buffer.getvalue())
        written.append(storage.join(out_dir, name))
    if not written and skipped[_OUTSIDE] == sum(skipped.values()) > 0:
        raise BatchsegError(f"the region {region} reaches beyond every image drawn, e.g. {first[_OUTSIDE]}")
    if skipped:
        reasons = "; ".join(f"{n} {reason}, e.g. {first[reason]}" for reason, n in skipped.most_common())
        log.warning(f"render: wrote {len(written)} images, skipped {sum(skipped.values())} ({reasons})")
    return written


_OUTSIDE = "region beyond the image"


def check_picture_options(max_side: int, region: tuple[int, int, int, int] | None) -> None:
    """Refuse a ``max_side`` under 1, or a region with a negative corner or no width or height
    (``ValueError``, one line); whether the region lies inside an image is each image's own question."""
    if not max_side >= 1:
        raise ValueError(f"the longest side of a picture must be at least 1 pixel, not {max_side}")
    if region is not None and (len(region) != 4 or min(region[:2]) < 0 or min(region[2:]) < 1):
        raise ValueError(
            f"a region is LEFT,TOP,WIDTH,HEIGHT with LEFT and TOP at least 0 and WIDTH and HEIGHT at "
            f"least 1, not {region}"
        )


def read_picture(
    row: dict[str, Any],
    storage_options: dict[str, Any] | None,
    max_side: int = DEFAULT_MAX_SIDE,
    region: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, View] | str:
    """``row``'s image, or its ``region`` ``(left, top, width, height)`` in image pixels, as a picture whose
    longer side is at most ``max_side`` (``io.windowed.preview``: a pyramid level where the file has one,
    never the whole image at full size then), and the :class:`View` it shows, for :func:`draw_overlay`;
    or why it cannot be drawn (``"<reason>: <detail>"``). An image that fits ``max_side`` is decoded whole
    at full size, as it always was. Never raises for one image."""
    width, height = int(row["width"]), int(row["height"])
    shown = region or (0, 0, width, height)
    left, top, region_w, region_h = shown
    if left + region_w > width or top + region_h > height:
        return f"{_OUTSIDE}: the image is {width}x{height} pixels"
    try:
        pixels, scale = preview(row["uri"], storage_options, max_side, region)
    except Exception as e:  # missing, unreadable, corrupt or storage gone: this image alone is skipped
        return f"unreadable: {type(e).__name__}: {e}"
    shape = (pixels.shape[1], pixels.shape[0])
    if scale == 1 and region is None and shape != (width, height):
        return f"size differs: the image is {shape[0]}x{shape[1]} now, the row says {width}x{height}"
    # A picture scaled down from an image of another size than the row's has other proportions.
    expected = (region_w * scale, region_h * scale)
    if max(abs(shape[0] - expected[0]), abs(shape[1] - expected[1])) > (0 if scale == 1 else 1):
        return (
            f"size differs: the picture of {shown} is {shape[0]}x{shape[1]}, not {expected[0]:.0f}x"
            f"{expected[1]:.0f}: the image is not {width}x{height} as the row says"
        )
    return pixels, View(width, height, shown)


def _render_row(
    row: dict[str, Any],
    style: str,
    storage_options: dict[str, Any] | None,
    max_side: int,
    region: tuple[int, int, int, int] | None,
) -> tuple[Image.Image | None, str]:
    """The drawn image, or None and why not (``"<reason>: <detail>"``); never raises for one image."""
    picture = read_picture(row, storage_options, max_side, region)
    if isinstance(picture, str):
        return None, picture
    pixels, view = picture
    try:
        return draw_overlay(pixels, list(row.get("instances") or []), style, view), ""
    except ValueError as e:  # an RLE that does not fit: the row, not this renderer, is wrong
        return None, f"bad instances: {e}"
