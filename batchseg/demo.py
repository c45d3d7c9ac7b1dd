"""The README's first command: generate a small shapes archive, segment it on local Ray, print some rows."""

from __future__ import annotations

import sys

from batchseg import storage
from batchseg.runner import log, run_segment
from batchseg.segment import OutputDir, SegmentConfig
from batchseg.synth import write_dataset


def run_demo(output: str, images: int) -> int:
    archive = storage.join(output, "images")
    results = storage.join(output, "results")
    log(f"writing {images} synthetic images to {archive}")
    dataset = write_dataset(archive, images, seed=0, size=128)
    config = SegmentConfig(
        manifest=dataset.manifest,
        output=results,
        model="maskrcnn_resnet50_fpn_v2",
        weights="none",  # no trained weights are available offline yet (issue #3 brings a small trained model)
        score_threshold=0.05,
        min_size=128,
        max_size=256,
        shard_size=8,
        overwrite=True,
    )
    summary = run_segment(config)
    table = OutputDir(results).read_table()
    print(f"\n{table.num_rows} rows in {results} (one per image); the first five:")
    for row in table.slice(0, 5).to_pylist():
        instances = row["instances"] or []
        best = max(instances, key=lambda i: i["score"], default=None)
        top = (
            f"best {best['category']} {best['score']:.2f} bbox {[round(v) for v in best['bbox']]}"
            if best
            else ""
        )
        print(f"  {row['image_id']}  {row['width']}x{row['height']}  {row['status']}  "
              f"{len(instances)} instances  {top}")  # fmt: skip
    print(f"\nsummary: {summary['ok']} ok, {summary['error']} errors, {summary['instances']} instances, "
          f"{summary['images_per_second']} images/s")  # fmt: skip
    print("NOTE: this demo ran with RANDOM weights (no trained model is available offline yet): "
          "the rows are real, the detections are noise.", file=sys.stderr)  # fmt: skip
    return 0 if summary["status"] == "complete" else 1
