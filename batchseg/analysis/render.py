"""Draw segmentation rows onto their images: mask overlays with boxes, labels and keypoints, or colour splash."""

from __future__ import annotations

import colorsys
import hashlib
import io
import logging
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from batchseg.errors import job_errors
from batchseg.format.rle import decode_rle
from batchseg.io import atomic, storage
from batchseg.io.images import decode_image

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


def draw_overlay(pixels: np.ndarray, instances: list[dict[str, Any]], style: str = "overlay") -> Image.Image:
    """Draw one row's ``instances`` onto its image; returns a new RGB image of the same size.

    ``pixels`` is the image as displayed, ``(height, width, 3)`` ``uint8`` RGB (``images.decode_image``);
    it is not modified. ``instances`` are the row's structs (``records.INSTANCE``): ``bbox`` is
    ``[x, y, width, height]`` in pixels, ``rle`` COCO compressed RLE counts for a ``height x width``
    mask (or None for box-only models), ``keypoints`` flat ``x, y, v`` triplets in pixels (or None).
    The i-th instance is drawn in ``instance_colour(i)``.

    ``style="overlay"``: each mask blended with its colour (weight ``MASK_ALPHA``) and outlined in it,
    the box, the keypoints with v > 0 (and, for COCO's 17, the skeleton between them) and a
    ``"category 0.93"`` label at the box's top-left. ``style="splash"``: pixels inside any mask (the
    box, for a box-only instance) keep their colour, all others become their luminance, as grey RGB.

    Raises ``ValueError`` for an unknown style, pixels of another shape or dtype, or an RLE that does
    not cover ``height x width`` pixels.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: expected one of {', '.join(STYLES)}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be (height, width, 3) uint8, not {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    if style == "splash":
        return Image.fromarray(_splash(pixels, instances))
    line = 1 if max(height, width) < 600 else 2  # a 2 px line vanishes less when a big image is shrunk
    blended = pixels.astype(np.float32)
    # Masks are decoded one at a time and only their edges kept (as flat pixel indices): a hundred
    # full-size masks of a large photo would not fit in memory together.
    outlines: list[np.ndarray] = []
    for index, instance in enumerate(instances):
        mask = _mask(instance, height, width)
        if mask is None:
            outlines.append(np.zeros(0, dtype=np.intp))
            continue
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            outlines.append(np.zeros(0, dtype=np.intp))
            continue
        # Work inside the mask's extent: a small object in a large photo costs what the object does.
        y0, x0 = int(rows[0]), int(cols[0])
        mask = mask[y0 : rows[-1] + 1, x0 : cols[-1] + 1]
        region = blended[y0 : rows[-1] + 1, x0 : cols[-1] + 1]
        colour = np.asarray(instance_colour(index), dtype=np.float32)
        region[mask] = region[mask] * (1.0 - MASK_ALPHA) + colour * MASK_ALPHA
        ys, xs = np.nonzero(_boundary(mask, line))
        outlines.append((ys + y0) * width + (xs + x0))
    flat = blended.reshape(-1, 3)
    for index, edge in enumerate(outlines):  # after every blend, so a later mask cannot fade an outline
        flat[edge] = instance_colour(index)
    image = Image.fromarray(np.rint(blended).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for index, instance in enumerate(instances):
        box = _box(instance.get("bbox"), width, height)
        if box is not None:
            draw.rectangle(box, outline=instance_colour(index), width=line)
        if instance.get("keypoints") is not None:
            _draw_keypoints(draw, instance["keypoints"], instance_colour(index), line + 1)
    # Labels last, so that no other instance's box or mask covers one.
    font = ImageFont.load_default(_font_size(width, height))
    for index, instance in enumerate(instances):
        box = _box(instance.get("bbox"), width, height)
        if box is not None:
            _draw_label(draw, font, _label_text(instance), box, instance_colour(index), width, height)
    return image


def _mask(instance: dict[str, Any], height: int, width: int) -> np.ndarray | None:
    rle = instance.get("rle")
    return None if rle is None else decode_rle(rle, height, width)


def _splash(pixels: np.ndarray, instances: list[dict[str, Any]]) -> np.ndarray:
    height, width = pixels.shape[:2]
    keep = np.zeros((height, width), dtype=bool)
    for instance in instances:
        mask = _mask(instance, height, width)
        if mask is not None:
            keep |= mask
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
) -> list[str]:
    """Draw each ``ok`` row onto its image (read again from the row's ``uri``) and write
    ``<out_dir>/<safe_name(image_id)>.png``; returns the URIs written, in row order.

    ``rows`` are output rows as dicts (``records.SCHEMA``; at least image_id, uri, width, height, status,
    instances); ``out_dir`` is any fsspec URI. Error rows are skipped. An image that cannot be read or
    decoded, whose displayed size is not the row's, or whose row does not fit it, is skipped; one warning
    sums up the skipped images. Raises ``ValueError`` for an unknown style and ``BatchsegError`` when
    ``out_dir`` cannot be written.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: expected one of {', '.join(STYLES)}")
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
        image, reason = _render_row(row, style, storage_options)
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
    if skipped:
        reasons = "; ".join(f"{n} {reason}, e.g. {first[reason]}" for reason, n in skipped.most_common())
        log.warning(f"render: wrote {len(written)} images, skipped {sum(skipped.values())} ({reasons})")
    return written


def _render_row(
    row: dict[str, Any], style: str, storage_options: dict[str, Any] | None
) -> tuple[Image.Image | None, str]:
    """The drawn image, or None and why not (``"<reason>: <detail>"``); never raises for one image."""
    try:
        pixels = decode_image(storage.read_bytes(row["uri"], storage_options))
    except Exception as e:  # missing, unreadable, corrupt or storage gone: this image alone is skipped
        return None, f"unreadable: {type(e).__name__}: {e}"
    height, width = pixels.shape[:2]
    if (width, height) != (row.get("width"), row.get("height")):
        return None, (
            f"size differs: the image is {width}x{height} now, the row says {row.get('width')}x{row.get('height')}"
        )
    try:
        return draw_overlay(pixels, list(row.get("instances") or []), style), ""
    except ValueError as e:  # an RLE that does not fit: the row, not this renderer, is wrong
        return None, f"bad instances: {e}"
