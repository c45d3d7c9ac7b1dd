"""Tiled inference (#24) on huge TIFFs, the model stood in: tiles/s and one actor's peak memory, which must not
grow with the image.

For each ``--sizes`` side (10,000 and 40,000 px by default) a pyramidal tiled TIFF (BigTIFF, RGB, ``--tiff-tile``
px tiles, deflate, each level half the one before down to about ``--tiff-tile``) is generated: one background
colour with shapes scattered (about one per ``--spacing`` x ``--spacing`` px), written tile by tile from an
iterator, each tile drawn alone from the shapes' list, so the writer never holds the image (nor does
anything here). Each is then segmented with ``--tile`` by the shard processor (a job of one image, written
as a job writes it) in a fresh process of its own, the model's forward stood in as ``bench/scale.py`` does
(``bench/standin.py``: fixed detections, no model run), so what is measured is everything around the model:
windowed reads, tiles into batches, masks to RLE at the image's size, stitching, the row. That process
reports its tiles/s and its peak RSS (its own ``VmHWM``: a forked child's ``ru_maxrss`` starts at its
parent's), beside the RSS it had before the image (imports and model). Goals: peak RSS the same within 10%
for every size, and under 1.5 GB.
Usage: python bench/tiles_scale.py [--sizes 10000 40000] [--tile 512] [--overlap 64] [--instances 5]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator

import numpy as np
import tifffile
from PIL import Image, ImageDraw

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/ and tests/ as packages

GOALS = {"rss_spread": 0.10, "rss_mib": 1536.0}
BACKGROUND = (96, 128, 80)


class ScatteredShapes:
    """A huge image described, not drawn: a background colour and shapes (circles, squares, triangles) at
    random places, about one per ``spacing`` x ``spacing`` px; any window of any pyramid level is drawn
    from the list alone."""

    def __init__(self, side: int, spacing: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        count = max(1, (side // spacing) ** 2)
        self.side = side
        self.radius = rng.integers(12, 48, size=count)
        self.centre = rng.integers(48, side - 48, size=(count, 2))  # x, y
        self.kind = rng.integers(1, 4, size=count)
        self.colour = rng.integers(0, 256, size=(count, 3))

    def window(self, top: int, left: int, size: int, level: int) -> np.ndarray | None:
        """The ``size`` x ``size`` x 3 uint8 pixels at ``(top, left)`` of ``level`` (each level halves the
        one before; outside the image, background), or None where they are background alone."""
        scale = 2**level
        x, y = self.centre[:, 0] / scale - left, self.centre[:, 1] / scale - top
        r = self.radius / scale
        near = (x + r >= 0) & (x - r < size) & (y + r >= 0) & (y - r < size)
        if not near.any():
            return None
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for cx, cy, radius, kind, colour in zip(
            x[near], y[near], r[near], self.kind[near], self.colour[near], strict=True
        ):
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            fill = tuple(int(c) for c in colour)
            if kind == 1:
                draw.ellipse(box, fill=fill)
            elif kind == 2:
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon(
                    [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill
                )
        return np.asarray(image)

    def tiles(self, level: int, tile: int) -> Iterator[bytes]:
        """``level``'s tiles row by row, deflated, as tifffile's writer takes them (a tile of background
        alone, most of them, is deflated once)."""
        side = -(-self.side // 2**level)
        background = zlib.compress(np.full((tile, tile, 3), BACKGROUND, dtype=np.uint8).tobytes())
        for top in range(0, side, tile):
            for left in range(0, side, tile):
                pixels = self.window(top, left, tile, level)
                yield background if pixels is None else zlib.compress(pixels.tobytes())


def write_tiff(path: pathlib.Path, shapes: ScatteredShapes, tile: int) -> int:
    """``shapes`` as a pyramidal tiled BigTIFF (levels in SubIFDs, as OME-TIFF keeps them); returns the
    number of levels."""
    levels = 1
    while -(-shapes.side // 2**levels) >= 2 * tile:
        levels += 1
    options = {"tile": (tile, tile), "compression": "zlib", "photometric": "rgb", "dtype": np.uint8}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            side = -(-shapes.side // 2**level)
            tif.write(
                shapes.tiles(level, tile),
                shape=(side, side, 3),
                subifds=levels - 1 if level == 0 else None,
                subfiletype=1 if level else 0,
                **options,
            )
    return levels


def status_mib(field: str) -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def segment_one(tiff: str, output: str, tile: int, overlap: int, instances: int, inset: int) -> None:
    """The child: ``tiff`` segmented as a job of one image by the shard processor (the model stood in);
    prints its figures as one JSON line."""
    from batchseg.demo import SHAPES_MODEL
    from batchseg.inference.tiling import TileGrid
    from batchseg.io.manifest import iter_shards
    from batchseg.io.windowed import open_windowed
    from batchseg.segment.config import SegmentConfig
    from batchseg.segment.job import prepare_job
    from batchseg.segment.processor import ShardProcessor
    from bench.standin import stand_in

    stand_in(instances, inset)()
    manifest = pathlib.Path(output).with_suffix(".csv")
    manifest.write_text(f"uri,image_id\n{tiff},huge\n")
    config = SegmentConfig(
        manifest=str(manifest),
        output=output,
        weights=str(SHAPES_MODEL),
        tile=tile,
        tile_overlap=overlap,
        max_pixels=2_000_000_000,  # bounds the tile work of a windowed TIFF, not a decode
        overwrite=True,
    )
    with prepare_job(config) as job:
        processor = ShardProcessor.for_job(job)
    (shard,) = iter_shards(job.plan)
    image = open_windowed(tiff, max_pixels=config.max_pixels)
    assert image is not None, f"{tiff} must be read window by window"
    tiles = len(TileGrid(image.height, image.width, tile, config.overlap).tiles)
    image.close()
    before = status_mib("VmRSS")
    start = time.perf_counter()
    record = processor.process(shard)
    seconds = time.perf_counter() - start
    assert record.ok == 1, record
    figures = {
        "tiles": tiles,
        "seconds": seconds,
        "tiles_per_s": tiles / seconds,
        "rss_before_mib": before,
        "peak_rss_mib": status_mib("VmHWM"),
        "instances": record.instances,
    }
    print(json.dumps(figures), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--tile", type=int, default=512, help="segment's --tile")
    parser.add_argument("--overlap", type=int, default=64, help="segment's --tile-overlap")
    parser.add_argument("--tiff-tile", type=int, default=256, help="the TIFF's own tiles")
    parser.add_argument("--spacing", type=int, default=1000, help="about one shape per SPACING x SPACING px")
    parser.add_argument("--instances", type=int, default=5, help="stand-in detections per tile")
    parser.add_argument(
        "--inset",
        type=int,
        default=0,
        help="the stand-in's first box this far from the tile's corner (0: it touches two inner edges, so every "
        "inner tile gives a piece to stitch; 16: no box touches an edge)",
    )
    parser.add_argument("--workdir", default=None, help="keep the TIFFs here (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("TIFF", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        segment_one(*args.child, args.tile, args.overlap, args.instances, args.inset)
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = pathlib.Path(args.workdir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        peaks = []
        for side in args.sizes:
            tiff = folder / f"scene-{side}.tif"
            start = time.perf_counter()
            if not tiff.exists():
                levels = write_tiff(tiff, ScatteredShapes(side, args.spacing), args.tiff_tile)
                print(
                    f"[{side:,} px] wrote {tiff.stat().st_size / 2**20:.1f} MiB ({levels} levels, "
                    f"{args.tiff_tile} px tiles, deflate) in {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
            child = [sys.executable, __file__, "--child", str(tiff), str(folder / f"out-{side}")]
            for name in ("tile", "overlap", "instances", "inset"):
                child += [f"--{name}", str(getattr(args, name))]
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"[{side:,} px] the segmenting process failed:\n{done.stderr[-3000:]}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            peaks.append(figures["peak_rss_mib"])
            print(
                f"[{side:,} px] {figures['tiles']:,} tiles of {args.tile} px (overlap {args.overlap}) in "
                f"{figures['seconds']:.1f} s: {figures['tiles_per_s']:.1f} tiles/s; peak RSS "
                f"{figures['peak_rss_mib']:.0f} MiB ({figures['rss_before_mib']:.0f} MiB before the image: imports, "
                f"model); {figures['instances']:,} instances (stand-in inset {args.inset}) (goal: under {GOALS['rss_mib']:.0f} MiB)",
                flush=True,
            )
        spread = (max(peaks) - min(peaks)) / min(peaks)
        print(
            f"peak RSS from {min(peaks):.0f} to {max(peaks):.0f} MiB over {', '.join(f'{s:,}' for s in args.sizes)} "
            f"px: {spread:.1%} apart (goal: within {GOALS['rss_spread']:.0%})",
            flush=True,
        )


if __name__ == "__main__":
    main()
