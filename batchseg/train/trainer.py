"""Training on Ray Train: TorchTrainer with DDP over N workers; checkpoints to any fsspec URI; resume.

The recipe (data, model, optimizer, schedule, loop) is plain PyTorch in ``data.py``, ``models.py`` and
``engine.py``; this module only wires it into Ray Train: worker placement, DDP, checkpoint reporting
and restoring, and failure handling. Rerunning the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from batchseg.errors import BatchsegError, job_errors
from batchseg.inference.models import WeightsInfo, build_model, load_state_dict, resolve_weights
from batchseg.inference.precision import autocast_dtype, keep_boxes_float32
from batchseg.inference.registry import model_spec
from batchseg.io import storage
from batchseg.io.manifest import absolute_uri
from batchseg.log import to_stderr, unless_configured
from batchseg.options import check
from batchseg.train.config import TrainConfig, public_config
from batchseg.train.data import CocoInstances
from batchseg.train.engine import evaluate_model, make_optimizer, make_scheduler, train_one_epoch
from batchseg.train.examples import Example, TrainingSet, open_training_set
from batchseg.train.loader import Batch, TrainingLoader
from batchseg.train.sampling import EpochOrder, examples_at, share

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
PATH_FIELDS = ("images", "annotations", "output", "validation_images", "validation_annotations")


def training_sizes(model: str, config: TrainConfig) -> dict[str, Any]:
    """The model's resize in training: ``--min-sizes`` (one drawn per batch; the last is used in evaluation)
    and ``--max-size``, or the model's own training scales."""
    spec = model_spec(model)
    return {"min_size": config.min_sizes or spec.train_sizes, "max_size": config.max_size or spec.max_size}


def train_model(weights: WeightsInfo, categories: tuple[str, ...], config: TrainConfig) -> torch.nn.Module:
    """The model to train: built for ``categories``; pretrained weights loaded, then the class-specific
    heads replaced when the class count differs (fine-tuning). ``--rois-per-image`` sets how many proposals
    per image the box and mask heads learn from (a quarter at most positive: the mask head's share); it
    changes training only, not the weights' shapes nor inference. Its boxes, their regression targets and
    losses stay float32 under autocast (:func:`~batchseg.inference.precision.keep_boxes_float32`)."""
    sizes = training_sizes(weights.model, config)
    if config.rois_per_image is not None:
        sizes["box_batch_size_per_image"] = config.rois_per_image
    state = load_state_dict(weights, config.storage_options)
    model = build_model(weights, state, **sizes)
    if len(categories) != len(weights.categories):
        fresh: Any = build_model(WeightsInfo(weights.model, "none", "", "", categories), None, **sizes)
        heads: Any = model.roi_heads
        heads.box_predictor = fresh.roi_heads.box_predictor
        if heads.mask_predictor is not None:
            heads.mask_predictor = fresh.roi_heads.mask_predictor
    return keep_boxes_float32(model)


