"""Training fed from storage, and ``batchseg train`` against a bare PyTorch loop: images/s beside the goals.

Storage: the same short run (``batchseg train`` on local Ray: maskrcnn_small, 1 worker, batch 4, 64 px
shapes images, no option set) with its images in local files, on SeaweedFS (started on 127.0.0.1 as the
tests do) read directly, and on SeaweedFS behind a proxy that holds every request back by 100 ms
(``tests/latency.py``, as a distant object store's round trip would). Goal: through the proxy, at least
0.90 of the rate from local files.
Framework: the same run from local files against a bare PyTorch loop in this process, without Ray, as
torchvision's detection reference trains: a ``DataLoader`` over ``CocoInstances`` (``--loader-workers``
worker processes, shuffled, flipped) with its ``collate``, the model that ``batchseg train`` builds
(``train_model``), the same optimizer, schedule, gradient clipping, batch and torch threads (one, as a
worker with the default --cpus-per-worker has). Goal: at least 0.95 of the bare loop's rate.
Rates are steady: a run is ``--windows`` checkpoint windows of ``--every`` steps, and the rate is the
images of the last two windows over their seconds in the step loop (as the trainer reports
``images_per_second_per_worker`` for each window: start-up, the first reads and checkpoints left out); the
bare loop is timed over the same windows. Runs interleave, ``--repeats`` times; medians are compared.
Usage: python bench/train_feed.py [--images 120] [--every 15] [--windows 3] [--repeats 1] [--delay-ms 100]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: the S3 server and proxy

from batchseg import log
from batchseg.inference.models import resolve_weights
from batchseg.segment.driver import init_ray
from batchseg.train.config import TrainConfig
from batchseg.train.data import CocoInstances, collate
from batchseg.train.engine import make_optimizer, make_scheduler, on_device
from batchseg.train.synth import SynthDataset, write_dataset
from batchseg.train.trainer import run_training, train_model
from tests.latency import LatencyProxy
from tests.s3server import running_s3

STORAGE_GOAL, FRAMEWORK_GOAL = 0.90, 0.95


def combined(rates: list[float]) -> float:
    """The rate over windows of equal images: their images over their seconds."""
    return len(rates) / sum(1 / r for r in rates)


def batchseg_rate(config: TrainConfig) -> float:
    """``batchseg train``'s steady images/s per worker: the rates it reported with its last two
    checkpoints (the ones Ray Train keeps), both after the first window."""
    run_training(config)
    with open(os.path.join(config.output, "checkpoint_manager_snapshot.json")) as f:
        kept = [r["metrics"] for r in json.load(f)["checkpoint_results"]]
    assert len(kept) == 2 and kept[0]["step"] > (config.checkpoint_every or 0), kept
    return combined([m["images_per_second_per_worker"] for m in kept])


def bare_rate(data: SynthDataset, config: TrainConfig, loader_workers: int) -> float:
    """The same steps as a bare PyTorch loop (torchvision's reference ``train_one_epoch``), in a fresh
    process of its own as a script of it would run: no Ray in it, as there is none in the worker's."""
    context = multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    process = context.Process(target=_bare_loop, args=(results, data, config, loader_workers))
    process.start()
    rate = results.get()
    process.join()
    return float(rate)


def _bare_loop(results: Any, data: SynthDataset, config: TrainConfig, loader_workers: int) -> None:
    torch.set_num_threads(1)  # what a Ray Train worker of 1 CPU runs with
    torch.manual_seed(config.seed)
    dataset = CocoInstances(data.images, data.annotations, flip=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, num_workers=loader_workers,
        collate_fn=collate, persistent_workers=True,
    )  # fmt: skip
    model = train_model(resolve_weights("none", config.model), dataset.categories, config).train()
    optimizer = make_optimizer(model, config.optimizer, config.learning_rate, config.weight_decay)
    total = config.iterations or 0
    scheduler = make_scheduler(optimizer, total, min(100, total // 10), config.schedule)
    device = torch.device("cpu")
    every = config.checkpoint_every or total
    rates: list[float] = []
    step, start = 0, time.perf_counter()
    while step < total:
        for images, targets in loader:
            images = [on_device(image, device) for image in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            assert isinstance(loss, torch.Tensor) and torch.isfinite(loss), loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % every == 0:
                rates.append(every * config.batch_size / (time.perf_counter() - start))
                start = time.perf_counter()
            if step == total:
                break
    results.put(combined(rates[-2:]))


def main() -> None:
    log.to_stderr()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120, help="30 steps an epoch: runs cross one")
    parser.add_argument("--every", type=int, default=15, help="steps per checkpoint window")
    parser.add_argument(
        "--windows", type=int, default=3, help="checkpoint windows per run: 3 or more (the first is start-up)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--delay-ms", type=int, default=100, help="added delay per request through the proxy")
    parser.add_argument("--loader-workers", type=int, default=4, help="the bare loop's DataLoader processes")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind, interleaved")
    args = parser.parse_args()
    init_ray(None)
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, running_s3(pathlib.Path(tmp), ("images",)) as server:
        local = write_dataset(f"{tmp}/shapes", args.images, seed=0, size=64)
        remote = write_dataset(
            "s3://images/shapes", args.images, seed=0, size=64, storage_options=server.options()
        )
        print(f"{args.images} shape images of 64 px in local files and in SeaweedFS", flush=True)

        def run(name: str, data: SynthDataset, **options: Any) -> TrainConfig:
            return TrainConfig(
                images=data.images,
                annotations=data.annotations,
                output=f"{tmp}/runs/{name}-{len(rates.get(name, []))}",
                iterations=args.every * args.windows,
                checkpoint_every=args.every,
                batch_size=args.batch_size,
                **options,
            )

        for _ in range(args.repeats):
            measured = {"local files": batchseg_rate(run("local files", local))}
            measured["bare PyTorch loop"] = bare_rate(local, run("bare", local), args.loader_workers)
            measured["S3 direct"] = batchseg_rate(run("S3 direct", remote, storage_options=server.options()))
            with LatencyProxy(server.ports[3], args.delay_ms / 1000) as proxy:
                options = server.options() | {"endpoint_url": proxy.endpoint}
                measured[f"S3 +{args.delay_ms} ms"] = batchseg_rate(
                    run("S3 delayed", remote, storage_options=options)
                )
            for name, rate in measured.items():
                rates.setdefault(name, []).append(rate)
                print(f"{name:>18}: {rate:6.1f} img/s", flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    delayed = median[f"S3 +{args.delay_ms} ms"]
    print(
        f"maskrcnn_small, 1 worker x 1 CPU, batch {args.batch_size}, 64 px; steady images/s per worker over "
        f"the last 2 of {args.windows} windows of {args.every} steps (medians of {args.repeats})"
    )
    for name, rate in median.items():
        print(f"  {name:>18}: {rate:6.1f} img/s")
    print(
        f"storage: +{args.delay_ms} ms per request against local files: {delayed / median['local files']:.2f} "
        f"(goal: at least {STORAGE_GOAL}); against S3 direct: {delayed / median['S3 direct']:.2f}"
    )
    print(
        f"framework: batchseg train against the bare PyTorch loop: "
        f"{median['local files'] / median['bare PyTorch loop']:.2f} (goal: at least {FRAMEWORK_GOAL})"
    )


if __name__ == "__main__":
    main()
