"""io.windowed: TIFF windows read tile by tile equal decode_image's pixels; levels, previews, geo placement,
broken files, threads, S3 range reads and bounded memory."""

from __future__ import annotations

import io
import pathlib
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import s3fs
import tifffile
from PIL import Image

from batchseg.errors import CredentialsRejected, ImageError, StorageUnavailable
from batchseg.io import retries, storage
from batchseg.io.images import decode_image
from batchseg.io.windowed import Geo, WindowedImage, geo_of, is_windowed, open_windowed, preview
from tests.faults import FaultProxy
from tests.s3server import S3Server
from tests.tiffs import (
    geo_tags,
    halved,
    random_pixels,
    write_generated,
    write_pyramid,
    write_striped,
    write_tiled,
)

# (top, left, height, width): inside one tile, across tiles, on the last row and column, clipped at the
# bottom right, the whole image.
WINDOWS = [(0, 0, 10, 10), (5, 60, 70, 90), (100, 150, 50, 80), (130, 10, 70, 300), (120, 170, 500, 500)]
HEIGHT, WIDTH = 150, 200  # not multiples of the tiles or strips: edge tiles are partly outside


def whole(path: pathlib.Path) -> np.ndarray:
    return decode_image(path.read_bytes())


def assert_windows_equal(image: WindowedImage, expected: np.ndarray) -> None:
    for top, left, height, width in WINDOWS:
        got = image.read(top, left, height, width)
        want = expected[top : top + height, left : left + width]
        assert got.dtype == np.uint8 and got.shape == want.shape, (top, left, got.shape, want.shape)
        assert got.flags.c_contiguous and got.flags.writeable  # as decode_image gives its pixels
        assert np.array_equal(got, want), (top, left, height, width)


def opened(path: pathlib.Path, **options: Any) -> WindowedImage:
    image = open_windowed(str(path), **options)
    assert image is not None
    return image


FILES: dict[str, Callable[[pathlib.Path, np.ndarray], pathlib.Path]] = {
    "tiled": lambda p, px: write_tiled(p, px),
    "tiled, uncompressed": lambda p, px: write_tiled(p, px, compression=None),
    "striped": lambda p, px: write_striped(p, px, rows_per_strip=16),
    "striped, uncompressed, big-endian": lambda p, px: write_striped(
        p, px, 7, compression=None, byteorder=">"
    ),
    "BigTIFF": lambda p, px: write_tiled(p, px, bigtiff=True),
    "tiled, zlib with a predictor": lambda p, px: write_tiled(p, px, predictor=True),
    "tiled, planar": lambda p, px: write_tiled(p, np.moveaxis(px, -1, 0), planarconfig="separate"),
    "striped, planar": lambda p, px: write_striped(p, np.moveaxis(px, -1, 0), 32, planarconfig="separate"),
    "pyramid in SubIFDs": lambda p, px: write_pyramid(p, px, style="subifds"),
    "pyramid in pages": lambda p, px: write_pyramid(p, px, style="pages"),
    "OME-TIFF pyramid": lambda p, px: write_pyramid(p, px, style="ome"),
}


@pytest.mark.parametrize("kind", FILES)
def test_windows_equal_the_whole_image_decoded(tmp_path: pathlib.Path, kind: str) -> None:
    path = FILES[kind](tmp_path / "image.tif", random_pixels(HEIGHT, WIDTH))
    image = opened(path)
    assert (image.width, image.height, image.levels[0]) == (WIDTH, HEIGHT, (WIDTH, HEIGHT))
    assert_windows_equal(image, whole(path))


# (samples, dtype, tifffile's photometric, extrasamples): each layout read window by window.
LAYOUTS = [
    (1, np.uint8, "minisblack", None),
    (1, np.uint8, "miniswhite", None),
    (1, np.uint16, "minisblack", None),
    (1, np.float32, "minisblack", None),
    (2, np.uint8, "minisblack", ("unassalpha",)),
    (2, np.uint8, "minisblack", ("assocalpha",)),
    (3, np.uint16, "rgb", None),
    (3, np.float32, "rgb", None),
    (4, np.uint8, "rgb", ("unassalpha",)),
    (4, np.uint8, "rgb", ("assocalpha",)),
    (4, np.uint16, "rgb", ("unassalpha",)),
    (4, np.uint8, "rgb", ("unspecified",)),
]


