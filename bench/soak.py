"""Soak: a longer segmentation job (thousands of small images) while actors are killed at random.

Local Ray with two actors; a killer thread SIGKILLs one of this job's SegmentationActor processes
every few seconds. Prints images processed, actors killed, shard retries, and rows lost or duplicated
(both must be 0).
Usage: python bench/soak.py [--images 2000] [--every 5,15] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources

from batchseg import log
from batchseg.analysis.results import open_results
from batchseg.io.manifest import iter_manifest
from batchseg.segment.driver import run_segment
from batchseg.segment.job import SegmentConfig
from batchseg.train.synth import write_dataset


def actor_pids() -> list[int]:
    """This machine's SegmentationActor processes (Ray titles its workers ``ray::<actor class>``)."""
    found = subprocess.run(["pgrep", "-f", "^ray::SegmentationActor"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def main() -> None:
    log.to_stderr()  # batchseg's progress, as the CLI prints it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--every", default="5,15", help="seconds between kills: MIN,MAX")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    low, high = (float(v) for v in args.every.split(","))
    rng = random.Random(args.seed)
    model = resources.files("batchseg") / "weights" / "maskrcnn_small_shapes.pt"
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(f"{tmp}/data", args.images, seed=args.seed, size=64)
        config = SegmentConfig(
            manifest=data.manifest,
            output=f"{tmp}/out",
            weights=str(model),
            shard_size=50,
            batch_size=8,
            actors=(2, 2),
            cpus_per_actor=1,
            max_attempts=10,
        )
        finished = threading.Event()
        kills = []

        def killer() -> None:
            while not finished.wait(rng.uniform(low, high)):
                pids = actor_pids()
                if pids:
                    victim = rng.choice(pids)
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)

        thread = threading.Thread(target=killer, daemon=True)
        start = time.time()
        thread.start()
        try:
            summary = run_segment(config)
        finally:
            finished.set()
        wall = time.time() - start
        ids = open_results(config.output).to_table().column("image_id").to_pylist()
        expected = {i for batch, _ in iter_manifest(data.manifest) for i in batch}
    lost = len(expected - set(ids))
    duplicated = len(ids) - len(set(ids))
    print(
        f"images {args.images}: {len(ids)} rows in {wall:.0f} s ({summary['images_this_run'] / wall:.1f} img/s), "
        f"status {summary['status']}"
    )
    print(
        f"actors killed {len(kills)}, shard retries {summary['retries']}, rows lost {lost}, rows duplicated {duplicated}"
    )
    sys.exit(0 if lost == duplicated == 0 and summary["status"] == "complete" else 1)


if __name__ == "__main__":
    main()
