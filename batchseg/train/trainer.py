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
from batchseg.inference.models import (
    BackboneTraining,
    WeightsInfo,
    build_model,
    load_state_dict,
    resolve_weights,
)
from batchseg.inference.precision import autocast_dtype, keep_boxes_float32
from batchseg.inference.registry import model_spec
from batchseg.io import storage
from batchseg.io.manifest import absolute_uri
from batchseg.log import redact, to_stderr, unless_configured
from batchseg.options import check
from batchseg.train.config import TrainConfig, public_config, worker_range
from batchseg.train.data import CocoInstances
from batchseg.train.engine import evaluate_model, make_optimizer, make_scheduler, train_one_epoch
from batchseg.train.examples import (
    CocoTrainingSet,
    Example,
    TrainingSet,
    check_images_for,
    check_readable,
    open_training_set,
)
from batchseg.train.loader import Batch, TrainingLoader
from batchseg.train.parquet import check_selection, select_training_set
from batchseg.train.sampling import EpochOrder, Progress, examples_at, positions

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
CHECKPOINT_PREFIX = "checkpoint_step-"
PATH_FIELDS = (
    "images",
    "annotations",
    "from_results",
    "output",
    "validation_images",
    "validation_annotations",
)


def training_sizes(model: str, config: TrainConfig) -> dict[str, Any]:
    """The model's resize in training: ``--min-sizes`` (one drawn per batch; the last is used in evaluation)
    and ``--max-size``, or the model's own training scales."""
    spec = model_spec(model)
    return {"min_size": config.min_sizes or spec.train_sizes, "max_size": config.max_size or spec.max_size}


def backbone_training(weights: WeightsInfo, config: TrainConfig) -> BackboneTraining:
    """How the run's backbone trains: frozen BatchNorm and ``--trainable-backbone-layers`` from pretrained
    weights, ``--sync-batchnorm`` from scratch (the checkpoints and ``model.pt`` record it)."""
    return BackboneTraining.for_weights(weights, config.trainable_backbone_layers, config.sync_batchnorm)