@pytest.mark.parametrize(("samples", "dtype", "photometric", "extra"), LAYOUTS)
def test_grey_16_bit_float_and_alpha_as_decode_image_gives_them(
    tmp_path: pathlib.Path, samples: int, dtype: Any, photometric: str, extra: tuple[str, ...] | None
) -> None:
    pixels = random_pixels(HEIGHT, WIDTH, samples, dtype)
    path = write_tiled(tmp_path / "image.tif", pixels, photometric=photometric, extrasamples=extra)
    assert_windows_equal(opened(path), whole(path))


def test_images_better_decoded_whole_are_not_opened(tmp_path: pathlib.Path) -> None:
    """None: decode_image reads them as it always has."""
    pixels = random_pixels(HEIGHT, WIDTH)
    Image.fromarray(pixels).save(tmp_path / "png.tif", format="PNG")
    (tmp_path / "text.tif").write_text("not an image")
    write_striped(tmp_path / "one strip.tif", pixels, rows_per_strip=HEIGHT)
    write_tiled(tmp_path / "turned.tif", pixels, extratags=[(274, 3, 1, 6, True)])  # Orientation 6
    write_tiled(
        tmp_path / "palette.tif",
        pixels[:, :, 0],
        photometric="palette",
        colormap=np.zeros((3, 256), np.uint16),
    )
    write_tiled(tmp_path / "cmyk.tif", random_pixels(HEIGHT, WIDTH, 4), photometric="separated")
    write_tiled(tmp_path / "bilevel.tif", pixels[:, :, 0] > 127, photometric="minisblack")
    write_tiled(
        tmp_path / "five samples.tif",
        random_pixels(HEIGHT, WIDTH, 5),
        photometric="minisblack",
        planarconfig="contig",
    )
    for name in ("png", "text", "one strip", "turned", "palette", "cmyk", "bilevel", "five samples"):
        assert open_windowed(str(tmp_path / f"{name}.tif")) is None, name
    assert decode_image((tmp_path / "turned.tif").read_bytes()).shape == (WIDTH, HEIGHT, 3)  # as displayed


def test_the_size_limit_is_decode_images(tmp_path: pathlib.Path) -> None:
    path = write_tiled(tmp_path / "image.tif", random_pixels(HEIGHT, WIDTH))
    with pytest.raises(ImageError) as windowed:
        open_windowed(str(path), max_pixels=HEIGHT * WIDTH - 1)
    with pytest.raises(ImageError) as decoded:
        decode_image(path.read_bytes(), max_pixels=HEIGHT * WIDTH - 1)
    assert windowed.value.kind == "too_large" and str(windowed.value) == str(decoded.value)
    assert opened(path, max_pixels=HEIGHT * WIDTH).width == WIDTH


def test_is_windowed_by_the_name() -> None:
    assert is_windowed("s3://b/slide.SVS") and is_windowed("scene.tiff") and is_windowed("big.btf")
    assert not is_windowed("photo.jpg") and not is_windowed("tif.png")


@pytest.mark.parametrize("style", ["subifds", "pages", "ome"])
def test_pyramid_levels_are_listed_and_read(tmp_path: pathlib.Path, style: str) -> None:
    pixels = random_pixels(HEIGHT, WIDTH)
    image = opened(write_pyramid(tmp_path / "image.tif", pixels, levels=3, style=style))
    assert image.levels == ((200, 150), (100, 75), (50, 38))
    for level in (1, 2):
        assert np.array_equal(image.read(10, 20, 30, 200, level=level), halved(pixels, level)[10:40, 20:])