def train_loop_per_worker(setup: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the plain PyTorch loop, with checkpoints reported to Ray Train."""
    import ray.train
    import ray.train.torch

    to_stderr()  # progress and warnings reach the driver's terminal, which Ray copies this stderr to
    config: TrainConfig = setup["config"]
    weights: WeightsInfo = setup["weights"]
    storage.apply_environment(setup["environment"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.cpus_per_worker or 1)))
    torch.manual_seed(config.seed + rank)
    device = ray.train.torch.get_device()
    data = open_training_set(config.images, config.annotations, config.storage_options)
    loader = TrainingLoader.from_config(config, device)
    model = train_model(weights, data.categories, config)
    model = ray.train.torch.prepare_model(model)
    bare: torch.nn.Module = getattr(model, "module", model)  # the model inside DDP
    steps_per_epoch = len(share(sum(data.chunk_sizes), rank, world, config.batch_size)) // config.batch_size
    total = config.iterations or (config.epochs or 1) * steps_per_epoch
    every = config.checkpoint_every or steps_per_epoch
    optimizer = make_optimizer(
        model, config.optimizer, config.learning_rate, config.weight_decay, config.betas
    )
    warmup = config.warmup_iterations if config.warmup_iterations is not None else min(100, total // 10)
    scheduler = make_scheduler(optimizer, total, warmup, config.schedule)
    amp_dtype = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    step = resumed_from = 0
    trained_seconds = 0.0  # time in train_one_epoch, all runs together: validation and start-up left out
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            saved = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        bare.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step = resumed_from = saved["step"]
        trained_seconds = saved.get("train_seconds", 0.0)
        if rank == 0:
            log.info(f"resumed from the checkpoint at step {step}")
    validation = _validation(config)
    transform: Any = bare.transform  # what evaluation (and then segment) resizes to
    resize = {"min_size": int(transform.min_size[-1]), "max_size": int(transform.max_size)}
    window = {"start": time.time(), "images": 0}

    def on_step(step: int, metrics: dict[str, float]) -> None:
        window["images"] += config.batch_size
        if rank == 0 and (step % 10 == 0 or step == total):
            rate = window["images"] / (time.time() - window["start"])
            log.info(
                f"step {step}/{total} loss {metrics['loss']:.3f} lr {metrics['lr']:.2e} "
                f"{rate:.1f} images/s per worker"
            )

    epoch, skip = divmod(step, steps_per_epoch)
    batches = _epoch_batches(data, loader, config, epoch, rank, world, skip, total - step)
    while step < total:
        stop = min(total, (step // every + 1) * every)
        window = {"start": time.time(), "images": 0}
        step = train_one_epoch(
            model,
            optimizer,
            scheduler,
            batches,
            device,
            step=step,
            max_steps=stop,
            grad_clip=config.grad_clip,
            amp_dtype=amp_dtype,
            scaler=scaler,
            on_step=on_step,
        )
        elapsed = time.time() - window["start"]
        trained_seconds += elapsed
        if step % every == 0 or step == total:
            metrics: dict[str, Any] = {
                "step": step,
                "resumed_from": resumed_from,
                "train_seconds": trained_seconds,
                "images_per_second_per_worker": window["images"] / max(1e-9, elapsed),
            }
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    if validation is not None:
                        metrics |= _validate(bare, validation)
                    torch.save(
                        {
                            "model": bare.state_dict(),
                            "model_name": weights.model,
                            "categories": list(data.categories),
                            **resize,
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "step": step,
                            "train_seconds": trained_seconds,
                            "config": public_config(config),
                        },
                        os.path.join(folder, CHECKPOINT_FILE),
                    )
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
                else:
                    ray.train.report(metrics)


def _epoch_batches(
    data: TrainingSet,
    loader: TrainingLoader,
    config: TrainConfig,
    epoch: int,
    rank: int,
    world: int,
    skip_batches: int,
    steps: int,
) -> Iterator[Batch]:
    """This worker's next ``steps`` batches: its share of ``epoch`` (:mod:`~batchseg.train.sampling`) from
    batch ``skip_batches`` on (on resume, those already trained on are skipped without reading them), then
    its shares of the epochs after. One stream for the whole run: the next checkpoint window's and the
    next epoch's images are read while this one trains, and none read ahead is dropped at a checkpoint."""

    def examples() -> Iterator[tuple[int, Example]]:
        current, skip = epoch, skip_batches
        while True:
            order = EpochOrder(data.chunk_sizes, config.seed, current)
            mine = share(len(order), rank, world, config.batch_size)[skip * config.batch_size :]
            yield from ((current, example) for example in examples_at(data, order, mine))
            current, skip = current + 1, 0

    return loader.batches(itertools.islice(examples(), steps * config.batch_size), config.batch_size)


def _validation(config: TrainConfig) -> CocoInstances | None:
    if not (config.validation_images and config.validation_annotations):
        return None
    return CocoInstances(
        config.validation_images, config.validation_annotations, storage_options=config.storage_options
    )


def _validate(model: torch.nn.Module, dataset: CocoInstances) -> dict[str, float]:
    metrics = evaluate_model(model, dataset)
    model.train()
    return {f"{kind}_{name}": value for kind, values in metrics.items() for name, value in values.items()}


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) with Ray Train; write ``<output>/model.pt`` (weights, model name, categories,
    config: what ``batchseg segment --weights`` takes) and return the final metrics."""
    unless_configured()  # long work shows its progress, in a notebook too
    import pyarrow.fs
    import ray.train
    from ray.train.torch import TorchTrainer

    from batchseg.segment.driver import check_ray_address, init_ray

    # Ray Train's print patch would send each progress line twice (log and stream); plain prints suffice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train workers do not share the driver's working directory: local paths must be absolute.
    paths: dict[str, Any] = {k: absolute_uri(v) for k in PATH_FIELDS if (v := getattr(config, k))}
    config = replace(config, **paths)
    check_inputs(config)
    check_ray_address(config.address)
    weights = resolve_weights(config.weights, config.model, config.storage_options)
    output = config.output.rstrip("/")
    fs, path = storage.filesystem(output, config.storage_options)
    name, parent = os.path.basename(path), os.path.dirname(path)
    with job_errors(f"cannot write to output {config.output}"):
        fs.makedirs(path, exist_ok=True)
    init_ray(config.address)
    cpus = config.cpus_per_worker or 1.0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config,
            "weights": weights,
            "environment": storage.forwarded_environment(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": cpus,
                **({"GPU": config.gpus_per_worker} if config.gpus_per_worker else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        ),
    )
    log.info(
        f"training {weights.model} from {weights.identity} on {config.workers} worker(s); run folder {output}"
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise BatchsegError(f"training failed: {_root_cause(e)}") from e
    if result.checkpoint is None:
        raise BatchsegError(f"training ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as folder:
        saved = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    final = deployable(saved)
    with fs.open(storage.join(path, CHECKPOINT_FILE), "wb") as f:
        torch.save(final, f)
    metrics = dict(result.metrics or {}) | {"model": storage.join(output, CHECKPOINT_FILE)}
    fs.pipe_file(storage.join(path, "metrics.json"), json.dumps(metrics, indent=2).encode())
    return metrics


def deployable(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What ``model.pt`` keeps of a training checkpoint: weights, model name, categories, the resize used in
    evaluation, step and config (not the optimizer). A checkpoint made before batchseg recorded the resize
    has none, and ``segment`` then uses the model's own."""
    keys = ("model", "model_name", "categories", "min_size", "max_size", "step", "config")
    return {k: checkpoint[k] for k in keys if k in checkpoint}


def _root_cause(error: BaseException) -> str:
    """The innermost error's last line, e.g. ``FloatingPointError: loss is nan at step 12 (...)``."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def check_inputs(config: TrainConfig) -> None:
    """Every option (see ``config.py``), then that the inputs exist: all before anything is written."""
    check(config)
    for name in ("images", "annotations", "validation_images", "validation_annotations"):
        uri = getattr(config, name)
        if uri:
            fs, path = storage.filesystem(uri, config.storage_options)
            if not fs.exists(path):
                raise BatchsegError(f"--{name.replace('_', '-')} {uri} does not exist")
