"""Small, deterministic image files for tests: plausible inputs and the awkward cases decoding must handle."""

from __future__ import annotations

import io
import pathlib
import struct
import zlib
from typing import Any

import numpy as np
import tifffile
from PIL import Image

BOMB_TEST_MAX_PIXELS = 10_000_000
"""max_pixels for decoding the bad files: the bomb (4000x3000 = 12M) is over it, the OK cases far below."""

BOMB_SIZE = (4000, 3000)
"""Small enough that decoding it with a larger max_pixels stays around 100 MB."""

BAD_FILES: dict[str, str | None] = {
    "empty.jpg": "empty_file",
    "not-an-image.jpg": "not_an_image",
    "truncated.jpg": "corrupt_image",
    "corrupt.png": "corrupt_image",
    "bomb.png": "too_large",
    "animated.gif": None,
    "multipage.tif": None,
    "grey.jpg": None,
    "grey16.png": None,
    "cmyk.jpg": None,
    "palette-transparent.png": None,
    "rgba.png": None,
    "exif-rotated.jpg": None,
    "float-planar.tif": None,
    "float-lzw.tif": "corrupt_image",
}
"""File name -> the ImageError kind decoding it must raise, or None where it must decode."""

EXPECTED_SIZES: dict[str, tuple[int, int]] = {
    "animated.gif": (32, 24),
    "multipage.tif": (48, 32),
    "grey.jpg": (50, 30),
    "grey16.png": (40, 30),
    "cmyk.jpg": (36, 28),
    "palette-transparent.png": (20, 10),
    "rgba.png": (30, 20),
    "exif-rotated.jpg": (40, 60),
    "float-planar.tif": (24, 16),
}
"""Displayed (width, height) of each file in BAD_FILES that must decode."""

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)

EXIF_ORIENTATION_TAG = 0x0112
EXIF_MARKER = 10
"""Side of the red square in the stored top-left corner of exif-rotated.jpg (the rest is blue)."""


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def write_bad_files(directory: pathlib.Path) -> dict[str, str | None]:
    """Write every case in BAD_FILES into ``directory``; return a copy of BAD_FILES."""
    directory.mkdir(parents=True, exist_ok=True)
    contents = {
        "empty.jpg": b"",
        "not-an-image.jpg": b"<!DOCTYPE html>\n<html><body><h1>404 Not Found</h1></body></html>\n",
        "truncated.jpg": _truncated_jpeg(),
        "corrupt.png": _corrupt_png(),
        # Mode "1" and all zero: the header says 12M pixels, the file is under 2 KB.
        "bomb.png": encode(Image.new("1", BOMB_SIZE, 0), "PNG"),
        "animated.gif": _animated_gif(),
        "multipage.tif": _multipage_tiff(),
        "grey.jpg": encode(_gradient("L", EXPECTED_SIZES["grey.jpg"]), "JPEG", quality=95),
        "grey16.png": encode(_grey16(EXPECTED_SIZES["grey16.png"]), "PNG"),
        "cmyk.jpg": encode(Image.new("CMYK", EXPECTED_SIZES["cmyk.jpg"], (0, 255, 255, 0)), "JPEG"),
        "palette-transparent.png": _palette_with_transparency(),
        "rgba.png": encode(Image.new("RGBA", EXPECTED_SIZES["rgba.png"], (0, 128, 255, 128)), "PNG"),
        "exif-rotated.jpg": _exif_rotated_jpeg(),
        # As microscopy and remote-sensing software writes them; Pillow has no mode for float RGB.
        "float-planar.tif": tiff(
            np.full((3, 16, 24), 200.5, dtype=np.float32),
            photometric="rgb",
            planarconfig="separate",
            compression="zlib",
        ),
        # LZW, which tifffile decodes only with the imagecodecs package (not a dependency).
        "float-lzw.tif": with_tags(
            tiff(np.zeros((8, 8, 3), dtype=np.float32), photometric="rgb"), Compression=5
        ),
    }
    assert contents.keys() == BAD_FILES.keys()
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    return dict(BAD_FILES)


def tiff(pixels: np.ndarray, **options: Any) -> bytes:
    """``pixels`` written by tifffile."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, **options)
    return buffer.getvalue()


def with_tags(data: bytes, **tags: int) -> bytes:
    """A TIFF with tags of its first page overwritten in place (a header that lies)."""
    buffer = io.BytesIO(data)
    with tifffile.TiffFile(buffer) as opened:
        for name, value in tags.items():
            opened.pages[0].tags[name].overwrite(value)
    return buffer.getvalue()


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(0, 256, size=3))
    return (r, g, b)


def _gradient(mode: str, size: tuple[int, int]) -> Image.Image:
    width, height = size
    values = np.add.outer(np.arange(height), np.arange(width)) * 255 // (width + height - 2)
    return Image.fromarray(values.astype(np.uint8)).convert(mode)


def _grey16(size: tuple[int, int]) -> Image.Image:
    width, height = size
    values = np.linspace(0, 65535, width * height).reshape(height, width)
    return Image.fromarray(values.astype(np.uint16))


def _truncated_jpeg() -> bytes:
    # Noise, so the entropy-coded data is long enough that half of the file ends mid-scan.
    pixels = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG", quality=95)
    return data[: len(data) // 2]


def _corrupt_png() -> bytes:
    # Valid signature and IHDR; IDAT replaced by garbage with a *correct* CRC. Pillow does not check
    # IDAT CRCs (a bad CRC alone still decodes), but zlib rejects the garbage during load.
    data = encode(_gradient("RGB", (32, 32)), "PNG")
    start = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[start - 4 : start])
    garbage = bytes(range(256)) * (length // 256 + 1)
    garbage = garbage[:length]
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + garbage) & 0xFFFFFFFF)
    return data[: start + 4] + garbage + crc + data[start + 4 + length + 4 :]


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", EXPECTED_SIZES["animated.gif"], colour) for colour in (RED, GREEN, BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _multipage_tiff() -> bytes:
    first = Image.new("RGB", EXPECTED_SIZES["multipage.tif"], RED)
    second = Image.new("RGB", (16, 16), GREEN)
    return encode(first, "TIFF", save_all=True, append_images=[second])


def _palette_with_transparency() -> bytes:
    image = Image.new("P", EXPECTED_SIZES["palette-transparent.png"], 0)
    image.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    image.paste(1, (0, 0, 10, 10))
    return encode(image, "PNG", transparency=0)


def _exif_rotated_jpeg() -> bytes:
    # Stored 60 wide x 40 high; Orientation 6 means "rotate 90 degrees clockwise to display".
    image = Image.new("RGB", (60, 40), BLUE)
    image.paste(RED, (0, 0, EXIF_MARKER, EXIF_MARKER))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    return encode(image, "JPEG", quality=95, exif=exif)