def test_a_stack_of_pages_is_not_read_through_for_levels(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 pages of 88 KiB, each IFD before its tiles: looking for levels through all of them would read a
    block of the file for each; the second page, at full resolution, says there are none."""
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as tiff:
        for seed in range(30):
            tiff.write(random_pixels(HEIGHT, WIDTH, seed=seed), tile=(64, 64), photometric="rgb")
    requests = []
    read_ranges = storage.read_ranges
    monkeypatch.setattr(storage, "read_ranges", lambda *args: requests.append(args[2]) or read_ranges(*args))
    image = opened(path)
    assert image.levels == ((WIDTH, HEIGHT),) and requests == [[(0, 256 * 1024)]]
    assert np.array_equal(image.read(0, 0, HEIGHT, WIDTH), whole(path))


def test_a_preview_reads_the_smallest_level_large_enough(tmp_path: pathlib.Path) -> None:
    """200 x 150 shown 40 wide: level 2 (50 x 38) is large enough, level 1 would be read for 60 wide.
    The pixels tell which level was read: each level is noise of its own."""
    levels = [
        random_pixels(HEIGHT, WIDTH, seed=0),
        random_pixels(75, 100, seed=1),
        random_pixels(38, 50, seed=2),
    ]
    path = tmp_path / "image.tif"
    with tifffile.TiffWriter(path) as tiff:
        for level, pixels in enumerate(levels):
            tiff.write(
                pixels,
                tile=(16, 16),
                photometric="rgb",
                subifds=2 if level == 0 else None,
                subfiletype=int(level > 0),
            )

    def shown(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))

    got, scale = preview(str(path), max_side=40)
    assert scale == 0.2 and np.array_equal(got, shown(levels[2], (40, 30)))
    got, scale = preview(str(path), max_side=60)
    assert scale == 0.3 and np.array_equal(got, shown(levels[1], (60, 45)))
    # A region: (left, top, width, height) of level 0, read from level 1's window (50, 20) + (50 x 25).
    got, scale = preview(str(path), max_side=50, region=(100, 40, 100, 50))
    assert scale == 0.5 and np.array_equal(got, shown(levels[1][20:45, 50:100], (50, 25)))
    got, scale = preview(str(path), max_side=500, region=(190, 140, 100, 100))  # clipped, not scaled
    assert scale == 1 and np.array_equal(got, levels[0][140:, 190:])
    with pytest.raises(ImageError, match="lies outside the image"):
        preview(str(path), region=(300, 0, 10, 10))


def test_a_preview_of_another_image_is_decoded_whole(tmp_path: pathlib.Path) -> None:
    pixels = random_pixels(HEIGHT, WIDTH)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    write_striped(tmp_path / "one strip.tif", pixels, rows_per_strip=HEIGHT)
    for name in ("image.png", "one strip.tif"):
        got, scale = preview(str(tmp_path / name), max_side=100, region=(0, 50, 200, 100))
        assert scale == 0.5
        assert np.array_equal(
            got, np.asarray(Image.fromarray(pixels[50:]).resize((100, 50), Image.Resampling.BOX))
        )


GEO = [
    # a north-up UTM scene, tied at its corner
    (geo_tags(), Geo((500_000.0, 10.0, 0.0, 4_600_000.0, 0.0, -10.0), "EPSG:32633")),
    # tied at pixel (10, 20): the origin moves back by 10 and 20 pixels
    (geo_tags(tiepoint_pixel=(10, 20)), Geo((499_900.0, 10.0, 0.0, 4_600_200.0, 0.0, -10.0), "EPSG:32633")),
    # PixelIsPoint: the tie point is a pixel's centre, half a pixel from its corner (as GDAL reads it)
    (geo_tags(pixel_is_point=True), Geo((499_995.0, 10.0, 0.0, 4_600_005.0, 0.0, -10.0), "EPSG:32633")),
    # geographic degrees
    (
        geo_tags(4326, origin=(12.5, 41.9), pixel=(0.001, 0.002), geographic=True),
        Geo((12.5, 0.001, 0.0, 41.9, 0.0, -0.002), "EPSG:4326"),
    ),
    # a user-defined CRS, and none named: placed all the same
    (geo_tags(32767), Geo((500_000.0, 10.0, 0.0, 4_600_000.0, 0.0, -10.0), None)),
    (geo_tags(None), Geo((500_000.0, 10.0, 0.0, 4_600_000.0, 0.0, -10.0), None)),
    # a rotated ModelTransformation: x = 100 + 2 col + 0.5 row, y = 300 + 0.25 col - 3 row
    (
        geo_tags(3857, matrix=(2, 0.5, 0, 100, 0.25, -3, 0, 300, 0, 0, 0, 0, 0, 0, 0, 1)),
        Geo((100.0, 2.0, 0.5, 300.0, 0.25, -3.0), "EPSG:3857"),
    ),
]


@pytest.mark.parametrize(("tags", "expected"), GEO)
def test_geotiff_tags_place_the_image_as_gdal_does(
    tmp_path: pathlib.Path, tags: list[Any], expected: Geo
) -> None:
    path = write_tiled(tmp_path / "scene.tif", random_pixels(HEIGHT, WIDTH), extratags=tags)
    assert opened(path).geo == expected
    with tifffile.TiffFile(io.BytesIO(path.read_bytes())) as tiff:  # an image decoded whole has it too
        assert geo_of(tiff.pages.first) == expected


def test_no_geotiff_tags_no_placement(tmp_path: pathlib.Path) -> None:
    assert opened(write_tiled(tmp_path / "image.tif", random_pixels(HEIGHT, WIDTH))).geo is None


def tile_data(path: pathlib.Path, index: int) -> tuple[int, int]:
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages.first
        return page.dataoffsets[index], page.databytecounts[index]


def test_a_corrupt_tile_fails_its_windows_alone(tmp_path: pathlib.Path) -> None:
    path = write_tiled(tmp_path / "image.tif", random_pixels(HEIGHT, WIDTH))  # 4 x 3 tiles of 64
    expected = whole(path)
    offset, count = tile_data(path, 5)  # row 1, column 1: pixels (64..128, 64..128)
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\x00garbage" * (count // 8) + b"\x00" * (count % 8)
    path.write_bytes(bytes(data))
    image = opened(path)
    with pytest.raises(ImageError) as broken:
        image.read(60, 60, 10, 10)
    assert broken.value.kind == "corrupt_image" and "\n" not in str(broken.value)
    assert str(broken.value).startswith("corrupt_image: cannot decode TIFF tile 5 of level 0: ")
    assert np.array_equal(image.read(0, 0, 64, 200), expected[:64])
    assert np.array_equal(image.read(70, 130, 80, 70), expected[70:, 130:])


def test_a_truncated_file_fails_the_windows_it_lacks(tmp_path: pathlib.Path) -> None:
    path = write_striped(tmp_path / "image.tif", random_pixels(HEIGHT, WIDTH), compression=None)
    expected = whole(path)
    offset, count = tile_data(path, 5)  # strips of 16 rows: 5 is rows 80..96
    path.write_bytes(path.read_bytes()[: offset + count // 2])
    image = opened(path)
    assert np.array_equal(image.read(0, 0, 80, 200), expected[:80])
    with pytest.raises(ImageError) as truncated:
        image.read(90, 0, 10, 10)
    assert truncated.value.kind == "corrupt_image" and "lies past the end of the file" in str(truncated.value)


def test_a_broken_header_is_corrupt_image(tmp_path: pathlib.Path) -> None:
    path = write_tiled(tmp_path / "image.tif", random_pixels(HEIGHT, WIDTH))
    (tmp_path / "broken.tif").write_bytes(path.read_bytes()[:4] + b"\xff\xff\xff\x7f" + b"\x00" * 40)
    with pytest.raises(ImageError) as broken:
        open_windowed(str(tmp_path / "broken.tif"))
    assert broken.value.kind == "corrupt_image" and "\n" not in str(broken.value)
    with pytest.raises(ImageError) as missing:
        open_windowed(str(tmp_path / "missing.tif"))
    assert missing.value.kind == "not_found"


def test_tiles_without_a_decoder_need_imagecodecs(tmp_path: pathlib.Path) -> None:
    """JPEG tiles (an SVS slide's) need imagecodecs, which batchseg does not require: the Compression tag
    of a zlib file set to JPEG stands in for one. An image within --max-pixels is left to be decoded
    whole (Pillow's libtiff reads LZW and JPEG tiles); a larger one, a slide, says what it needs."""
    path = write_tiled(tmp_path / "image.tif", random_pixels(HEIGHT, WIDTH))
    with tifffile.TiffFile(path) as tiff:
        value_at = tiff.pages.first.tags[259].offset + 8  # inline SHORT value of the classic TIFF tag
    data = bytearray(path.read_bytes())
    data[value_at : value_at + 2] = (7).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    assert open_windowed(str(path)) is None
    with pytest.raises(ImageError) as needs:
        open_windowed(str(path), max_pixels=HEIGHT * WIDTH - 1)
    assert str(needs.value) == "corrupt_image: TIFF compression JPEG needs the imagecodecs package"


def test_many_threads_read_one_image_at_once(tmp_path: pathlib.Path) -> None:
    path = write_pyramid(tmp_path / "image.tif", random_pixels(HEIGHT, WIDTH), levels=2, tile=32)
    expected = whole(path)
    image = opened(path)
    rng = np.random.default_rng(1)
    windows = [(int(rng.integers(0, HEIGHT)), int(rng.integers(0, WIDTH)), 40, 50) for _ in range(200)]
    with ThreadPoolExecutor(8) as threads:
        got = list(threads.map(lambda window: image.read(*window), windows))
    for (top, left, height, width), pixels in zip(windows, got, strict=True):
        assert np.array_equal(pixels, expected[top : top + height, left : left + width])


def test_a_window_costs_its_tiles_not_the_image(tmp_path: pathlib.Path) -> None:
    """A 4096 x 4096 RGB scene (48 MiB decoded) with a few bright squares, written tile by tile: opening it
    and reading a window holds a few tiles (192 KiB each), never the image."""
    size, tile = 4096, 256

    def tile_at(top: int, left: int, rows: int, columns: int, step: int) -> np.ndarray:
        pixels = np.zeros((rows, columns, 3), np.uint8)
        if (top // rows + left // columns) % 5 == 0:
            pixels[10:50, 20:90] = (200, 30, 90)
        return pixels

    path = write_generated(tmp_path / "scene.tif", size, size, tile_at, tile=tile, levels=4)
    tracemalloc.start()
    try:
        image = opened(path, max_pixels=size * size)
        window = image.read(1000, 1000, 400, 400)
        small, _ = preview(str(path), max_side=256, max_pixels=512 * 512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.levels == ((4096, 4096), (2048, 2048), (1024, 1024), (512, 512))
    assert peak < 4 * 2**20, peak  # under a tenth of the image's 48 MiB
    expected = np.zeros((400, 400, 3), np.uint8)
    expected[290:330, 300:370] = (200, 30, 90)  # the square of tile (5, 5), the window's only one
    assert np.array_equal(window, expected)
    assert small.shape == (256, 256, 3) and small.any()


def put_on_s3(s3: S3Server, path: pathlib.Path, key: str) -> str:
    s3fs.S3FileSystem(skip_instance_cache=True, **s3.options()).put_file(str(path), key)
    return f"s3://{key}"


def test_on_s3_a_window_fetches_its_tiles_not_the_file(tmp_path: pathlib.Path, s3: S3Server) -> None:
    """Bytes counted where they cross the wire: a proxy in front of the store."""
    pixels = random_pixels(1024, 1024)  # 3 MiB of noise that zlib cannot shrink
    path = write_pyramid(tmp_path / "image.tif", pixels, levels=3, tile=128, style="pages")
    uri = put_on_s3(s3, path, "data/windowed/image.tif")
    with FaultProxy(s3.ports[3], every=10**9) as proxy:  # no faults: only counts
        options = s3.options() | {"endpoint_url": proxy.endpoint}
        image = open_windowed(uri, options)
        assert image is not None and image.levels == ((1024, 1024), (512, 512), (256, 256))
        header = proxy.counts()
        window = image.read(100, 200, 100, 100)  # four tiles of 48 KiB
        read = proxy.counts()
    assert np.array_equal(window, pixels[100:200, 200:300])
    # the signature, a HEAD, then one block of 256 KiB for each level's IFD (this file has them apart)
    assert header["requests"] <= 5 and header["body_bytes"] <= 3 * 256 * 1024 + 4, header
    assert read["requests"] - header["requests"] <= 4, read
    assert 4 * 128 * 128 * 3 <= read["body_bytes"] - header["body_bytes"] <= 5 * 128 * 128 * 3
    assert path.stat().st_size > 3 * 2**20  # level 0 alone


def test_on_s3_transient_failures_are_retried_and_an_outage_is_storage_unavailable(
    tmp_path: pathlib.Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    pixels = random_pixels(HEIGHT, WIDTH)
    uri = put_on_s3(s3, write_tiled(tmp_path / "image.tif", pixels, tile=32), "data/windowed/flaky.tif")
    once = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}  # botocore's own retries off
    before = retries.count()
    # every third request refused, with the next five on the object: more than s3fs tries on its own
    with FaultProxy(s3.ports[3], every=3, kinds=("slowdown",), repeat=6) as proxy:
        image = open_windowed(uri, s3.options() | {"endpoint_url": proxy.endpoint} | once)
        assert image is not None
        for top, left in ((0, 0), (40, 70), (100, 150)):
            assert np.array_equal(image.read(top, left, 50, 50), pixels[top : top + 50, left : left + 50])
        assert proxy.counts()["slowdown"] >= 2
    assert retries.count() > before
    monkeypatch.setattr(retries, "RETRY_SECONDS", 1.0)
    with (
        FaultProxy(s3.ports[3], every=1, kinds=("slowdown",)) as proxy,
        pytest.raises(StorageUnavailable, match="storage kept failing"),
    ):
        open_windowed(uri, s3.options() | {"endpoint_url": proxy.endpoint} | once)


def test_on_s3_refused_credentials_fail_the_shard_and_a_missing_object_the_image(
    tmp_path: pathlib.Path, s3: S3Server
) -> None:
    uri = put_on_s3(
        s3, write_tiled(tmp_path / "image.tif", random_pixels(HEIGHT, WIDTH)), "data/windowed/key.tif"
    )
    with pytest.raises(CredentialsRejected):
        open_windowed(uri, s3.options(secret="not-the-secret"))
    with pytest.raises(ImageError) as missing:
        open_windowed("s3://data/windowed/none.tif", s3.options())
    assert missing.value.kind == "not_found"
