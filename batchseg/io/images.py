"""Decode image bytes to RGB arrays; every per-image problem becomes an ImageError."""

from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from batchseg.errors import ImageError

DEFAULT_MAX_PIXELS: int = 100_000_000
"""Decompression-bomb limit on width*height, checked from the header before any pixel is decoded."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
"""Lower-case file suffixes (with the dot) treated as images when listing a directory or bucket."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Little- and big-endian, classic and BigTIFF.
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# A TIFF may hold hundreds of samples a pixel (hyperspectral images): max_pixels alone would let one
# decode to many times the memory of a four-sample image as large. Four float samples a pixel at most.
_TIFF_BYTES_PER_PIXEL = 16


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one encoded image to the RGB pixels a viewer would display.

    Returns a new, writable, C-contiguous ``uint8`` array of shape ``(height, width, 3)``, channels
    in R, G, B order, where height and width are the *displayed* ones: EXIF orientation is applied.
    Only the first frame of an animated or multi-page file is returned. Grey, bilevel, palette, CMYK
    and YCbCr images are converted to RGB; images with transparency are composited over white;
    16-bit samples keep their top 8 bits (65535 -> 255), other integer samples are taken as 16-bit
    ones (clipped to [0, 65535] first), and float samples are clipped to [0, 255]. A TIFF that Pillow
    cannot read (float or signed samples in colour, more than four samples, 16-bit planar RGB) is read
    with tifffile: channel 0 as grey unless the file says RGB, alpha as above, other extra samples
    dropped.

    Raises ``ImageError`` with kind ``empty_file``, ``not_an_image``, ``too_large`` (width*height
    over ``max_pixels``, or a TIFF's samples over 16 bytes a pixel of it, found from the header alone)
    or ``corrupt_image``; never anything else.
    """
    if not data:
        raise ImageError("empty_file", "file is empty (0 bytes)")
    try:
        return _decode_with_pil(data, max_pixels)
    except ImageError as error:
        if error.kind == "too_large" or not data.startswith(TIFF_SIGNATURES):
            raise
        refused = error
    return _decode_tiff(data, max_pixels, refused)


def _decode_with_pil(data: bytes, max_pixels: int) -> np.ndarray:
    _let_pil_open_up_to(max_pixels)
    try:
        # PIL warns about large images inside Image.open; the size policy here is max_pixels, so
        # that warning is noise (and an error under -W error).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                check_size(image.size, max_pixels)
                if _pil_misreads(image):
                    raise ImageError(
                        "corrupt_image", "Pillow reads planar samples wider than 8 bits as bytes"
                    )
                image.load()
                return _to_rgb_array(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not_an_image", f"not a recognised image format ({len(data):,} bytes)") from None
    except Image.DecompressionBombError as exc:
        # Only raised for sizes over twice max_pixels (see _let_pil_open_up_to), before we see the header.
        raise ImageError("too_large", _bomb_message(str(exc), max_pixels)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError("corrupt_image", f"cannot decode image: {exc}") from None
    except Exception as exc:
        raise ImageError("corrupt_image", f"cannot decode image ({type(exc).__name__}: {exc})") from None


def _pil_misreads(image: Any) -> bool:
    """Pillow's own TIFF decoders (libtiff's are right) read each plane of a PlanarConfiguration=2 file
    with samples wider than 8 bits as bytes, and say nothing (Pillow 13)."""
    if image.format != "TIFF" or not image.tile:
        return False
    tags = image.tag_v2
    return bool(
        tags.get(284) == 2  # PlanarConfiguration: separate planes
        and tags.get(277, 1) > 1  # SamplesPerPixel
        and max(tags.get(258, (8,))) > 8  # BitsPerSample
        and image.tile[0][0] != "libtiff"
    )


def _decode_tiff(data: bytes, max_pixels: int, refused: ImageError) -> np.ndarray:
    """The first page of a TIFF that Pillow refused (``refused``), read with tifffile: microscopy and
    remote-sensing software writes float, signed and many-channel samples that Pillow has no mode for.
    The size (pixels, and bytes of samples) is checked from the page's header before any pixel is
    decoded."""
    tifffile = quiet_tifffile()
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages[0]
            assert isinstance(page, tifffile.TiffPage)  # the first page is never a TiffFrame
            check_size((page.imagewidth, page.imagelength), max_pixels)
            if page.nbytes > _TIFF_BYTES_PER_PIXEL * max_pixels:
                raise ImageError(
                    "too_large",
                    f"image is {page.imagewidth}x{page.imagelength} with {page.samplesperpixel} samples a "
                    f"pixel, {page.nbytes:,} bytes decoded, over the limit of {_TIFF_BYTES_PER_PIXEL} "
                    f"bytes a pixel for {max_pixels:,} pixels (raise --max-pixels to allow it)",
                )
            photometric, extra = int(page.photometric), page.extrasamples
            orientation = page.tags.valueof(0x0112, 1)
            require_tiff_decoder(page)
            if photometric not in (0, 1, 2) or (photometric == 2 and page.samplesperpixel < 3):
                name = getattr(page.photometric, "name", photometric)
                raise ImageError("corrupt_image", f"TIFF {name} images are not supported")
            # (planar samples, depth, height, width, contiguous samples): keep the first depth.
            planes = page.asarray().reshape(page.shaped)[:, 0]
    except ImageError:
        raise
    except (tifffile.TiffFileError, IndexError):
        raise refused from None  # not even a TIFF's structure: Pillow's verdict stands
    except Exception as exc:
        raise ImageError("corrupt_image", f"cannot decode TIFF: {type(exc).__name__}: {exc}") from None
    samples = np.moveaxis(planes, 0, -1).reshape(*planes.shape[1:3], -1)  # height, width, samples
    image = _tiff_image(samples, photometric, extra)
    image.getexif()[0x0112] = orientation  # the TIFF's own Orientation tag, turned as any image's
    return _to_rgb_array(ImageOps.exif_transpose(image))


def quiet_tifffile() -> Any:
    """The tifffile module, imported here rather than at the top (18 ms that every command importing this
    module would pay), its log quiet: it logs what is wrong with a damaged file on stderr, and here that is
    the image's error row."""
    import tifffile

    tifffile_log = logging.getLogger("tifffile")
    if tifffile_log.level == logging.NOTSET:  # unless someone chose otherwise
        tifffile_log.setLevel(logging.CRITICAL)
    return tifffile