def train_model(weights: WeightsInfo, categories: tuple[str, ...], config: TrainConfig) -> torch.nn.Module:
    """The model to train: built for ``categories``; pretrained weights loaded into a backbone frozen as
    torchvision fine-tunes (:func:`backbone_training`), then the class-specific heads replaced when the
    class count differs (fine-tuning). ``--rois-per-image`` sets how many proposals per image the box and
    mask heads learn from (a quarter at most positive: the mask head's share); it changes training only,
    not the weights' shapes nor inference. Its boxes, their regression targets and losses stay float32
    under autocast (:func:`~batchseg.inference.precision.keep_boxes_float32`)."""
    sizes = training_sizes(weights.model, config)
    if config.rois_per_image is not None:
        sizes["box_batch_size_per_image"] = config.rois_per_image
    state = load_state_dict(weights, config.storage_options)
    model = build_model(weights, state, backbone=backbone_training(weights, config), **sizes)
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
    assert config.annotations, "run_training sets it to the training set it wrote from --from-results"
    # the driver checked it and reported what it drops (check_training_data): one warning, not one a worker
    data = open_training_set(config.images, config.annotations, config.storage_options, report=False)
    loader = TrainingLoader.from_config(config, device)
    model = train_model(weights, data.categories, config)
    model = ray.train.torch.prepare_model(model)
    bare: torch.nn.Module = getattr(model, "module", model)  # the model inside DDP
    examples = sum(data.chunk_sizes)  # at least one: open_training_set refuses a set without any
    progress = Progress.start(examples)
    planned = worker_range(config.workers)[1]  # what --iterations counts steps of; a resume keeps its own
    resumed_from = 0
    trained_seconds = 0.0  # time in train_one_epoch, all runs together: validation and start-up left out
    backbone = backbone_training(weights, config)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            saved = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        progress, planned = _progress(saved, examples, config.batch_size)
        resumed_from = progress.step
        trained_seconds = saved.get("train_seconds", 0.0)
    # The run's length and its schedule are counted in images seen, not steps: the same on any number of
    # workers, so a run that loses or gains workers trains as long, with the same learning rates.
    per_step = config.batch_size * planned
    total = config.epochs * examples if config.epochs else (config.iterations or 1) * per_step
    warmup_steps = config.warmup_iterations
    warmup = per_step * (warmup_steps if warmup_steps is not None else min(100, total // per_step // 10))
    optimizer = make_optimizer(
        model, config.optimizer, config.learning_rate, config.weight_decay, config.betas
    )
    at = {"stretch": progress}  # where the current stretch of steps began: what maps its steps to images

    def images_after(step: int) -> int:
        start = at["stretch"]
        return start.images_after(step - start.step, world, config.batch_size)

    scheduler = make_scheduler(optimizer, total, warmup, config.schedule, images_after)
    amp_dtype = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    if checkpoint:
        restore_training_state(saved, backbone, bare, optimizer, scheduler, scaler)
        if rank == 0:
            log.info(
                f"resumed from the checkpoint at step {progress.step} ({progress.images_seen} images seen) "
                f"on {world} worker(s)"
            )
    validation = _validation(config)
    transform: Any = bare.transform  # what evaluation (and then segment) resizes to
    resize = {"min_size": int(transform.min_size[-1]), "max_size": int(transform.max_size)}
    window = {"start": time.time(), "images": 0}

    def on_step(step: int, metrics: dict[str, float]) -> None:
        window["images"] += config.batch_size
        images = images_after(step)
        if rank == 0 and (step % 10 == 0 or images >= total):
            rate = window["images"] / (time.time() - window["start"])
            log.info(
                f"step {step}, {images}/{total} images, loss {metrics['loss']:.3f} lr {metrics['lr']:.2e} "
                f"{rate:.1f} images/s per worker"
            )

    every = config.checkpoint_every
    batches = worker_batches(data, loader, config, progress, total, rank, world)
    while progress.images_seen < total:
        # to the end of the epoch, of the run or to the next --checkpoint-every step, whichever is first
        steps = progress.steps_to(total, world, config.batch_size)
        if every:
            steps = min(steps, every - progress.step % every)
        at["stretch"] = progress
        window = {"start": time.time(), "images": 0}
        step = train_one_epoch(
            model,
            optimizer,
            scheduler,
            batches,
            device,
            step=progress.step,
            max_steps=progress.step + steps,
            grad_clip=config.grad_clip,
            amp_dtype=amp_dtype,
            scaler=scaler,
            on_step=on_step,
        )
        elapsed = time.time() - window["start"]
        trained_seconds += elapsed
        if step == progress.step:
            raise BatchsegError(f"no batch to train on at step {step}")  # never loop without progress
        epoch = progress.epoch
        progress = progress.advance(step - progress.step, world, config.batch_size)
        due = step % every == 0 if every else progress.epoch > epoch
        if due or progress.images_seen >= total:
            metrics: dict[str, Any] = {
                "step": step,
                "resumed_from": resumed_from,
                "train_seconds": trained_seconds,
                "images_per_second_per_worker": window["images"] / max(1e-9, elapsed),
                "images_seen": progress.images_seen,
                "epoch": progress.epoch,
                "workers": world,
                "lr": optimizer.param_groups[0]["lr"],
            }
            with tempfile.TemporaryDirectory() as folder:
                if validation is not None:  # every rank predicts its share; rank 0 has the metrics
                    metrics |= _validate(bare, validation, config.precision)
                if rank == 0:
                    torch.save(
                        {
                            **training_state(backbone, bare, optimizer, scheduler, scaler),
                            "model_name": weights.model,
                            "categories": list(data.categories),
                            **resize,
                            "step": step,
                            "progress": progress.state(),
                            "planned_workers": planned,
                            "train_seconds": trained_seconds,
                            "config": public_config(config),
                        },
                        os.path.join(folder, CHECKPOINT_FILE),
                    )
                    made = ray.train.Checkpoint.from_directory(folder)
                    ray.train.report(metrics, checkpoint=made, checkpoint_dir_name=checkpoint_name(step))
                else:
                    ray.train.report(metrics, checkpoint_dir_name=checkpoint_name(step))


def _progress(saved: dict[str, Any], examples: int, batch_size: int) -> tuple[Progress, int]:
    """A checkpoint's progress and the worker count its run's --iterations counts steps of. One made before
    batchseg recorded them trained on the fixed --workers its config records."""
    if "progress" in saved:
        return Progress.restore(examples, saved["progress"]), int(saved["planned_workers"])
    workers = int(saved["config"]["workers"])
    return Progress.after_steps(examples, saved["step"], workers, batch_size), workers


def checkpoint_name(step: int) -> str:
    """A checkpoint's folder in the run folder, named by batchseg (not Ray's timestamp) so that batchseg
    knows which folders are its own to clean up (:func:`remove_unregistered_checkpoints`)."""
    return f"{CHECKPOINT_PREFIX}{step:09d}"


def training_state(
    backbone: BackboneTraining,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """What a checkpoint keeps to go on training: the weights, how the backbone trains
    (:meth:`~batchseg.inference.models.BackboneTraining.record`), the optimizer, the schedule and, under
    fp16, the ``GradScaler``'s scale and growth count (without them a resume starts again from 65536 and
    skips steps to find its scale)."""
    state = {
        "model": model.state_dict(),
        "backbone": backbone.record(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    return state | ({"scaler": scaler.state_dict()} if scaler is not None else {})


def restore_training_state(
    saved: dict[str, Any],
    backbone: BackboneTraining,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Load a checkpoint's :func:`training_state` into this run's; a checkpoint whose backbone trained
    otherwise (other ``--weights``, ``--trainable-backbone-layers`` or ``--sync-batchnorm``) is refused:
    its optimizer holds other parameters. A checkpoint without a scaler (fp32, bf16) leaves it as it is."""
    record = backbone.record()
    previous = saved.get("backbone", record)  # a checkpoint made before batchseg recorded it: as this run
    if previous != record:
        changed = ", ".join(
            f"{key} {previous.get(key)} (this run: {value})"
            for key, value in record.items()
            if previous.get(key) != value
        )
        raise BatchsegError(
            f"the checkpoint at step {saved['step']} trained its backbone with {changed}: resume with the "
            "same --weights, --trainable-backbone-layers and --sync-batchnorm, or give another --output"
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and "scaler" in saved:
        scaler.load_state_dict(saved["scaler"])


def worker_batches(
    data: TrainingSet,
    loader: TrainingLoader,
    config: TrainConfig,
    progress: Progress,
    total: int,
    rank: int,
    world: int,
) -> Iterator[Batch]:
    """This worker's batches for the rest of the run: its share of what remains of this epoch
    (:mod:`~batchseg.train.sampling`; on resume, the positions already trained on, by any number of workers,
    are not read again), then its shares of the epochs after, until ``total`` images are seen. One stream
    for the whole run: the next checkpoint window's and the next epoch's images are read while this one
    trains, and none read ahead is dropped at a checkpoint. (A rank's share after a few steps is what was
    left of its share before them: :meth:`Progress.advance` keeps each rank's part.)"""
    batch = config.batch_size

    def examples() -> Iterator[tuple[int, Example]]:
        current = progress
        while current.images_seen < total:
            steps = current.steps_to(total, world, batch)
            order = EpochOrder(data.chunk_sizes, config.seed, current.epoch)
            mine = itertools.islice(positions(current.share(rank, world, batch)), steps * batch)
            yield from ((current.epoch, example) for example in examples_at(data, order, mine))
            current = current.advance(steps, world, batch)

    return loader.batches(examples(), batch)


def _validation(config: TrainConfig) -> CocoInstances | None:
    if not (config.validation_images and config.validation_annotations):
        return None
    return CocoInstances(
        config.validation_images, config.validation_annotations, storage_options=config.storage_options
    )


def _validate(model: torch.nn.Module, dataset: CocoInstances, precision: str) -> dict[str, float]:
    """COCO AP over the ranks (each predicts a share, rank 0 evaluates: others get {}), at the run's
    ``--precision`` resolved on the model's device as ``segment`` resolves its own."""
    metrics = evaluate_model(model, dataset, precision=precision)
    model.train()
    return {f"{kind}_{name}": value for kind, values in metrics.items() for name, value in values.items()}


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) with Ray Train; write ``<output>/model.pt`` (weights, model name, categories,
    config: what ``batchseg segment --weights`` takes) and return the final metrics."""
    unless_configured()  # long work shows its progress, in a notebook too
    from batchseg.segment.driver import check_ray_address, ray_session

    # Ray Train's print patch would send each progress line twice (log and stream); plain prints suffice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train workers do not share the driver's working directory: local paths must be absolute.
    paths: dict[str, Any] = {k: absolute_uri(v) for k in PATH_FIELDS if (v := getattr(config, k))}
    config = replace(config, **paths)
    check_inputs(config)
    check_ray_address(config.address)
    weights = resolve_weights(config.weights, config.model, config.storage_options)
    output = config.output.rstrip("/")
    selected: dict[str, Any] = {}
    if config.from_results:  # the workers read the selection written once into the run folder, as Parquet
        data, selected = select_training_set(
            config.from_results, config.where, output, config.storage_options
        )
        config = replace(config, annotations=data)
    check_training_data(config)
    fs, path = storage.filesystem(output, config.storage_options)
    with job_errors(f"cannot write to output {config.output}"):
        fs.makedirs(path, exist_ok=True)
    try:
        with ray_session(config.address):
            result = _fit(config, weights, fs, path)
    except KeyboardInterrupt:
        # Stopped (Ctrl-C, SIGTERM, SIGHUP) and Ray shut down: a checkpoint a worker wrote that Ray Train never
        # registered would stay for good; the registered ones are what the rerun resumes from.
        remove_unregistered_checkpoints(fs, path, registered_checkpoints(fs, path), "the run was stopped")
        raise
    if result.checkpoint is None:
        raise BatchsegError(f"training ended without a checkpoint: {result.error}")
    registered = {os.path.basename(c.path.rstrip("/")) for c, _ in result.best_checkpoints or []}
    remove_unregistered_checkpoints(fs, path, registered, "a worker was lost")
    with result.checkpoint.as_directory() as folder:
        saved = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    final = deployable(saved)
    with fs.open(storage.join(path, CHECKPOINT_FILE), "wb") as f:
        torch.save(final, f)
    metrics = dict(result.metrics or {}) | {"model": redact(storage.join(output, CHECKPOINT_FILE))}
    if selected:
        metrics["training_set"] = selected
    fs.pipe_file(storage.join(path, "metrics.json"), json.dumps(metrics, indent=2).encode())
    return metrics


def _fit(config: TrainConfig, weights: WeightsInfo, fs: Any, path: str) -> Any:
    """The Ray Train run (a ``TorchTrainer``) in the run folder ``path`` on ``fs``; its ``Result``."""
    import pyarrow.fs
    import ray.train
    from ray.train.torch import TorchTrainer

    name, parent = os.path.basename(path), os.path.dirname(path)
    cpus = config.cpus_per_worker or 1.0
    low, high = worker_range(config.workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config,
            "weights": weights,
            "environment": storage.forwarded_environment(),
        },
        scaling_config=ray.train.ScalingConfig(
            # a range is Ray Train's elastic training: started with what fits, restarted with more or fewer.
            # (mypy reads ray.train's v1 ScalingConfig; at run time it is V2's, which takes the range.)
            num_workers=low if low == high else (low, high),  # type: ignore[arg-type]
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
    workers = str(low) if low == high else f"{low} to {high}"
    log.info(
        f"training {weights.model} from {weights.identity} on {workers} worker(s); run folder {config.output}"
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise BatchsegError(f"training failed: {_root_cause(e)}") from e


def registered_checkpoints(fs: Any, run: str) -> set[str]:
    """The checkpoint folders that Ray Train's record in the run folder names (what a rerun resumes from);
    none when it has recorded none."""
    try:
        snapshot = json.loads(fs.cat_file(storage.join(run, "checkpoint_manager_snapshot.json")))
    except FileNotFoundError:
        return set()
    results = [*snapshot["checkpoint_results"], *snapshot.get("pending_training_results", [])]
    if snapshot.get("latest_checkpoint_result"):
        results.append(snapshot["latest_checkpoint_result"])
    return {r["checkpoint_dir_name"] for r in results}


def remove_unregistered_checkpoints(fs: Any, run: str, registered: set[str], why: str) -> None:
    """Delete the checkpoint folders batchseg named (:func:`checkpoint_name`) that Ray Train never
    registered (``registered``: the names of those it did): a worker lost, or a run stopped, while a
    checkpoint was being reported leaves its folder behind, and a rerun that never reaches that step again
    would keep it forever. Nothing else in the run folder is touched."""
    for entry in fs.ls(run, detail=True):
        name = os.path.basename(entry["name"].rstrip("/"))
        if entry["type"] == "directory" and name.startswith(CHECKPOINT_PREFIX) and name not in registered:
            log.info(f"removing {name}: a checkpoint that was never registered ({why})")
            fs.rm(entry["name"], recursive=True)


def deployable(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What ``model.pt`` keeps of a training checkpoint: weights, model name, categories, the resize used in
    evaluation, how the backbone trained, step and config (not the optimizer). A checkpoint made before
    batchseg recorded the resize has none, and ``segment`` then uses the model's own."""
    keys = ("model", "model_name", "categories", "min_size", "max_size", "backbone", "step", "config")
    return {k: checkpoint[k] for k in keys if k in checkpoint}


def _root_cause(error: BaseException) -> str:
    """The innermost error's last line, e.g. ``FloatingPointError: loss is nan at step 12 (...)``."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def check_training_data(config: TrainConfig) -> None:
    """That the training set has an image with an instance to learn from and an image that can be read,
    with what it drops reported in one warning: on the driver, before Ray Train starts. (A worker that found
    it would fail, and Ray Train would start it again, run after run.) Let go of when done: the driver does
    not hold the annotations while the workers train."""
    assert config.annotations
    data = open_training_set(config.images, config.annotations, config.storage_options)
    check_readable(data, config.images, config.annotations, config.storage_options)
    if config.validation_images and config.validation_annotations:  # its refusals too (an id given twice)
        CocoTrainingSet(config.validation_images, config.validation_annotations, config.storage_options)


def check_inputs(config: TrainConfig) -> None:
    """Every option (see ``config.py``), then that the inputs exist: all before anything is written."""
    check(config)
    for name in ("images", "annotations", "from_results", "validation_images", "validation_annotations"):
        uri = getattr(config, name)
        if uri:
            fs, path = storage.filesystem(uri, config.storage_options)
            if not fs.exists(path):
                raise BatchsegError(f"--{name.replace('_', '-')} {uri} does not exist")
    if config.annotations:
        check_images_for(config.images, config.annotations, config.storage_options)
    if config.from_results:  # before anything is written: a run folder made from another selection
        check_selection(config.from_results, config.where, config.output.rstrip("/"), config.storage_options)
