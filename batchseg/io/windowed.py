"""Huge images read window by window: a tiled or striped TIFF (BigTIFF, pyramidal: OME-TIFF, SVS, COG) on
any fsspec storage, only the TIFF tiles a window needs fetched (range requests) and decoded, so memory is
bounded by the windows in flight, never by the image."""

from __future__ import annotations

import bisect
import io
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar, cast

import fsspec
import numpy as np
from fsspec.utils import merge_offset_ranges

from batchseg.errors import ImageError, StorageUnavailable, first_line
from batchseg.io import storage
from batchseg.io.images import (
    DEFAULT_MAX_PIXELS,
    TIFF_SIGNATURES,
    check_size,
    decode_image,
    quiet_tifffile,
    require_tiff_decoder,
    tiff_samples_to_rgb,
)
from batchseg.io.reader import image_read_options, read_failure, read_image_bytes, refuse_special_file

T = TypeVar("T")

# File names read window by window when tiling (others are read and decoded whole).
WINDOWED_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs")

# The header is read through a block cache of this block size: one range request covers a COG's whole
# header and tile index, and each further IFD (the pyramid levels of a file written level after level)
# costs one more. Tiles are fetched apart from it, each window's in one request per run of adjacent tiles.
HEADER_BLOCK = 256 * 1024

# Tiles of a window closer than this in the file are fetched in one range request (the bytes between are
# read and dropped): a request costs a round trip, a few KiB more cost nothing.
MERGE_GAP = 16 * 1024

# Sample layouts whose pixels this module gives exactly as decode_image does (tests/test_windowed.py
# compares each): (PhotometricInterpretation, SamplesPerPixel, ExtraSamples). MinIsWhite (0), MinIsBlack
# (1) and RGB (2), alone or with alpha; others (palette, CMYK, bilevel...) are decoded whole.
_LAYOUTS = {
    (0, 1, ()), (1, 1, ()), (1, 2, (1,)), (1, 2, (2,)),
    (2, 3, ()), (2, 4, (0,)), (2, 4, (1,)), (2, 4, (2,)),
}  # fmt: skip
_DTYPES = ("uint8", "uint16", "float32")
_JPEG = 7
_YCBCR = 6  # JPEG tiles of YCbCr (SVS): tifffile's decoder gives them as RGB

# GeoTIFF's tags and keys (GeoTIFF 1.1, OGC 19-008r4).
_PIXEL_SCALE, _TIEPOINT, _TRANSFORMATION, _GEO_KEYS = 33550, 33922, 34264, 34735
_RASTER_TYPE, _GEOGRAPHIC_CRS, _PROJECTED_CRS = 1025, 2048, 3072
_PIXEL_IS_POINT, _USER_DEFINED = 2, 32767


@dataclass(frozen=True)
class Geo:
    """Where a geo-referenced image lies on the map: ``transform`` maps pixel (column, row) to map (x, y)
    in GDAL's order ``(x0, dx, rx, y0, ry, dy)``: ``x = x0 + col * dx + row * rx``, ``y = y0 + col * ry +
    row * dy`` (pixel corners, GeoTIFF's PixelIsArea); ``crs`` is e.g. ``"EPSG:32633"``, None when the
    file names none."""

    transform: tuple[float, float, float, float, float, float]
    crs: str | None


