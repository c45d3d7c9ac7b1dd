"""Synthetic "shapes" images (random background, filled circles, squares and triangles) for demos and tests."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from batchseg import storage

CATEGORIES = ("__background__", "circle", "square", "triangle")


@dataclass(frozen=True)
class ShapeImage:
    """One generated image: RGB pixels (H x W x 3 uint8) and its instances, drawn back to front, as
    (category index into CATEGORIES, visible H x W bool mask after occlusion by later shapes)."""

    pixels: np.ndarray
    instances: list[tuple[int, np.ndarray]]


def draw_shapes(rng: np.random.Generator, size: int = 128, max_shapes: int = 4) -> ShapeImage:
    """A random image near ``size`` pixels a side with 1 to ``max_shapes`` shapes, partly occluding."""
    width, height = (int(v) for v in rng.integers(size * 3 // 4, size * 5 // 4, size=2, endpoint=True))
    image = Image.new("RGB", (width, height), _colour(rng))
    draw = ImageDraw.Draw(image)
    masks: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, max_shapes, endpoint=True))):
        category = int(rng.integers(1, len(CATEGORIES)))
        r = int(rng.integers(max(4, size // 10), max(5, size // 4)))
        cx, cy = int(rng.integers(r, width - r)), int(rng.integers(r, height - r))
        layer = Image.new("1", (width, height), 0)
        pen = ImageDraw.Draw(layer)
        colour = _colour(rng)
        for target, fill in ((draw, colour), (pen, 1)):
            if category == 1:
                target.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            elif category == 2:
                target.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                target.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        mask = np.array(layer, dtype=bool)
        masks = [(c, m & ~mask) for c, m in masks]
        masks.append((category, mask))
    return ShapeImage(np.array(image), [(c, m) for c, m in masks if m.any()])


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(0, 256, size=3))
    return r, g, b


def jpeg_bytes(pixels: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_shape_images(output: str, count: int, size: int = 128, seed: int = 0) -> list[str]:
    """Write ``img-000000.jpg``... under ``output`` (any fsspec URI) plus ``manifest.csv`` naming them;
    deterministic per ``seed``. Returns the image URIs in order."""
    rng = np.random.default_rng(seed)
    fs, root = storage.filesystem(output)
    fs.makedirs(root, exist_ok=True)
    names = []
    for index in range(count):
        name = f"img-{index:06d}.jpg"
        fs.pipe_file(storage.join(root, name), jpeg_bytes(draw_shapes(rng, size).pixels))
        names.append(name)
    manifest = "uri\n" + "".join(f"{n}\n" for n in names)
    fs.pipe_file(storage.join(root, "manifest.csv"), manifest.encode())
    return [storage.join(output, n) for n in names]
