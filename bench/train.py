"""Training speed and learning curve of a preset on the shapes set, then the trained model's held-out AP.

Runs ``batchseg train`` (Ray Train, local) with validation at each checkpoint and prints, per
checkpoint, the iteration, minutes of training so far, images/s per worker, and bbox/segm AP. Then it
segments the held-out set with ``batchseg segment`` (score threshold 0.3) and evaluates that output, as a
user would, printing segm and bbox AP beside the goal: with the defaults (the recipe of 240 steps of 8
images that the test suite ran until issue #21), both at least 0.5. Exits 1 when under the goal.
Usage: python bench/train.py [--iterations 240] [--every 40] [--workers 1] [--cpus-per-worker 2] [--goal 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from batchseg import log
from batchseg.analysis.evaluate import evaluate_output
from batchseg.segment.config import SegmentConfig
from batchseg.segment.driver import run_segment
from batchseg.train.config import TrainConfig
from batchseg.train.synth import write_dataset
from batchseg.train.trainer import run_training


def main() -> None:
    log.to_stderr()  # batchseg's progress, as the CLI prints it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="maskrcnn_small")
    parser.add_argument("--iterations", type=int, default=240)
    parser.add_argument("--every", type=int, default=40, help="iterations between checkpoints (validations)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=2)
    parser.add_argument("--goal", type=float, default=0.5, help="the held-out segm and bbox AP to reach")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train = write_dataset(f"{tmp}/train", 1000, seed=1)
        val = write_dataset(f"{tmp}/val", 50, seed=2)
        config = TrainConfig(
            images=train.images,
            annotations=train.annotations,
            output=f"{tmp}/run",
            model=args.model,
            iterations=args.iterations,
            checkpoint_every=args.every,
            batch_size=args.batch_size,
            workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            validation_images=val.images,
            validation_annotations=val.annotations,
        )
        started = time.perf_counter()
        run_training(config)
        train_seconds = time.perf_counter() - started
        with open(os.path.join(config.output, "checkpoint_manager_snapshot.json")) as f:
            results = [r["metrics"] for r in json.load(f)["checkpoint_results"]]
        segmented = f"{tmp}/segmented"
        summary = run_segment(
            SegmentConfig(manifest=val.manifest, output=segmented, weights=config.output, score_threshold=0.3)
        )
        held_out = evaluate_output(segmented, val.annotations)
    print(
        f"{args.model}, {args.workers} worker(s) x {args.cpus_per_worker:g} CPU, batch {args.batch_size} per worker"
    )
    print("iteration  train min  img/s/worker  bbox AP  segm AP  segm AP50")
    for m in results:
        print(
            f"{m['step']:>9}  {m['train_seconds'] / 60:>9.2f}  {m['images_per_second_per_worker']:>12.1f}  "
            f"{m['bbox_AP']:>7.3f}  {m['segm_AP']:>7.3f}  {m['segm_AP50']:>9.3f}"
        )
    print(f"wall time of run_training: {train_seconds:.0f} s")
    matched = held_out["images"]["matched"]
    print(f"held-out set through segment (score 0.3) and eval: {summary['ok']} images ok, {matched} matched")
    reached = summary["ok"] == matched == 50
    for kind in ("segm", "bbox"):
        ap = held_out[kind]["AP"]
        reached = reached and ap >= args.goal
        print(f"  {kind} AP {ap:.3f}  (goal: at least {args.goal})")
    if not reached:
        sys.exit(f"under the goal of {args.goal} AP on 50 matched images")


if __name__ == "__main__":
    main()
