"""Synthetic "shapes" images (random background, filled circles, squares and triangles) for demos and tests."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from batchseg.format.rle import encode_rle
from batchseg.io import storage

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


@dataclass(frozen=True)
class SynthDataset:
    """Where :func:`write_dataset` put things (URIs)."""

    images: str  # folder of img-NNNNNN.jpg
    annotations: str  # COCO instances JSON; file_name is relative to ``images``
    manifest: str  # CSV (uri, image_id) that ``batchseg segment`` takes; image_id is the COCO image id
    uris: list[str]


def write_dataset(
    output: str, count: int, seed: int = 0, size: int = 128, storage_options: dict[str, Any] | None = None
) -> SynthDataset:
    """Write a shapes data set under ``output`` (any fsspec URI), deterministic per ``seed``:
    ``images/img-NNNNNN.jpg``, ``annotations.json`` (COCO, masks as compressed RLE) and ``manifest.csv``."""
    rng = np.random.default_rng(seed)
    fs, root = storage.filesystem(output, storage_options)
    fs.makedirs(storage.join(root, "images"), exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    names: list[str] = []
    for index in range(count):
        shape = draw_shapes(rng, size)
        name = f"img-{index:06d}.jpg"
        fs.pipe_file(storage.join(root, "images", name), jpeg_bytes(shape.pixels))
        height, width = shape.pixels.shape[:2]
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for category, mask in shape.instances:
            annotations.append(coco_annotation(mask, category, image_id, len(annotations) + 1))
        names.append(name)
    coco = {"images": images, "annotations": annotations, "categories": coco_categories()}
    fs.pipe_file(storage.join(root, "annotations.json"), json.dumps(coco).encode())
    manifest = "uri,image_id\n" + "".join(f"images/{n},{i + 1}\n" for i, n in enumerate(names))
    fs.pipe_file(storage.join(root, "manifest.csv"), manifest.encode())
    return SynthDataset(
        images=storage.join(output, "images"),
        annotations=storage.join(output, "annotations.json"),
        manifest=storage.join(output, "manifest.csv"),
        uris=[storage.join(output, "images", n) for n in names],
    )


def coco_annotation(mask: np.ndarray, category: int, image_id: int, annotation_id: int) -> dict[str, Any]:
    """One instance as a COCO annotation: ``mask`` (H x W bool, the image's size, not empty) as compressed
    RLE, with its tight ``bbox`` ``[x, y, w, h]`` and its area in pixels."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category,
        "segmentation": {"size": list(mask.shape), "counts": encode_rle(mask)},
        "area": int(mask.sum()),
        "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
        "iscrowd": 0,
    }


def coco_categories() -> list[dict[str, Any]]:
    return [{"id": i, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES) if i]


@dataclass(frozen=True)
class Scene:
    """Shapes images pasted onto one large background (a stand-in for an aerial scene or a slide full of
    small objects): ``pixels`` (H x W x 3 uint8) and ``parts``, each ``(top, left, image)``: where a pasted
    image's top-left corner lies; its instances' masks stay in its own pixels."""

    pixels: np.ndarray
    parts: list[tuple[int, int, ShapeImage]]

    def coco(self, file_name: str, image_id: int = 1) -> dict[str, Any]:
        """The scene's ground truth as a COCO instances JSON of one image: every part's instances, their
        masks moved to scene pixels (built one at a time: a full-size mask per instance is never held)."""
        height, width = self.pixels.shape[:2]
        annotations: list[dict[str, Any]] = []
        for top, left, part in self.parts:
            for category, mask in part.instances:
                full = np.zeros((height, width), dtype=bool)
                full[top : top + mask.shape[0], left : left + mask.shape[1]] = mask
                annotations.append(coco_annotation(full, category, image_id, len(annotations) + 1))
        image = {"id": image_id, "file_name": file_name, "width": width, "height": height}
        return {"images": [image], "annotations": annotations, "categories": coco_categories()}

    def parts_coco(self, file_names: list[str]) -> dict[str, Any]:
        """The parts as a COCO instances JSON of one image each (``file_names[i]`` is part ``i``, image id
        ``i + 1``): the ground truth of segmenting them one by one."""
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for image_id, (name, (_, _, part)) in enumerate(zip(file_names, self.parts, strict=True), start=1):
            height, width = part.pixels.shape[:2]
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
            for category, mask in part.instances:
                annotations.append(coco_annotation(mask, category, image_id, len(annotations) + 1))
        return {"images": images, "annotations": annotations, "categories": coco_categories()}


def draw_scene(
    rng: np.random.Generator, images: int = 64, side: int = 1280, size: int = 128, whole: bool = True
) -> Scene:
    """``images`` shapes images (:func:`draw_shapes` of ``size``) pasted at random offsets that never
    overlap onto a ``side`` x ``side`` background of one random colour, as the shapes images' own are:
    each image in its own cell of a square grid, at a random place inside it (the cells must hold the
    largest image, ``size * 5 // 4``). ``whole``: each image pasted whole, its background a rectangle on
    the scene's (which a model of shapes may take for a square); else only its shapes' pixels."""
    per_row = int(np.ceil(np.sqrt(images)))
    cell = side // per_row
    if cell < size * 5 // 4:
        raise ValueError(f"{images} images of up to {size * 5 // 4} px do not fit a grid on {side} px")
    pixels = np.empty((side, side, 3), dtype=np.uint8)
    pixels[:] = _colour(rng)
    parts: list[tuple[int, int, ShapeImage]] = []
    for index in range(images):
        part = draw_shapes(rng, size)
        height, width = part.pixels.shape[:2]
        row, column = divmod(index, per_row)
        top = row * cell + int(rng.integers(0, cell - height, endpoint=True))
        left = column * cell + int(rng.integers(0, cell - width, endpoint=True))
        window = pixels[top : top + height, left : left + width]
        if whole:
            window[:] = part.pixels
        else:
            shapes = np.any([mask for _, mask in part.instances], axis=0)
            window[shapes] = part.pixels[shapes]
        parts.append((top, left, part))
    return Scene(pixels, parts)
