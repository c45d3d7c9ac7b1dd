"""Training fed from storage, and ``batchseg train`` against a bare PyTorch loop: images/s beside the goals.

Storage: the same short run (``batchseg train`` on local Ray: maskrcnn_small, 1 worker, batch 4, 64 px
shapes images, no option set) with its images in local files, on SeaweedFS (started on 127.0.0.1 as the
tests do) read directly, and on SeaweedFS behind a proxy that holds every request back by 100 ms
(``tests/latency.py``, as a distant object store's round trip would). Goal: through the proxy, at least
0.90 of the rate from local files.
Framework: the same run from local files at one training size (``--min-sizes 128``: a scale drawn per
batch would make the work differ between runs) against a bare PyTorch loop in a fresh process, without
Ray, as torchvision's detection reference trains: a ``DataLoader`` over ``CocoInstances``
(``--loader-workers`` worker processes, flipped at random, the images in the worker's order) with its
``collate``, the model that ``batchseg train`` builds (``train_model``), the same optimizer, schedule,
gradient clipping, batch and torch threads (one, as a worker with the default --cpus-per-worker has).
Goal: at least 0.95 of the bare loop's rate. Beside them, the worker's own loop (its
``TrainingLoader`` stream and ``train_one_epoch``) without Ray, in a fresh process too: what Ray costs.
Rates are steady: a run is ``--windows`` checkpoint windows of ``--every`` steps, and the rate is the
images of the last two windows over their seconds in the step loop (as the trainer reports
``images_per_second_per_worker`` for each window: start-up, the first reads and checkpoints left out); the
bare loop is timed over the same windows. Runs interleave, ``--repeats`` times; medians are compared.
Usage: python bench/train_feed.py [--repeats 3] [--parts storage,framework] [--images 120] [--every 15]
       [--windows 3] [--delay-ms 100]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: the S3 server and proxy

from batchseg import log
from batchseg.inference.models import resolve_weights
from batchseg.segment.driver import init_ray
from batchseg.train.config import TrainConfig
from batchseg.train.data import CocoInstances, collate
from batchseg.train.engine import make_optimizer, make_scheduler, on_device, train_one_epoch
from batchseg.train.examples import open_training_set
from batchseg.train.loader import TrainingLoader
from batchseg.train.sampling import EpochOrder, Progress, positions
from batchseg.train.synth import SynthDataset, write_dataset
from batchseg.train.trainer import run_training, train_model, worker_batches
from tests.latency import LatencyProxy
from tests.s3server import running_s3

STORAGE_GOAL, FRAMEWORK_GOAL = 0.90, 0.95
LOCAL, DIRECT = "batchseg train, local files", "batchseg train, S3 direct"
TRAIN = "batchseg train, local files, at 128 px"
ENGINE, BARE = "its worker's loop, without Ray, at 128 px", "bare PyTorch loop (reference), at 128 px"


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


def in_fresh_process(loop: Callable[..., float], *args: Any) -> float:
    """``loop(*args)``, a rate, run in a fresh process as a script of it would run: no Ray in it."""
    context = multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    process = context.Process(target=_put, args=(results, loop, *args))
    process.start()
    rate = results.get()
    process.join()
    return float(rate)


def _put(results: Any, loop: Callable[..., float], *args: Any) -> None:
    torch.set_num_threads(1)  # what a Ray Train worker of 1 CPU runs with
    results.put(loop(*args))


def recipe(config: TrainConfig, categories: tuple[str, ...]) -> tuple[Any, Any, Any]:
    """The model, optimizer and schedule a ``batchseg train`` worker builds, drawn from ``--seed`` as its are."""
    torch.manual_seed(config.seed)
    model = train_model(resolve_weights("none", config.model), categories, config).train()
    optimizer = make_optimizer(model, config.optimizer, config.learning_rate, config.weight_decay)
    total = config.iterations or 0
    return model, optimizer, make_scheduler(optimizer, total, min(100, total // 10), config.schedule)


def reference_loop(data: SynthDataset, config: TrainConfig, loader_workers: int) -> float:
    """torchvision's reference ``train_one_epoch``: a ``DataLoader`` of ``loader_workers`` processes over
    ``CocoInstances`` (flipped at random), then forward, finite check, backward, clip, step. Its sampler
    gives the images in the order a batchseg worker trains on them, so both do the same work."""
    dataset = CocoInstances(data.images, data.annotations, flip=True)
    model, optimizer, scheduler = recipe(config, dataset.categories)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=worker_order(len(dataset), config),
        num_workers=loader_workers, collate_fn=collate, persistent_workers=True,
    )  # fmt: skip
    device = torch.device("cpu")
    total, every = config.iterations or 0, config.checkpoint_every or 1
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
    return combined(rates[-2:])


def worker_order(size: int, config: TrainConfig) -> list[int]:
    """The indices of a data set of one chunk that a lone batchseg worker trains on, epoch after epoch."""
    rows: list[int] = []
    for epoch in itertools.count():
        order = EpochOrder((size,), config.seed, epoch)
        rows += [order[p % size][1] for p in positions(Progress.start(size).share(0, 1, config.batch_size))]
        if len(rows) >= (config.iterations or 0) * config.batch_size:
            return rows
    raise AssertionError("unreachable")


def engine_loop(data: SynthDataset, config: TrainConfig) -> float:
    """What a ``batchseg train`` worker runs, without Ray: its stream of batches (``TrainingLoader``) and
    ``train_one_epoch`` for each checkpoint window, with a step callback as the worker's."""
    training_set = open_training_set(data.images, data.annotations)
    model, optimizer, scheduler = recipe(config, training_set.categories)
    device = torch.device("cpu")
    total, every = config.iterations or 0, config.checkpoint_every or 1
    start = Progress.start(sum(training_set.chunk_sizes))
    loader = TrainingLoader.from_config(config, device)
    batches = worker_batches(training_set, loader, config, start, total * config.batch_size, 0, 1)
    rates: list[float] = []
    step = 0
    while step < total:
        start = time.perf_counter()
        step = train_one_epoch(
            model, optimizer, scheduler, batches, device, step=step, max_steps=step + every,
            grad_clip=config.grad_clip, on_step=lambda step, metrics: None,
        )  # fmt: skip
        rates.append(every * config.batch_size / (time.perf_counter() - start))
    return combined(rates[-2:])


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
    parser.add_argument("--parts", default="storage,framework", help="which comparisons to run")
    args = parser.parse_args()
    parts = args.parts.split(",")
    delayed = f"batchseg train, S3 +{args.delay_ms} ms"
    init_ray(None)
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, running_s3(pathlib.Path(tmp), ("images",)) as server:
        local = write_dataset(f"{tmp}/shapes", args.images, seed=0, size=64)
        remote = write_dataset(
            "s3://images/shapes", args.images, seed=0, size=64, storage_options=server.options()
        )
        print(f"{args.images} shape images of 64 px in local files and in SeaweedFS", flush=True)

        numbers = itertools.count()

        def run(data: SynthDataset, **options: Any) -> TrainConfig:
            return TrainConfig(
                images=data.images,
                annotations=data.annotations,
                output=f"{tmp}/runs/{next(numbers)}",
                iterations=args.every * args.windows,
                checkpoint_every=args.every,
                batch_size=args.batch_size,
                **options,
            )

        for _ in range(args.repeats):
            measured = {}
            if "framework" in parts:
                fixed = {"min_sizes": (128,)}  # not a scale drawn per batch: the same work in all three
                measured[TRAIN] = batchseg_rate(run(local, **fixed))
                measured[ENGINE] = in_fresh_process(engine_loop, local, run(local, **fixed))
                measured[BARE] = in_fresh_process(
                    reference_loop, local, run(local, **fixed), args.loader_workers
                )
            if "storage" in parts:
                measured[LOCAL] = batchseg_rate(run(local))
                measured[DIRECT] = batchseg_rate(run(remote, storage_options=server.options()))
                with LatencyProxy(server.ports[3], args.delay_ms / 1000) as proxy:
                    options = server.options() | {"endpoint_url": proxy.endpoint}
                    measured[delayed] = batchseg_rate(run(remote, storage_options=options))
            for name, rate in measured.items():
                rates.setdefault(name, []).append(rate)
                print(f"{name:>34}: {rate:6.2f} img/s", flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"maskrcnn_small, 1 worker x 1 CPU, batch {args.batch_size}, 64 px; steady images/s per worker over "
        f"the last 2 of {args.windows} windows of {args.every} steps (medians of {args.repeats}; each run:"
        f" {'; '.join(f'{name}: ' + ', '.join(f'{v:.2f}' for v in values) for name, values in rates.items())})"
    )
    for name, rate in median.items():
        print(f"  {name:>34}: {rate:6.2f} img/s")
    if "storage" in parts:
        print(
            f"storage: +{args.delay_ms} ms per request against local files: "
            f"{median[delayed] / median[LOCAL]:.2f} (goal: at least {STORAGE_GOAL}); against S3 direct: "
            f"{median[delayed] / median[DIRECT]:.2f}"
        )
    if "framework" in parts:
        print(
            f"framework: batchseg train against the bare PyTorch loop: {median[TRAIN] / median[BARE]:.2f} "
            f"(goal: at least {FRAMEWORK_GOAL}); its loop without Ray: {median[ENGINE] / median[BARE]:.2f}"
        )


if __name__ == "__main__":
    main()
