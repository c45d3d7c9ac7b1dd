"""TIFF files for tests and benchmarks, written with tifffile: tiled, striped, BigTIFF, pyramidal (SubIFDs,
pages as a COG has them, OME-TIFF), geo-referenced, and generated tile by tile so that no full-size array
exists; zlib (deflate) compression, which needs no imagecodecs."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tifffile

# GeoTIFF's tags (GeoTIFF 1.1): a tag's code and TIFF type as tifffile's extratags take them.
PIXEL_SCALE, TIEPOINT, TRANSFORMATION, GEO_KEYS = (33550, 12), (33922, 12), (34264, 12), (34735, 3)


def random_pixels(
    height: int, width: int, samples: int = 3, dtype: Any = np.uint8, seed: int = 0
) -> np.ndarray:
    """Noise: every pixel differs from its neighbours, so a window read from the wrong place shows."""
    rng = np.random.default_rng(seed)
    shape = (height, width, samples) if samples > 1 else (height, width)
    if np.dtype(dtype).kind == "f":
        return (rng.random(shape, dtype=np.float32) * 300 - 20).astype(dtype)  # some outside [0, 255]
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def write_tiled(path: pathlib.Path, pixels: np.ndarray, tile: int = 64, **options: Any) -> pathlib.Path:
    """``pixels`` in ``tile x tile`` tiles, zlib-compressed; ``options`` go to ``tifffile.imwrite``
    (``bigtiff=True``, ``photometric``, ``extrasamples``, ``planarconfig``, ``extratags``...)."""
    options.setdefault("compression", "zlib")
    tifffile.imwrite(path, pixels, tile=(tile, tile), **_photometric(pixels, options))
    return path


def write_striped(
    path: pathlib.Path, pixels: np.ndarray, rows_per_strip: int = 16, **options: Any
) -> pathlib.Path:
    """``pixels`` in strips of ``rows_per_strip`` rows (the whole image in one strip if that many), zlib."""
    options.setdefault("compression", "zlib")
    tifffile.imwrite(path, pixels, rowsperstrip=rows_per_strip, **_photometric(pixels, options))
    return path


def halved(pixels: np.ndarray, times: int) -> np.ndarray:
    """``pixels`` with every other row and column dropped ``times`` times: a pyramid's level ``times``."""
    step = 2**times
    return np.ascontiguousarray(pixels[::step, ::step])


def write_pyramid(
    path: pathlib.Path, pixels: np.ndarray, levels: int = 3, tile: int = 64, style: str = "subifds"
) -> pathlib.Path:
    """``pixels`` and ``levels - 1`` halvings of it (:func:`halved`), tiled: as SubIFDs of the first page
    (``"subifds"``), as the pages that follow it with NewSubfileType 1 (``"pages"``, as a COG or an SVS
    holds its levels), or as an OME-TIFF (``"ome"``, levels in SubIFDs, OME-XML in the first page)."""
    options = _photometric(pixels, {"compression": "zlib", "tile": (tile, tile)})
    with tifffile.TiffWriter(path, ome=style == "ome") as tiff:
        tiff.write(pixels, subifds=levels - 1 if style in ("subifds", "ome") else None, **options)
        for level in range(1, levels):
            tiff.write(halved(pixels, level), subfiletype=1, **options)
    return path


def geo_tags(
    epsg: int | None = 32633,
    origin: tuple[float, float] = (500_000.0, 4_600_000.0),
    pixel: tuple[float, float] = (10.0, 10.0),
    tiepoint_pixel: tuple[float, float] = (0.0, 0.0),
    pixel_is_point: bool = False,
    geographic: bool = False,
    matrix: tuple[float, ...] | None = None,
) -> list[tuple[int, int, int, Any, bool]]:
    """GeoTIFF tags as ``extratags`` for tifffile: ``tiepoint_pixel`` (column, row) lies at ``origin`` on the
    map, pixels ``pixel`` map units wide and high (north up); or the 4x4 ``matrix`` (row-major) as a
    ModelTransformation. ``epsg`` goes in ProjectedCSTypeGeoKey (GeographicTypeGeoKey if ``geographic``;
    32767 = user-defined; None: no CRS key)."""
    keys = [(1024, 0, 1, 2 if geographic else 1), (1025, 0, 1, 2 if pixel_is_point else 1)]
    if epsg is not None:
        keys.append((2048 if geographic else 3072, 0, 1, epsg))
    directory = [1, 1, 0, len(keys)] + [v for key in keys for v in key]
    tags: list[tuple[int, int, int, Any, bool]] = [(*GEO_KEYS, len(directory), directory, True)]
    if matrix is not None:
        tags.append((*TRANSFORMATION, 16, matrix, True))
    else:
        tiepoint = (*tiepoint_pixel, 0.0, *origin, 0.0)
        tags += [(*PIXEL_SCALE, 3, (*pixel, 0.0), True), (*TIEPOINT, 6, tiepoint, True)]
    return tags


def write_generated(
    path: pathlib.Path,
    width: int,
    height: int,
    tile_at: Callable[[int, int, int, int, int], np.ndarray],
    tile: int = 256,
    levels: int = 1,
    **options: Any,
) -> pathlib.Path:
    """A tiled RGB (uint8) TIFF written one tile at a time, never holding more than a tile: BigTIFF, zlib,
    with ``levels - 1`` halved levels in SubIFDs. ``tile_at(top, left, rows, columns, step)`` gives the
    ``rows x columns x 3`` pixels of level ``log2(step)`` at ``(top, left)`` of that level (level 0 pixel
    ``(top * step, left * step)``); tiles past the image's edge are asked for whole."""
    options = {"compression": "zlib", "photometric": "rgb", "bigtiff": True, **options}
    with tifffile.TiffWriter(path, bigtiff=options.pop("bigtiff")) as tiff:
        for level in range(levels):
            step = 2**level
            shape = (-(-height // step), -(-width // step), 3)  # ceil: the halvings keep odd edges
            tiff.write(
                _tiles(shape, tile, step, tile_at),
                shape=shape,
                dtype=np.uint8,
                tile=(tile, tile),
                subifds=levels - 1 if level == 0 and levels > 1 else None,
                subfiletype=1 if level else 0,
                **options,
            )
    return path


def _tiles(
    shape: tuple[int, int, int],
    tile: int,
    step: int,
    tile_at: Callable[[int, int, int, int, int], np.ndarray],
) -> Iterator[np.ndarray]:
    for top in range(0, shape[0], tile):
        for left in range(0, shape[1], tile):
            yield tile_at(top, left, tile, tile, step)


def _photometric(pixels: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
    """tifffile takes three samples as RGB only when told; say what ``pixels`` are unless the caller did."""
    if "photometric" not in options:
        contig = pixels.ndim == 3 and options.get("planarconfig", "contig") in ("contig", 1)
        samples = pixels.shape[-1] if contig else (pixels.shape[0] if pixels.ndim == 3 else 1)
        options["photometric"] = "rgb" if samples in (3, 4) else "minisblack"
    return options
