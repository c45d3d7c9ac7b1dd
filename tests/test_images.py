"""decode_image: displayed RGB uint8 pixels for odd inputs, and a readable ImageError for bad ones."""

import pathlib
import struct
import warnings
import zlib

import imagefiles
import numpy as np
import pytest
from PIL import Image

from batchseg.errors import ImageError
from batchseg.io.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_image

BAD = sorted(name for name, kind in imagefiles.BAD_FILES.items() if kind is not None)
OK = sorted(name for name, kind in imagefiles.BAD_FILES.items() if kind is None)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("bad-files")
    imagefiles.write_bad_files(directory)
    return directory


def decode_file(
    files: pathlib.Path, name: str, max_pixels: int = imagefiles.BOMB_TEST_MAX_PIXELS
) -> np.ndarray:
    return decode_image((files / name).read_bytes(), max_pixels=max_pixels)


def rgb16_png(width: int, height: int, samples: list[int]) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), rows of big-endian R, G, B samples."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row_len = width * 3
    rows = b"".join(
        b"\x00" + struct.pack(f">{row_len}H", *samples[y * row_len : (y + 1) * row_len])
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_public_constants() -> None:
    assert DEFAULT_MAX_PIXELS == 100_000_000
    assert {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".gif", ".bmp"} <= IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)


