"""Huge images read window by window: a tiled or striped TIFF (BigTIFF, pyramidal: OME-TIFF, SVS, COG) on
any fsspec storage, only the TIFF tiles a window needs fetched (range requests) and decoded, so memory is
bounded by the windows in flight, never by the image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from batchseg.errors import ImageError
from batchseg.io.images import DEFAULT_MAX_PIXELS, decode_image
from batchseg.io.reader import read_image_bytes

# File names read window by window when tiling (others are read and decoded whole).
WINDOWED_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs")


@dataclass(frozen=True)
class Geo:
    """Where a geo-referenced image lies on the map: ``transform`` maps pixel (column, row) to map (x, y)
    in GDAL's order ``(x0, dx, rx, y0, ry, dy)``: ``x = x0 + col * dx + row * rx``, ``y = y0 + col * ry +
    row * dy`` (pixel corners, GeoTIFF's PixelIsArea); ``crs`` is e.g. ``"EPSG:32633"``, None when the
    file names none."""

    transform: tuple[float, float, float, float, float, float]
    crs: str | None


class WindowedImage:
    """One TIFF image (its first series, full resolution at level 0) read window by window.

    ``width`` and ``height`` are level 0's; ``levels`` the ``(width, height)`` of each pyramid level (level
    0 first); ``geo`` its map placement, or None. Safe to read from several threads at once."""

    uri: str
    width: int
    height: int
    levels: tuple[tuple[int, int], ...]
    geo: Geo | None

    def read(self, top: int, left: int, height: int, width: int, level: int = 0) -> np.ndarray:
        """The ``height x width x 3`` uint8 RGB pixels of the window at ``(top, left)`` of ``level`` (clipped
        to the image), as :func:`batchseg.io.images.decode_image` would give them. Raises
        :class:`ImageError` (``corrupt_image``) for a tile that cannot be decoded, and
        :class:`~batchseg.errors.StorageUnavailable` when storage stays unavailable."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def is_windowed(uri: str) -> bool:
    """Whether ``uri``'s name says it may be read window by window (a TIFF)."""
    return uri.lower().endswith(WINDOWED_SUFFIXES)


def open_windowed(
    uri: str, storage_options: dict[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> WindowedImage | None:
    """``uri`` opened for windowed reads (its header and tile index only), or None when it is better read
    whole (not a TIFF, or one stored as a single strip, or turned by an Orientation tag). Raises
    :class:`ImageError` for a broken file or one over ``max_pixels``, and
    :class:`~batchseg.errors.StorageUnavailable` when storage stays unavailable."""
    raise NotImplementedError


def preview(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    max_side: int = 2048,
    region: tuple[int, int, int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, float]:
    """The image (or its ``region = (left, top, width, height)`` in full-resolution pixels) scaled down so
    that its longer side is at most ``max_side``: ``(pixels, scale)``, ``scale`` = output pixels per image
    pixel (at most 1). A windowed TIFF is read from the smallest pyramid level that is still large enough;
    anything else is decoded whole (within ``max_pixels``) and then scaled. Raises :class:`ImageError`.

    This first version decodes whole; the windowed one replaces it."""
    from PIL import Image

    pixels = decode_image(read_image_bytes(uri, storage_options), max_pixels)
    if region is not None:
        left, top, width, height = region
        pixels = pixels[top : top + height, left : left + width]
    if not pixels.size:
        raise ImageError("corrupt_image", f"the region {region} lies outside the image")
    scale = min(1.0, max_side / max(pixels.shape[:2]))
    if scale < 1:
        size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
    return pixels, scale