def require_tiff_decoder(page: Any) -> None:
    """Raise an :class:`ImageError` when the segments of ``page`` (a ``tifffile.TiffPage``) are compressed
    in a way no installed codec decodes (JPEG, JPEG 2000, WebP... need the imagecodecs package)."""
    import tifffile

    if page.compression not in tifffile.TIFF.DECOMPRESSORS:
        name = getattr(page.compression, "name", page.compression)
        raise ImageError("corrupt_image", f"TIFF compression {name} needs the imagecodecs package")


def tiff_samples_to_rgb(samples: np.ndarray, photometric: int, extrasamples: tuple[int, ...]) -> np.ndarray:
    """A TIFF's decoded ``height x width x samples`` array (photometric 0, 1 or 2, its ExtraSamples) as
    :func:`decode_image` gives it: ``height x width x 3`` uint8 RGB, alpha composited over white."""
    pixels, mode = _tiff_pixels(samples, photometric, extrasamples)
    if mode == "RGB":  # what _to_rgb_array would make of it, without PIL's copies of a tile-sized window
        return np.ascontiguousarray(pixels)
    return _to_rgb_array(_image(pixels, mode))


def _tiff_image(samples: np.ndarray, photometric: int, extrasamples: tuple[int, ...]) -> Image.Image:
    return _image(*_tiff_pixels(samples, photometric, extrasamples))