def test_generated_files_are_small_and_expected_sizes_cover_ok_cases(files: pathlib.Path) -> None:
    assert set(imagefiles.EXPECTED_SIZES) == set(OK)
    assert all((files / name).stat().st_size < 200_000 for name in imagefiles.BAD_FILES)
    assert all(w * h < imagefiles.BOMB_TEST_MAX_PIXELS // 100 for w, h in imagefiles.EXPECTED_SIZES.values())


@pytest.mark.parametrize("name", BAD)
def test_bad_file_raises_its_kind_with_a_readable_message(files: pathlib.Path, name: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_file(files, name)
    error = caught.value
    assert error.kind == imagefiles.BAD_FILES[name]
    assert error.message.strip()
    assert "<" not in error.message and "object at" not in error.message
    assert str(error) == f"{error.kind}: {error.message}"


@pytest.mark.parametrize("name", OK)
def test_ok_file_decodes_to_displayed_rgb(files: pathlib.Path, name: str) -> None:
    pixels = decode_file(files, name)
    width, height = imagefiles.EXPECTED_SIZES[name]
    assert pixels.shape == (height, width, 3)
    assert pixels.dtype == np.uint8
    assert pixels.flags.c_contiguous and pixels.flags.writeable


def test_exif_orientation_6_rotates_clockwise(files: pathlib.Path) -> None:
    pixels = decode_file(files, "exif-rotated.jpg").astype(int)
    assert pixels.shape[:2] == (60, 40)
    # Rotating 90 degrees clockwise carries the stored top-left corner to the displayed top-right.
    # Sample the middle of each corner block: JPEG chroma subsampling smears the block's edges.
    middle = imagefiles.EXIF_MARKER // 2
    assert pixels[middle, -middle] == pytest.approx(imagefiles.RED, abs=20)
    for row, col in ((middle, middle), (-middle, middle), (-middle, -middle)):
        assert pixels[row, col] == pytest.approx(imagefiles.BLUE, abs=20)


def test_16_bit_grey_keeps_the_high_byte_instead_of_clipping() -> None:
    image = Image.fromarray(np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16))
    assert image.mode == "I;16"
    pixels = decode_image(imagefiles.encode(image, "PNG"))
    np.testing.assert_array_equal(pixels[0, :, 0], [0, 0, 1, 128, 255])
    assert (pixels == pixels[:, :, :1]).all()


def test_16_bit_rgb_png() -> None:
    # Pillow opens 16-bit RGB PNGs as 8-bit "RGB" itself, keeping the high byte.
    pixels = decode_image(rgb16_png(2, 1, [65535, 32768, 0, 256, 512, 65535]))
    np.testing.assert_array_equal(pixels, [[[255, 128, 0], [1, 2, 255]]])


def test_32_bit_int_and_float_images() -> None:
    as_int = Image.fromarray(np.array([[0, 32768, 65535, 100_000, -5]], dtype=np.int32))
    assert as_int.mode == "I"
    np.testing.assert_array_equal(
        decode_image(imagefiles.encode(as_int, "TIFF"))[0, :, 0], [0, 128, 255, 255, 0]
    )
    as_float = Image.fromarray(np.array([[-3.0, 0.5, 127.9, 300.0]], dtype=np.float32))
    assert as_float.mode == "F"
    np.testing.assert_array_equal(
        decode_image(imagefiles.encode(as_float, "TIFF"))[0, :, 0], [0, 0, 127, 255]
    )


def test_alpha_is_composited_over_white() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    pixels = decode_image(imagefiles.encode(image, "PNG"))
    np.testing.assert_array_equal(pixels[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(pixels[0, 1], [10, 20, 30])
    assert (abs(pixels[0, 2].astype(int) - 127) <= 1).all()


def test_palette_transparency_becomes_white(files: pathlib.Path) -> None:
    pixels = decode_file(files, "palette-transparent.png")
    np.testing.assert_array_equal(pixels[0, 0], imagefiles.BLUE)
    np.testing.assert_array_equal(pixels[-1, -1], [255, 255, 255])


def test_grey_cmyk_and_rgba_files_convert_to_rgb(files: pathlib.Path) -> None:
    grey = decode_file(files, "grey.jpg")
    assert (grey == grey[:, :, :1]).all()
    assert grey[0, 0, 0] < 10 and grey[-1, -1, 0] > 245
    assert decode_file(files, "cmyk.jpg").reshape(-1, 3).mean(axis=0) == pytest.approx(imagefiles.RED, abs=3)
    rgba = decode_file(files, "rgba.png").astype(int)
    assert rgba[0, 0] == pytest.approx((127, 191, 255), abs=1)


def test_animated_gif_and_multipage_tiff_give_the_first_frame(files: pathlib.Path) -> None:
    for name in ("animated.gif", "multipage.tif"):
        pixels = decode_file(files, name)
        assert (pixels == imagefiles.RED).all(), name


def test_too_large_is_the_callers_limit(files: pathlib.Path) -> None:
    with pytest.raises(ImageError) as caught:
        decode_file(files, "bomb.png")
    assert caught.value.kind == "too_large"
    assert "4000x3000 = 12,000,000 pixels" in caught.value.message
    assert "10,000,000" in caught.value.message

    pixels = decode_file(files, "bomb.png", max_pixels=30_000_000)
    assert pixels.shape == (3000, 4000, 3)
    assert not pixels.any()


def test_pil_global_limit_does_not_override_a_larger_caller_limit(
    files: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in for a caller limit above PIL's default (~89M): PIL alone would refuse the 12M bomb.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_file(files, "bomb.png", max_pixels=30_000_000).shape == (3000, 4000, 3)
    assert Image.MAX_IMAGE_PIXELS == 30_000_000

    decode_file(files, "grey.jpg", max_pixels=2_000)
    assert Image.MAX_IMAGE_PIXELS == 30_000_000, "a smaller caller limit must not lower PIL's"


def test_pil_refusing_before_the_header_is_read_is_still_too_large(
    files: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000_000)
    with pytest.raises(ImageError) as caught:
        decode_file(files, "bomb.png", max_pixels=2_000_000)
    assert caught.value.kind == "too_large"
    assert caught.value.message == (
        "image is 12,000,000 pixels, over the limit of 2,000,000 (raise --max-pixels to allow it)"
    )


@pytest.mark.filterwarnings("ignore:(Corrupt EXIF data|Truncated File Read):UserWarning")
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP"])
def test_any_truncation_decodes_or_raises_image_error(fmt: str) -> None:
    assert_each_truncation_decodes_or_is_an_error(
        imagefiles.encode(Image.new("RGB", (40, 30), (200, 100, 50)), fmt)
    )


def assert_each_truncation_decodes_or_is_an_error(data: bytes) -> None:
    """Cut short anywhere, an image of 40x30 decodes to its size or is a bad-image error, never else."""
    for length in sorted({1, 4, 8, 16, 30, 60, len(data) // 3, len(data) // 2, len(data) - 1}):
        try:
            pixels = decode_image(data[:length])
        except ImageError as error:
            assert error.kind in {"not_an_image", "corrupt_image"}, (length, error)
        else:
            assert pixels.shape == (30, 40, 3)


RGB16 = np.array([[[0, 255, 256], [32768, 65535, 4660]], [[1, 2, 3], [40000, 50000, 60000]]], dtype=np.uint16)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_planar_16_bit_rgb_keeps_each_samples_high_byte(compression: str | None) -> None:
    """PlanarConfiguration=2: Pillow's own decoder reads the 16-bit planes as bytes, silently."""
    data = imagefiles.tiff(
        np.moveaxis(RGB16, -1, 0), photometric="rgb", planarconfig="separate", compression=compression
    )
    np.testing.assert_array_equal(decode_image(data), RGB16 >> 8)


def test_float_rgb_is_clipped_and_signed_rgb_keeps_high_bytes() -> None:
    floats = np.array([[[-3.0, 0.5, 127.9], [300.0, np.nan, 255.0]]], dtype=np.float32)
    for options in ({}, {"planarconfig": "separate"}, {"compression": "zlib"}):
        pixels = floats if options.get("planarconfig") != "separate" else np.moveaxis(floats, -1, 0)
        decoded = decode_image(imagefiles.tiff(pixels, photometric="rgb", **options))
        np.testing.assert_array_equal(decoded, [[[0, 0, 127], [255, 0, 255]]], err_msg=str(options))
    signed = np.array([[[-5, 256, 32767]]], dtype=np.int16)
    np.testing.assert_array_equal(decode_image(imagefiles.tiff(signed, photometric="rgb")), [[[0, 1, 127]]])


def test_multi_channel_stack_gives_the_first_pages_first_channel_as_grey() -> None:
    """A tifffile stack of 5-channel 16-bit pages (a fluorescence time series): no colour to guess."""
    stack = np.zeros((2, 3, 4, 5), dtype=np.uint16)  # pages, height, width, channels
    stack[0, :, :, 0] = np.arange(12).reshape(3, 4) * 5000
    stack[0, :, :, 1:] = 65535
    stack[1] = 12345
    pixels = decode_image(
        imagefiles.tiff(stack, photometric="minisblack", planarconfig="contig", compression="zlib")
    )
    np.testing.assert_array_equal(pixels, np.repeat((stack[0, :, :, :1] >> 8).astype(np.uint8), 3, axis=2))
    assert pixels.flags.c_contiguous and pixels.flags.writeable


def test_float_rgba_is_composited_over_white() -> None:
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128], [0, 0, 0, 1000]]], dtype=np.float32)
    pixels = decode_image(
        imagefiles.tiff(rgba, photometric="rgb", extrasamples=["unassalpha"], compression="zlib")
    )
    np.testing.assert_array_equal(pixels[0, [0, 1, 3]], [[255, 255, 255], [10, 20, 30], [0, 0, 0]])
    assert (abs(pixels[0, 2].astype(int) - 127) <= 1).all()


def test_16_bit_grey_with_premultiplied_alpha_and_min_is_white() -> None:
    grey_alpha = np.array([[[40000, 65535], [0, 0], [20000, 32768]]], dtype=np.uint16)  # grey * alpha
    pixels = decode_image(imagefiles.tiff(grey_alpha, photometric="minisblack", extrasamples=["assocalpha"]))
    assert (pixels == pixels[:, :, :1]).all()
    # Half transparent: 40000 premultiplied by one half, over white: (156 + 255) / 2.
    assert pixels[0, :2, 0].tolist() == [156, 255] and abs(int(pixels[0, 2, 0]) - 205) <= 1
    white_is_zero = np.array([[[0, 1], [65535, 7]]], dtype=np.uint16)
    pixels = decode_image(imagefiles.tiff(white_is_zero, photometric="miniswhite", planarconfig="contig"))
    np.testing.assert_array_equal(pixels[0, :, 0], [255, 0])


def test_a_tiffs_orientation_tag_turns_it() -> None:
    floats = np.zeros((2, 3, 3), dtype=np.float32)
    floats[0, 0] = 255.0
    # Orientation 6: rotate 90 degrees clockwise to display; the stored top-left goes to the top-right.
    pixels = decode_image(imagefiles.tiff(floats, photometric="rgb", extratags=[(0x0112, "H", 1, 6, True)]))
    assert pixels.shape == (3, 2, 3)
    np.testing.assert_array_equal(pixels[:, :, 0], [[0, 255], [0, 0], [0, 0]])


def test_tiff_size_is_checked_from_the_header_before_decoding() -> None:
    """The header says 100000 x 100000 float RGB (112 GiB); the file holds 240 bytes of pixels."""
    small = imagefiles.tiff(np.zeros((4, 5, 3), dtype=np.float32), photometric="rgb")
    data = imagefiles.with_tags(small, ImageWidth=100_000, ImageLength=100_000)
    with pytest.raises(ImageError) as caught:
        decode_image(data, max_pixels=imagefiles.BOMB_TEST_MAX_PIXELS)
    assert caught.value.kind == "too_large"
    assert "100000x100000 = 10,000,000,000 pixels" in caught.value.message


def test_a_tiff_of_many_samples_is_held_to_the_bytes_of_four_float_samples_a_pixel() -> None:
    """A hyperspectral cube: 10 x 10 pixels (under the limit of 200) of 100 float samples, 40,000 bytes."""
    cube = imagefiles.tiff(
        np.zeros((10, 10, 100), dtype=np.float32), photometric="minisblack", planarconfig="contig"
    )
    with pytest.raises(ImageError) as caught:
        decode_image(cube, max_pixels=200)
    assert caught.value.kind == "too_large"
    assert "10x10 with 100 samples a pixel, 40,000 bytes decoded" in caught.value.message
    assert decode_image(cube, max_pixels=2_500).shape == (10, 10, 3)


def test_tiffs_that_still_cannot_be_decoded_say_why(files: pathlib.Path) -> None:
    with pytest.raises(ImageError) as caught:
        decode_file(files, "float-lzw.tif")
    assert caught.value.kind == "corrupt_image"
    assert "LZW" in caught.value.message and "imagecodecs" in caught.value.message
    lab = imagefiles.tiff(np.zeros((4, 5, 3), dtype=np.float32), photometric="cielab")
    with pytest.raises(ImageError) as caught:
        decode_image(lab)
    assert caught.value.kind == "corrupt_image" and "CIELAB" in caught.value.message


@pytest.mark.filterwarnings("ignore:(Corrupt EXIF data|Truncated File Read):UserWarning")
def test_any_truncation_of_a_float_tiff_decodes_or_raises_image_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each is an error row (or pixels), and tifffile keeps quiet about it: the row says what is wrong."""
    data = imagefiles.tiff(
        np.full((30, 40, 3), 99.5, dtype=np.float32), photometric="rgb", compression="zlib"
    )
    assert_each_truncation_decodes_or_is_an_error(data)
    assert not [r.getMessage() for r in caplog.records if r.name == "tifffile"]
