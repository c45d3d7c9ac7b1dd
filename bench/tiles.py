"""Tiled inference (#24) on a scene of small objects: segm AP against the same images one by one, and what a
tile costs against the same pixels segmented as separate images.

Quality: ``--images`` shapes images (``batchseg.train.synth.draw_scene``, of the demo's held-out seed, so the
shipped small model has never seen them) pasted at random offsets that never overlap onto one ``--side`` px
scene, the ground truth moved with them. The segm AP (batchseg's ``eval``, pycocotools) of: the images one by
one (the baseline), the scene as ``segment`` does it by default (shrunk to the model's size), the scene at
``--min-size SIDE --max-size SIDE --max-instances 300`` (the workaround before tiling), the scene with
``--tile --tile-overlap`` (goal: at least 0.95 of one by one), and the same scene written as a tiled TIFF
(tile 256, deflate), whose row must hold the same instances as the PNG's when tiled.

Cost: the tiled scene against its tiles cut out and segmented as separate images: tiles/s of each (the
shard processor's ``rows``, median of ``--repeat``, the model loaded before) and their ratio (goal: at
least 0.9).

Every run goes through the shard processor in this process (``tests/segmenting.py``), without Ray: the rows
are those a job writes. Usage: python bench/tiles.py [--images 64] [--side 1280] [--tile 160] [--overlap 48]
[--shapes-only] [--native] [--only quality|cost] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

import numpy as np
import tifffile
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: the processor without Ray

from batchseg import log
from batchseg.analysis.evaluate import evaluate_output
from batchseg.analysis.results import Results
from batchseg.demo import HELD_OUT_SEED, SHAPES_MODEL
from batchseg.inference.tiling import TileGrid
from batchseg.io.manifest import iter_shards, plan_shards
from batchseg.segment.config import SegmentConfig
from batchseg.segment.job import prepare_job
from batchseg.segment.processor import ShardProcessor
from batchseg.train.synth import Scene, draw_scene
from tests.segmenting import assert_same_rows, segment_in_process

GOALS = {"ap_ratio": 0.95, "cost_ratio": 0.9}
TIFF_TILE = 256


def write_manifest(path: pathlib.Path, names: list[str]) -> str:
    path.write_text("uri,image_id\n" + "".join(f"{n},{i}\n" for i, n in enumerate(names, start=1)))
    return str(path)


def write_scene(folder: pathlib.Path, scene: Scene) -> dict[str, str]:
    """The scene as a PNG and a tiled TIFF, each in a manifest of one row (image id 1), with the scene's
    COCO ground truth; its parts as PNGs, with theirs. Returns the manifests and ground truths by name."""
    parts = [f"part-{i:03d}.png" for i in range(len(scene.parts))]
    for name, (_, _, part) in zip(parts, scene.parts, strict=True):
        Image.fromarray(part.pixels).save(folder / name)
    (folder / "parts.json").write_text(json.dumps(scene.parts_coco(parts)))
    Image.fromarray(scene.pixels).save(folder / "scene.png")
    tifffile.imwrite(
        folder / "scene.tif", scene.pixels, tile=(TIFF_TILE, TIFF_TILE), compression="zlib", photometric="rgb"
    )
    (folder / "scene.json").write_text(json.dumps(scene.coco("scene.png")))
    return {
        "parts": write_manifest(folder / "parts.csv", parts),
        "parts_truth": str(folder / "parts.json"),
        "png": write_manifest(folder / "png.csv", ["scene.png"]),
        "tif": write_manifest(folder / "tif.csv", ["scene.tif"]),
        "scene_truth": str(folder / "scene.json"),
    }


def config(manifest: str, output: str, **changes: Any) -> SegmentConfig:
    """The bench's job: the shipped small model, everything else segment's defaults."""
    return SegmentConfig(
        manifest=manifest, output=output, weights=str(SHAPES_MODEL), overwrite=True, **changes
    )


def segmented(manifest: str, output: str, truth: str, **changes: Any) -> tuple[float, list[dict[str, Any]]]:
    """segm AP of ``manifest`` segmented with ``changes`` against ``truth``, and the rows."""
    summary = segment_in_process(config(manifest, output, **changes))
    assert summary["ok"] == summary["images"], summary
    metrics = evaluate_output(output, truth, iou_types=("segm",))
    return metrics["segm"]["AP"], Results(output).to_table().to_pylist()


def quality(folder: pathlib.Path, files: dict[str, str], args: argparse.Namespace) -> None:
    side = args.side
    runs: list[tuple[str, str, str, dict[str, Any]]] = [
        ("the images one by one (the baseline)", "parts", "parts_truth", {}),
        ("the scene, as segment does by default", "png", "scene_truth", {}),
        (
            f"the scene at --min-size {side} --max-size {side} --max-instances 300",
            "png",
            "scene_truth",
            {"min_size": side, "max_size": side, "max_instances": 300},
        ),
    ]
    tiled: dict[str, Any] = {"tile": args.tile, "tile_overlap": args.overlap}
    how = f"--tile {args.tile} --tile-overlap {args.overlap}"
    if args.native:
        tiled |= {"min_size": args.tile, "max_size": args.tile}
        how += f" --min-size {args.tile} --max-size {args.tile}"
    runs.append((f"the scene with {how}", "png", "scene_truth", tiled))
    figures: dict[str, float] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for label, manifest, truth, changes in runs:
        start = time.perf_counter()
        figures[label], rows[label] = segmented(
            files[manifest], str(folder / f"out-{len(figures)}"), files[truth], **changes
        )
        found = sum(len(r["instances"] or []) for r in rows[label])
        print(
            f"[quality] {label}: segm AP {figures[label]:.3f} ({found} instances, {time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    baseline = figures[runs[0][0]]
    for label, _, _, _ in runs[1:]:
        goal = f" (goal: at least {GOALS['ap_ratio']})" if "--tile" in label else ""
        print(f"[quality] {label}: {figures[label] / baseline:.3f} of one by one{goal}", flush=True)
    _, tif_rows = segmented(files["tif"], str(folder / "out-tif"), files["scene_truth"], **tiled)
    png_rows = rows[runs[-1][0]]
    assert_same_rows([r | {"uri": "scene"} for r in tif_rows], [r | {"uri": "scene"} for r in png_rows])
    print(
        f"[quality] the scene as a tiled TIFF ({TIFF_TILE} px tiles, deflate) with --tile {args.tile}: the same "
        f"{len(tif_rows[0]['instances'])} instances as the PNG (masks identical, scores and boxes within 1e-4)",
        flush=True,
    )


def cost(folder: pathlib.Path, scene: Scene, files: dict[str, str], args: argparse.Namespace) -> None:
    """Tiles/s of the tiled scene and of its tiles cut out as separate images, through the shard
    processor's ``rows`` (read, decode, model, masks to RLE, stitching; the model loaded before), timed in
    turns so that both meet the same load on a shared machine; the median of ``--repeat``."""
    height, width = scene.pixels.shape[:2]
    tiles = TileGrid(height, width, args.tile, args.overlap).tiles
    names = []
    for t in tiles:
        names.append(f"tile-{t.index:04d}.png")
        Image.fromarray(scene.pixels[t.top : t.bottom, t.left : t.right]).save(folder / names[-1])
    separate = config(write_manifest(folder / "tiles.csv", names), str(folder / "out-cost"))
    tiled = replace(separate, manifest=files["png"], tile=args.tile, tile_overlap=args.overlap)
    work = {}
    for name, job in (("separate", separate), ("tiled", tiled)):
        (shard,) = iter_shards(plan_shards(job.manifest, len(names)))
        with prepare_job(job) as prepared:  # both write one output: each lets go of it in turn
            work[name] = (ShardProcessor.for_job(prepared), shard)
    seconds: dict[str, list[float]] = {"separate": [], "tiled": []}
    for _ in range(args.repeat):
        for name, (processor, shard) in work.items():
            start = time.perf_counter()
            processor.rows(shard)
            seconds[name].append(time.perf_counter() - start)
    rates = {k: len(tiles) / statistics.median(v) for k, v in seconds.items()}
    print(
        f"[cost] {len(tiles)} tiles of {args.tile} px (overlap {args.overlap}), median of {args.repeat}: as "
        f"separate images {rates['separate']:.1f} tiles/s, by --tile {rates['tiled']:.1f} tiles/s; ratio "
        f"{rates['tiled'] / rates['separate']:.3f} (goal: at least {GOALS['cost_ratio']})",
        flush=True,
    )


def main() -> None:
    log.to_stderr()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--side", type=int, default=1280)
    parser.add_argument(
        "--seed", type=int, default=HELD_OUT_SEED, help="of the scene (the model never saw 7)"
    )
    parser.add_argument("--tile", type=int, default=160)
    parser.add_argument("--overlap", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each cost figure (the median)")
    parser.add_argument(
        "--shapes-only",
        action="store_true",
        help="paste only the images' shapes, not their backgrounds (rectangles a model of shapes may take for squares)",
    )
    parser.add_argument(
        "--native", action="store_true", help="tiles at native scale: --min-size and --max-size set to --tile"
    )
    parser.add_argument("--only", choices=("quality", "cost"), help="run only this part")
    args = parser.parse_args()
    scene = draw_scene(np.random.default_rng(args.seed), args.images, args.side, whole=not args.shapes_only)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        files = write_scene(folder, scene)
        print(
            f"scene: {args.images} shapes images on {args.side} x {args.side} px (seed {args.seed}), "
            f"{sum(len(p.instances) for _, _, p in scene.parts)} instances"
            f"{', shapes only (no backgrounds)' if args.shapes_only else ', each image whole'}",
            flush=True,
        )
        if args.only != "cost":
            quality(folder, files, args)
        if args.only != "quality":
            cost(folder, scene, files, args)


if __name__ == "__main__":
    main()