def _tiff_pixels(
    samples: np.ndarray, photometric: int, extrasamples: tuple[int, ...]
) -> tuple[np.ndarray, str]:
    """uint8 RGB pixels and, where the TIFF has alpha, that too: ``(pixels, PIL mode)``."""
    if photometric == 2:
        pixels = _to_8_bit(samples[:, :, :3])
    else:  # MinIsWhite or MinIsBlack: channel 0 is the grey
        grey = _to_8_bit(samples[:, :, 0])
        pixels = np.repeat((255 - grey if photometric == 0 else grey)[:, :, None], 3, axis=2)
    # ExtraSamples 1 and 2 are associated (premultiplied) and unassociated alpha; others are dropped.
    alpha = {1: "RGBa", 2: "RGBA"}.get(extrasamples[0]) if extrasamples else None
    if alpha:
        return np.dstack([pixels, _to_8_bit(samples[:, :, 3 if photometric == 2 else 1])]), alpha
    return pixels, "RGB"


def _image(pixels: np.ndarray, mode: str) -> Image.Image:
    height, width = pixels.shape[:2]
    return Image.frombytes(mode, (width, height), np.ascontiguousarray(pixels).tobytes())


def _let_pil_open_up_to(max_pixels: int) -> None:
    # Image.open applies PIL's process-wide Image.MAX_IMAGE_PIXELS (~89M, error above twice that)
    # before the caller's max_pixels can be checked, so a caller who raised --max-pixels would still
    # be refused. There is no per-call override, so lift the global to max_pixels. It is only ever
    # raised, never lowered, and only to a limit this process was explicitly given, so other PIL users
    # keep a bomb check no looser than the operator asked for; None (check already off) is left alone.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and limit < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def check_size(size: tuple[int, int], max_pixels: int) -> None:
    """Raise ``too_large`` when ``size = (width, height)`` has more than ``max_pixels`` pixels."""
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(raise --max-pixels to allow it)",
        )


def _bomb_message(pil_message: str, max_pixels: int) -> str:
    match = re.search(r"\((\d+) pixels\)", pil_message)
    size = f"{int(match.group(1)):,} pixels" if match else "larger than PIL will open"
    return f"image is {size}, over the limit of {max_pixels:,} (raise --max-pixels to allow it)"


def _to_8_bit(samples: np.ndarray) -> np.ndarray:
    """``uint8`` samples: 8-bit ones as they are, float ones clipped to [0, 255], any other integers as
    16-bit data that keeps its high byte. PIL's convert("L") would clip 16-bit values at 255 instead of
    scaling them; mode "I" is taken as 16-bit data, which is what PIL has produced for 16-bit PNG and TIFF."""
    if samples.dtype == np.uint8:
        return samples
    if samples.dtype == np.uint16:
        return (samples >> 8).astype(np.uint8)
    if samples.dtype.kind == "f":
        return np.clip(np.nan_to_num(samples), 0, 255).astype(np.uint8)
    return (np.clip(samples.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        grey = _to_8_bit(np.asarray(image))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.has_transparency_data:
        # Dropping alpha would expose whatever colour the encoder left under transparent pixels.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    # np.array, not np.asarray: asarray gives a read-only view that torch.from_numpy warns about.
    return np.array(image.convert("RGB"), dtype=np.uint8)


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG left encoded for a batched decode on the model's device (``torchvision.io.decode_jpeg``)."""

    data: bytes
    orientation: int


def jpeg_orientation(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> int | None:
    """The EXIF orientation (1-8) of a JPEG that ``torchvision.io.decode_jpeg`` can decode as
    :func:`decode_image` would (baseline RGB or grey, within ``max_pixels``, and both sides within
    ``max_side`` when given: a larger one is tiled from host pixels), read from its header alone; None for
    anything else, which then goes through :func:`decode_image`."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if image.format != "JPEG" or image.mode not in ("RGB", "L") or width * height > max_pixels:
                    return None
                if max_side is not None and max(width, height) > max_side:
                    return None
                orientation = image.getexif().get(0x0112, 1)
    except Exception:
        return None
    return orientation if orientation in range(1, 9) else 1


def orient(pixels: Any, orientation: int) -> Any:
    """A ``3 x H x W`` torch tensor turned as EXIF ``orientation`` says (as ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-1).flip(-2)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:
        return pixels.transpose(-1, -2)
    if orientation == 6:
        return pixels.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return pixels.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return pixels.transpose(-1, -2).flip(-2)
    return pixels