@dataclass(frozen=True)
class _Level:
    """What reading one pyramid level needs, taken from its ``tifffile.TiffPage`` once at open (read
    threads then share it, read-only)."""

    width: int
    height: int
    segment_height: int  # a tile's, or a strip's rows
    segment_width: int  # a tile's, or the image width for strips
    planes: int  # 1, or SamplesPerPixel when the samples are stored in separate planes
    samples: int
    dtype: np.dtype[Any]
    offsets: np.ndarray  # int64 (8 bytes a tile: a 100,000 px slide has some 170,000 tiles)
    bytecounts: np.ndarray
    decode: Callable[..., Any]  # tifffile's decoder of one segment: (bytes, index) -> (array, ...)
    jpegtables: bytes | None

    @property
    def across(self) -> int:
        return math.ceil(self.width / self.segment_width)

    @property
    def down(self) -> int:
        return math.ceil(self.height / self.segment_height)

    def segments(self, top: int, left: int, bottom: int, right: int) -> list[int]:
        """The indices (in the offsets) of the segments that hold rows ``top:bottom``, columns
        ``left:right``, every plane's."""
        rows = range(top // self.segment_height, (bottom - 1) // self.segment_height + 1)
        columns = range(left // self.segment_width, (right - 1) // self.segment_width + 1)
        return [
            p * self.down * self.across + r * self.across + c
            for p in range(self.planes)
            for r in rows
            for c in columns
        ]

    def where(self, index: int) -> tuple[int, int, int]:
        """Segment ``index``'s plane and the image row and column of its top left pixel."""
        plane, rest = divmod(index, self.down * self.across)
        row, column = divmod(rest, self.across)
        return plane, row * self.segment_height, column * self.segment_width


class WindowedImage:
    """One TIFF image (its first series, full resolution at level 0) read window by window.

    ``width`` and ``height`` are level 0's; ``levels`` the ``(width, height)`` of each pyramid level (level
    0 first); ``geo`` its map placement, or None. Safe to read from several threads at once: the layout is
    read once at open, and each window's tiles are fetched with their own range requests."""

    uri: str
    width: int
    height: int
    levels: tuple[tuple[int, int], ...]
    geo: Geo | None

    def __init__(
        self,
        uri: str,
        fs: fsspec.AbstractFileSystem,
        path: str,
        size: int,
        levels: list[_Level],
        layout: tuple[int, tuple[int, ...]],
        geo: Geo | None,
    ) -> None:
        self.uri = uri
        self.width, self.height = levels[0].width, levels[0].height
        self.levels = tuple((level.width, level.height) for level in levels)
        self.geo = geo
        self._fs, self._path, self._size = fs, path, size
        self._levels = levels
        self._photometric, self._extrasamples = layout

    def read(self, top: int, left: int, height: int, width: int, level: int = 0) -> np.ndarray:
        """The ``height x width x 3`` uint8 RGB pixels of the window at ``(top, left)`` of ``level`` (clipped
        to the image), as :func:`batchseg.io.images.decode_image` would give them. Raises
        :class:`ImageError` (``corrupt_image``) for a tile that cannot be decoded, and
        :class:`~batchseg.errors.StorageUnavailable` when storage stays unavailable."""
        at = self._levels[level]
        bottom, right = min(top + height, at.height), min(left + width, at.width)
        top, left = max(top, 0), max(left, 0)
        if bottom <= top or right <= left:
            return np.zeros((max(bottom - top, 0), max(right - left, 0), 3), np.uint8)
        samples = np.zeros((bottom - top, right - left, at.samples), at.dtype)
        indices = at.segments(top, left, bottom, right)
        for index, data in zip(indices, self._fetch(at, indices), strict=True):
            if data is None:  # a sparse file's empty tile: zeros, as tifffile reads it
                continue
            segment = self._decode(at, index, data, level)
            plane, row, column = at.where(index)
            r0, r1 = max(top, row), min(bottom, row + segment.shape[0])
            c0, c1 = max(left, column), min(right, column + segment.shape[1])
            channels = slice(plane, plane + 1) if at.planes > 1 else slice(None)
            samples[r0 - top : r1 - top, c0 - left : c1 - left, channels] = segment[
                r0 - row : r1 - row, c0 - column : c1 - column
            ]
        return tiff_samples_to_rgb(samples, self._photometric, self._extrasamples)

    def _fetch(self, at: _Level, indices: list[int]) -> list[bytes | None]:
        """The encoded bytes of each segment in ``indices`` (None for an empty one), adjacent ones fetched
        together, transient failures retried."""
        ranges = {
            i: (int(at.offsets[i]), int(at.offsets[i] + at.bytecounts[i]))
            for i in indices
            if at.bytecounts[i]
        }
        for i, (_, end) in ranges.items():
            if end > self._size:
                raise ImageError(
                    "corrupt_image",
                    f"TIFF tile {i} lies past the end of the file ({end:,} > {self._size:,} bytes): truncated?",
                )
        _, starts, ends = merge_offset_ranges(
            [self._path] * len(ranges),
            [start for start, _ in ranges.values()],
            [end for _, end in ranges.values()],
            max_gap=MERGE_GAP,
            sort=True,
        )
        blocks = _read_ranges(self._fs, self._path, list(zip(starts, ends, strict=True)), self.uri)

        def piece(start: int, end: int) -> bytes:
            k = bisect.bisect_right(starts, start) - 1  # the merged range that holds it
            return blocks[starts[k], ends[k]][start - starts[k] : end - starts[k]]

        return [piece(*ranges[i]) if i in ranges else None for i in indices]

    def _decode(self, at: _Level, index: int, data: bytes, level: int) -> np.ndarray:
        """Segment ``index`` decoded: ``rows x columns x samples`` (of its plane)."""
        try:
            segment, _, _ = at.decode(data, index, jpegtables=at.jpegtables)
            if segment is None:
                raise ValueError("no data")
            return np.asarray(segment)[0]  # (depth, rows, columns, samples): depth is 1
        except ImageError:
            raise
        except Exception as e:
            raise ImageError(
                "corrupt_image",
                f"cannot decode TIFF tile {index} of level {level}: {type(e).__name__}: {first_line(e)}",
            ) from e

    def close(self) -> None:
        """Nothing to release: each read opens and closes its own requests (kept for callers' ``finally``)."""


def is_windowed(uri: str) -> bool:
    """Whether ``uri``'s name says it may be read window by window (a TIFF)."""
    return uri.lower().endswith(WINDOWED_SUFFIXES)


def open_windowed(
    uri: str, storage_options: dict[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> WindowedImage | None:
    """``uri`` opened for windowed reads (its header and tile index only), or None when it is better read
    whole (not a TIFF, or one stored as a single strip, or turned by an Orientation tag, or samples other
    than grey or RGB, with or without alpha, of 8 or 16 bits or float32, or compressed in a way no installed
    codec decodes while within ``max_pixels``: Pillow may decode it whole). Raises :class:`ImageError` for a
    broken file, one over ``max_pixels`` (level 0's width * height: it bounds the tiles' work) or larger and
    compressed in a way no installed codec decodes, and :class:`~batchseg.errors.StorageUnavailable` when storage stays unavailable."""
    image = _open(uri, storage_options, max_pixels)
    if image is not None:
        check_size((image.width, image.height), max_pixels)
    return image


def _open(uri: str, storage_options: dict[str, Any] | None, max_pixels: int) -> WindowedImage | None:
    fs, path = storage.filesystem(uri, image_read_options(uri, storage_options))
    file = None
    try:
        if storage.is_local(fs):
            try:
                refuse_special_file(path, uri)
            except OSError as e:  # e.g. no such file
                raise read_failure(e, uri) from e
        file = _HeaderFile(fs, path, uri)
        if not file.start.startswith(TIFF_SIGNATURES):
            return None
        image = _read_header(uri, fs, path, file, max_pixels)
    except (ImageError, StorageUnavailable):
        raise
    except Exception as e:
        if file is not None and file.failure is not None:  # the storage's error, wrapped by tifffile
            raise file.failure from e
        raise ImageError(
            "corrupt_image", f"cannot read TIFF header: {type(e).__name__}: {first_line(e)}"
        ) from e
    if file.failure is not None:  # the storage's error, passed over by tifffile
        raise file.failure
    return image


class _HeaderFile(io.RawIOBase):
    """``path`` as a read-only file for tifffile to parse the header from: range requests of whole blocks
    of :data:`HEADER_BLOCK` (the last 32 kept), each retried on its own. A storage failure is kept in
    ``failure`` (an :class:`ImageError` or :class:`StorageUnavailable`), whatever tifffile makes of it."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, uri: str) -> None:
        self._fs, self._path, self._uri = fs, path, uri
        self.failure: ImageError | StorageUnavailable | None = None
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._position = 0
        # A GET first, not a HEAD: a store that refuses the credentials says so only in the body of its
        # answer (a HEAD has none); its first bytes tell a TIFF, and a small file's length is its size.
        self.start = self._fetch(0, HEADER_BLOCK)
        self._blocks[0] = self.start
        self.size = len(self.start)
        if self.size == HEADER_BLOCK:
            self.size = self._retried(lambda: int(fs.size(path)))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        self._position = (0, self._position, self.size)[whence] + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        end = min(self._position + len(buffer), self.size)
        if end <= self._position:
            return 0
        first, last = self._position // HEADER_BLOCK, (end - 1) // HEADER_BLOCK
        data = b"".join(self._block(b) for b in range(first, last + 1))
        data = data[self._position - first * HEADER_BLOCK : end - first * HEADER_BLOCK]
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def _block(self, number: int) -> bytes:
        if number not in self._blocks:
            start = number * HEADER_BLOCK
            self._blocks[number] = self._fetch(start, min(start + HEADER_BLOCK, self.size))
            if len(self._blocks) > 32:  # a file with thousands of IFDs is parsed in bounded memory
                self._blocks.popitem(last=False)
        self._blocks.move_to_end(number)
        return self._blocks[number]

    def _fetch(self, start: int, end: int) -> bytes:
        return self._retried(
            lambda: _read_ranges(self._fs, self._path, [(start, end)], self._uri)[start, end]
        )

    def _retried(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except (ImageError, StorageUnavailable) as e:
            self.failure = e
            raise
        except Exception as e:
            self.failure = read_failure(e, self._uri)
            raise self.failure from e


def _read_ranges(
    fs: fsspec.AbstractFileSystem, path: str, ranges: list[tuple[int, int]], uri: str
) -> dict[tuple[int, int], bytes]:
    """:func:`batchseg.io.storage.read_ranges`, a failure for good as :func:`read_failure` says."""
    try:
        return storage.read_ranges(fs, path, ranges, f"reading {uri}")
    except StorageUnavailable:
        raise
    except Exception as e:
        raise read_failure(e, uri) from e


def _read_header(
    uri: str, fs: fsspec.AbstractFileSystem, path: str, file: _HeaderFile, max_pixels: int
) -> WindowedImage | None:
    tifffile = quiet_tifffile()
    with tifffile.TiffFile(cast("IO[bytes]", file), name=path.rsplit("/", 1)[-1]) as tiff:
        page = tiff.pages.first
        layout = _layout(page)
        if layout is None or page.tags.valueof(0x0112, 1) != 1:
            return None
        if not page.is_tiled and len(page.dataoffsets) <= (
            page.samplesperpixel if page.planarconfig == 2 else 1
        ):
            return None  # one strip: a window needs all of it
        if (
            page.compression not in tifffile.TIFF.DECOMPRESSORS
            and page.imagewidth * page.imagelength <= max_pixels
        ):
            return None  # e.g. LZW or JPEG tiles without imagecodecs: Pillow (libtiff) decodes them whole
        require_tiff_decoder(page)
        levels = [_level(page)]
        series = tiff.series[0] if _may_have_levels(tiff, page) else None
        if series is not None and series.keyframe is page:
            for smaller in series.levels[1:]:
                keyframe = smaller.keyframe
                if not isinstance(keyframe, tifffile.TiffPage) or _layout(keyframe) != layout:
                    break
                require_tiff_decoder(keyframe)
                levels.append(_level(keyframe))
        return WindowedImage(uri, fs, path, file.size, levels, layout, geo_of(page))


def _may_have_levels(tiff: Any, page: Any) -> bool:
    """Whether the file may hold pyramid levels: SubIFDs (OME-TIFF), an SVS, or a second page at reduced
    resolution (a COG's overviews). Finding a file's series reads every IFD in it: a stack of a thousand
    pages would cost a thousand range requests for nothing."""
    if page.subifds or tiff.is_svs:
        return True
    try:
        return bool(getattr(tiff.pages[1], "is_reduced", False))
    except IndexError:
        return False


def _layout(page: Any) -> tuple[int, tuple[int, ...]] | None:
    """The photometric and extra samples ``page``'s decoded samples are read as (see ``_LAYOUTS``), or None
    when they are not among those."""
    photometric = int(page.photometric)
    if photometric == _YCBCR and page.compression == _JPEG and page.samplesperpixel == 3:
        photometric = 2
    extrasamples = tuple(int(e) for e in page.extrasamples)
    if (
        (photometric, page.samplesperpixel, extrasamples) not in _LAYOUTS
        or page.dtype is None
        or page.dtype.name not in _DTYPES
        or page.bitspersample != page.dtype.itemsize * 8  # e.g. 12-bit samples, unpacked to 16
        or page.imagedepth != 1
    ):
        return None
    return photometric, extrasamples


def _level(page: Any) -> _Level:
    tiled = page.is_tiled
    return _Level(
        width=page.imagewidth,
        height=page.imagelength,
        segment_height=page.tilelength if tiled else page.rowsperstrip,
        segment_width=page.tilewidth if tiled else page.imagewidth,
        planes=page.samplesperpixel if page.planarconfig == 2 else 1,
        samples=page.samplesperpixel,
        dtype=page.dtype,
        offsets=np.asarray(page.dataoffsets, np.int64),
        bytecounts=np.asarray(page.databytecounts, np.int64),
        decode=page.decode,
        jpegtables=page.jpegtables,
    )


def geo_of(page: Any) -> Geo | None:
    """The map placement a ``tifffile.TiffPage``'s GeoTIFF tags give, as GDAL reads it, or None when it has
    none (no ModelPixelScale with a ModelTiepoint, nor a ModelTransformation)."""
    tags = page.tags
    scale, tiepoint, matrix = (tags.valueof(c) for c in (_PIXEL_SCALE, _TIEPOINT, _TRANSFORMATION))
    if matrix is not None and len(matrix) == 16:
        m = [float(v) for v in matrix]
        transform = [m[3], m[0], m[1], m[7], m[4], m[5]]
    elif scale is not None and tiepoint is not None and len(scale) >= 2 and len(tiepoint) >= 6:
        i, j, _, x, y, _ = (float(v) for v in tiepoint[:6])
        dx, dy = float(scale[0]), -float(scale[1])  # rows go down the image, north up the map
        transform = [x - i * dx, dx, 0.0, y - j * dy, 0.0, dy]
    else:
        return None
    keys = _geo_keys(tags.valueof(_GEO_KEYS))
    if keys.get(_RASTER_TYPE) == _PIXEL_IS_POINT:
        # The tie point names a pixel's centre: move the origin to its corner, as GDAL does.
        transform[0] -= 0.5 * (transform[1] + transform[2])
        transform[3] -= 0.5 * (transform[4] + transform[5])
    code = keys.get(_PROJECTED_CRS, keys.get(_GEOGRAPHIC_CRS))
    crs = f"EPSG:{code}" if code and code != _USER_DEFINED else None
    t = transform
    return Geo((t[0], t[1], t[2], t[3], t[4], t[5]), crs)


def _geo_keys(directory: Any) -> dict[int, int]:
    """The short values held in a GeoKeyDirectory (header ``1, 1, 0, count``, then ``key, location, count,
    value`` each); keys whose values lie in other tags (doubles, text) are left out."""
    if directory is None or len(directory) < 4:
        return {}
    values = [int(v) for v in directory]
    entries = values[4 : 4 + 4 * values[3]]
    return {
        entries[k]: entries[k + 3]
        for k in range(0, len(entries) - 3, 4)
        if entries[k + 1] == 0 and entries[k + 2] == 1
    }


def preview(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    max_side: int = 2048,
    region: tuple[int, int, int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, float]:
    """The image (or its ``region = (left, top, width, height)`` in full-resolution pixels) scaled down so
    that its longer side is at most ``max_side``: ``(pixels, scale)``, ``scale`` = output pixels per image
    pixel (at most 1). A windowed TIFF is read from the smallest pyramid level that is still large enough,
    only the region's window of it (``max_pixels`` bounds that window, not the image); anything else is
    decoded whole (within ``max_pixels``) and then scaled. Raises :class:`ImageError`."""
    from PIL import Image

    image = _open(uri, storage_options, max_pixels) if is_windowed(uri) else None
    if image is None:
        pixels = decode_image(read_image_bytes(uri, storage_options), max_pixels)
        if region is not None:
            left, top, width, height = region
            pixels = pixels[top : top + height, left : left + width]
        height, width = pixels.shape[:2]
    else:
        left, top, width, height = region or (0, 0, image.width, image.height)
        right, bottom = min(left + width, image.width), min(top + height, image.height)
        left, top = max(left, 0), max(top, 0)
        width, height = max(right - left, 0), max(bottom - top, 0)
    if not width or not height:
        raise ImageError("corrupt_image", f"the region {region} lies outside the image")
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if image is not None:
        pixels = _read_scaled(image, (left, top, width, height), size, max_pixels)
    if (pixels.shape[1], pixels.shape[0]) != size:
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
    return pixels, scale


def _read_scaled(
    image: WindowedImage, region: tuple[int, int, int, int], size: tuple[int, int], max_pixels: int
) -> np.ndarray:
    """The window of ``region`` (level 0 pixels, within the image) from the smallest level where it still
    spans at least ``size = (width, height)`` pixels."""
    left, top, width, height = region
    chosen = 0
    for level, (level_width, level_height) in enumerate(image.levels):
        if width * level_width >= size[0] * image.width and height * level_height >= size[1] * image.height:
            chosen = level
    fx, fy = image.levels[chosen][0] / image.width, image.levels[chosen][1] / image.height
    x0, y0 = math.floor(left * fx), math.floor(top * fy)
    x1, y1 = math.ceil((left + width) * fx), math.ceil((top + height) * fy)
    check_size((x1 - x0, y1 - y0), max_pixels)
    return image.read(y0, x0, y1 - y0, x1 - x0, chosen)
