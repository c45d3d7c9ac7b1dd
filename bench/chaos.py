"""Chaos: a segmentation job on S3 whose images and output sit behind a proxy that breaks requests.

Starts SeaweedFS on 127.0.0.1 (as the tests do), writes ``--images`` shapes images of 64x64 there
(``batchseg synth``), and runs the real job (local Ray, two actors of 1 CPU running the shipped
``maskrcnn_small``, shards of 50) with ``tests/faults.py`` in front of the server: every ``--every``-th
request for an image or the output is, in turn, reset mid-body, answered 503 SlowDown, stalled past the
read timeout, or cut short, and so are its next ``--repeat - 1`` tries (five in all outlast s3fs's own
retries; botocore's are off unless ``--client-retries``). Prints images/s, rows ok and error, faults per
kind, batchseg's storage retries and shard retries, and whether every manifest id is in the output
exactly once. ``--every 0`` runs the same with no fault, for comparison.
Usage: python bench/chaos.py [--images 2000] [--every 8] [--repeat 5] [--read-timeout 1] [--client-retries]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
from collections import Counter

import ray

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: the S3 server and proxy

from batchseg import log
from batchseg.analysis.results import open_results
from batchseg.demo import SHAPES_MODEL
from batchseg.io.manifest import iter_manifest
from batchseg.segment.config import SegmentConfig
from batchseg.segment.driver import run_segment
from batchseg.train.synth import write_dataset
from tests.faults import KINDS, FaultProxy
from tests.s3server import running_s3


def main() -> None:
    log.to_stderr()  # batchseg's progress, as the CLI prints it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--every", type=int, default=8, help="break every N-th request (0: none)")
    parser.add_argument("--repeat", type=int, default=5, help="tries of the same request each fault lasts")
    parser.add_argument("--read-timeout", type=float, default=1.0)
    parser.add_argument("--client-retries", action="store_true", help="leave botocore's own retries on")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, running_s3(pathlib.Path(tmp), ("data", "out")) as server:
        try:
            data = write_dataset(
                "s3://data/chaos", args.images, seed=0, size=64, storage_options=server.options()
            )
            print(f"{args.images} shapes JPEGs of 64x64 in SeaweedFS", flush=True)
            ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
            every = args.every or 10**12
            with FaultProxy(
                server.ports[3], every, repeat=args.repeat, only=r" /data/chaos/images/| /out[/?]"
            ) as proxy:
                options = server.options() | {"endpoint_url": proxy.endpoint}
                if not args.client_retries:
                    options["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
                config = SegmentConfig(
                    manifest=data.manifest,
                    output="s3://out/chaos",
                    weights=str(SHAPES_MODEL),
                    score_threshold=0.3,
                    shard_size=50,
                    batch_size=8,
                    actors=(2, 2),
                    cpus_per_actor=1,
                    connect_timeout=1,
                    read_timeout=args.read_timeout,
                    storage_options=options,
                )
                start = time.time()
                summary = run_segment(config)
                wall = time.time() - start
                faults = proxy.counts()
            table = open_results(config.output, server.options()).to_table(columns=["image_id", "status"])
            expected = [i for ids, _ in iter_manifest(data.manifest, server.options()) for i in ids]
        finally:
            ray.shutdown()
    ids = table.column("image_id").to_pylist()
    statuses = Counter(table.column("status").to_pylist())
    targets = [entry.split(" ", 1)[1] for entry in faults["faulted"]]  # "METHOD target" of each fault
    started = Counter("image reads" if "/images/" in t else f"output {t.split(' ')[0]}s" for t in targets)
    images_broken = len({t for t in targets if "/images/" in t})
    print(
        f"images {args.images} | wall {wall:.0f} s | {args.images / wall:.1f} img/s | "
        f"rows ok {statuses['ok']} error {statuses['error']} | status {summary['status']}\n"
        f"requests {faults['requests']} | faults made: "
        + ", ".join(f"{kind} {faults.get(kind, 0)}" for kind in KINDS)
        + f" | faults started: {dict(started)}, on {images_broken} distinct images\n"
        f"storage retries (batchseg, in shards) {summary['storage_retries']} | shard retries {summary['retries']} "
        f"| shards failed {len(summary['shards_failed'])}\n"
        f"exactly once: {sorted(ids) == sorted(expected) and len(ids) == len(set(ids))} "
        f"({len(ids)} rows, {len(set(ids))} distinct ids, {len(expected)} in the manifest)"
    )


if __name__ == "__main__":
    main()
