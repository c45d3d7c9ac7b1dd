"""The README's first command: a held-out shapes archive, segmented on local Ray by the small model that
``batchseg train`` made (shipped in ``batchseg/weights``), a few result rows, and its COCO AP."""

from __future__ import annotations

import sys
from importlib import resources

from batchseg import log
from batchseg.analysis.evaluate import evaluate, format_table
from batchseg.analysis.results import Results
from batchseg.io import storage
from batchseg.segment.driver import run_segment
from batchseg.segment.job import SegmentConfig
from batchseg.train.synth import write_dataset

# Made by the command in BENCHMARKS.md ("Training the small model") from images of seed 1; the demo's
# images come from another seed, so the model has never seen them.
SHAPES_MODEL = resources.files("batchseg") / "weights" / "maskrcnn_small_shapes.pt"
HELD_OUT_SEED = 7


def run_demo(output: str, images: int) -> int:
    archive = storage.join(output, "held-out")
    results = storage.join(output, "results")
    log.info(f"writing {images} synthetic images (seed {HELD_OUT_SEED}, never seen in training) to {archive}")
    dataset = write_dataset(archive, images, seed=HELD_OUT_SEED, size=128)
    config = SegmentConfig(
        manifest=dataset.manifest,
        output=results,
        weights=str(SHAPES_MODEL),
        score_threshold=0.3,
        shard_size=16,
        overwrite=True,
    )
    summary = run_segment(config)
    table = Results(results).to_table()
    print(f"\n{table.num_rows} rows in {results} (one per image); the first five:")
    for row in table.slice(0, 5).to_pylist():
        found = ", ".join(f"{i['category']} {i['score']:.2f}" for i in row["instances"] or [])
        print(f"  image {row['image_id']:>3}  {row['width']}x{row['height']}  {row['status']}  [{found}]")
    print(
        f"\nsummary: {summary['ok']} ok, {summary['error']} errors, {summary['instances']} instances, "
        f"{summary['images_per_second']} images/s\n"
    )
    metrics = evaluate(results, dataset.annotations)
    print(format_table(metrics))
    ap = metrics["segm"]["AP"]
    if ap < 0.5:
        print(f"segm AP {ap:.3f} is below the 0.5 this demo promises", file=sys.stderr)
        return 1
    print(f"\nsegm AP {ap:.3f} on images the model never saw")
    return 0 if summary["status"] == "complete" else 1
