"""Training speed on one GPU: images/s for maskrcnn_resnet50_fpn (v1) and v2 at COCO sizes with AMP, beside
the published anchors, and whether batchseg's loader keeps the GPU busy.

Images: generated shapes JPEGs of 480 to 800 px a side (``batchseg.train.synth`` at ``--size 640``, 1 to 4
instances each, masks as RLE), which the model resizes as it trains on COCO (shorter side drawn from
640..800, longer at most 1333); random weights, since nothing can be downloaded on the lent machine.
Per model, over ``--steps`` steps after ``--warm-up``:
- fed: what one ``batchseg train`` worker runs, without Ray and DDP: ``train_one_epoch`` over the worker's
  stream of batches (``TrainingLoader`` with the default options: JPEG files read ahead, decoded and masks
  built in threads, pinned, copied ``non_blocking``), the model that ``train_model`` builds, AdamW;
- resident: the same steps on batches already on the device (the model alone); fed / resident near 1
  means the loader keeps the GPU busy.
Then the loader alone (no model): how fast it can feed one GPU from these files.
Anchors: NVIDIA's DeepLearningExamples PyTorch Mask R-CNN, 209 img/s on 8 A100 with AMP (about 26 per
GPU); Detectron2's R50-FPN Mask R-CNN, 62 img/s on 8 V100 (about 7.8 per GPU). Both start from an
ImageNet backbone with frozen BatchNorm; these runs train every layer from scratch.
Usage: python bench/train_gpu.py [--images 64] [--steps 30] [--warm-up 5] [--batch-size 4]
       [--precision auto] [--models maskrcnn_resnet50_fpn,maskrcnn_resnet50_fpn_v2] [--device cuda]
(``--device cpu --size 96 --min-sizes 96 --images 8 --steps 2 --warm-up 1`` checks it on a CPU in a minute.)
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from typing import Any

import torch

from batchseg.inference.models import resolve_weights
from batchseg.inference.precision import autocast_dtype
from batchseg.train.config import TrainConfig
from batchseg.train.engine import make_optimizer, make_scheduler, train_one_epoch
from batchseg.train.examples import open_training_set
from batchseg.train.loader import Batch, TrainingLoader
from batchseg.train.sampling import Progress
from batchseg.train.synth import write_dataset
from batchseg.train.trainer import train_model, worker_batches

ANCHORS = (
    ("NVIDIA DeepLearningExamples, AMP, per A100", 209 / 8),
    ("Detectron2 R50-FPN, per V100", 62 / 8),
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(run: Any, device: torch.device, images: int) -> float:
    """Images per second of ``run()``, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return images / (time.perf_counter() - start)


def bench_model(name: str, config: TrainConfig, device: torch.device, args: argparse.Namespace) -> None:
    data = open_training_set(config.images, config.annotations)
    loader = TrainingLoader.from_config(config, device)
    model = train_model(resolve_weights("none", name), data.categories, config).to(device)
    optimizer = make_optimizer(model, config.optimizer, config.learning_rate, config.weight_decay)
    total = 2 * (args.warm_up + args.steps)
    scheduler = make_scheduler(optimizer, total, 0, config.schedule)
    amp_dtype = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    images = args.steps * config.batch_size
    step = 0

    def train(batches: Any, steps: int) -> None:
        nonlocal step
        step = train_one_epoch(
            model, optimizer, scheduler, batches, device, step=step, max_steps=step + steps,
            grad_clip=config.grad_clip, amp_dtype=amp_dtype, scaler=scaler,
        )  # fmt: skip

    stream = steps_of(data, loader, config, 0, args.warm_up + args.steps)
    train(stream, args.warm_up)
    fed = timed_steps(lambda: train(stream, args.steps), device, images)
    resident = [_on_device(batch, device) for batch in steps_of(data, loader, config, 1, args.steps)]
    train(resident[: args.warm_up], args.warm_up)
    alone = timed_steps(lambda: train(resident, args.steps), device, images)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    print(
        f"{name}: fed {fed:6.1f} img/s, resident {alone:6.1f} img/s, fed/resident {fed / alone:.2f} "
        f"({amp_dtype or 'fp32'}, batch {config.batch_size}, {memory:.1f} GiB peak)",
        flush=True,
    )
    for anchor, rate in ANCHORS:
        print(f"  {fed / rate:5.2f}x {anchor} ({rate:.1f} img/s)")


def _on_device(batch: Batch, device: torch.device) -> Batch:
    """A batch as the loader hands it over (uint8 images), already on ``device``."""
    images, targets = batch
    return [image.to(device) for image in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def steps_of(data: Any, loader: TrainingLoader, config: TrainConfig, epoch: int, steps: int) -> Any:
    """A lone worker's stream of batches from the start of ``epoch``, ``steps`` batches of images long."""
    examples = sum(data.chunk_sizes)
    start = Progress.start(examples, epoch=epoch)
    return worker_batches(data, loader, config, start, epoch * examples + steps * config.batch_size, 0, 1)


def loader_rate(config: TrainConfig, device: torch.device, batches: int) -> float:
    """Images per second the loader alone hands over (reads, decodes, masks, pinning), nothing training."""
    data = open_training_set(config.images, config.annotations)
    loader = TrainingLoader.from_config(config, device)
    stream = steps_of(data, loader, config, 0, batches + 2)
    list(itertools.islice(stream, 2))  # the first reads
    start = time.perf_counter()
    count = sum(len(images) for images, _ in stream)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="generated training images")
    parser.add_argument("--size", type=int, default=640, help="generated images are 3/4 to 5/4 of it a side")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model and way")
    parser.add_argument("--warm-up", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4, help="images per step (per GPU)")
    parser.add_argument(
        "--precision", default="auto", help="batchseg train's --precision (auto: bf16 on an H100)"
    )
    parser.add_argument("--models", default="maskrcnn_resnet50_fpn,maskrcnn_resnet50_fpn_v2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-sizes", help="the model's resize in training, e.g. 96 (default: COCO's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(f"{tmp}/shapes", args.images, seed=0, size=args.size)
        print(
            f"{args.images} shapes JPEGs of {args.size * 3 // 4} to {args.size * 5 // 4} px a side",
            flush=True,
        )
        for name in args.models.split(","):
            config = TrainConfig(
                images=data.images,
                annotations=data.annotations,
                output=f"{tmp}/run",
                model=name,
                batch_size=args.batch_size,
                precision=args.precision,
                min_sizes=tuple(int(v) for v in args.min_sizes.split(",")) if args.min_sizes else None,
                max_size=2 * int(args.min_sizes.split(",")[-1]) if args.min_sizes else None,
                lr=1e-4,  # random weights at AdamW's 1e-3 may reach a non-finite loss; the speed is the same
            )
            bench_model(name, config, device, args)
        rate = loader_rate(config, device, 2 * args.steps)
        print(f"the loader alone (default options, {config.loader_workers} threads): {rate:.1f} img/s")


if __name__ == "__main__":
    main()
