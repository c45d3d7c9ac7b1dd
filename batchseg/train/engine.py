"""The training recipe in plain PyTorch (as in torchvision's references): knows nothing of Ray. On many
workers it speaks ``torch.distributed`` (losses averaged, validation shared), whoever started it."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from batchseg.analysis.evaluate import coco_metrics
from batchseg.format.coco import coco_result
from batchseg.inference.predictor import Predictor
from batchseg.train.config import ADAMW_BETAS
from batchseg.train.data import CocoInstances, Target

StepCallback = Callable[[int, dict[str, float]], None]


def make_optimizer(
    model: torch.nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = ADAMW_BETAS,
) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or AdamW with ``betas``, the decay rates of its gradient moving averages: a
    second of 0.99 averages over about 100 steps instead of 1000, which suits runs of a few thousand."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def lr_factor(done: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate's fraction of its peak after ``done`` of ``total`` (steps, or images seen): linear
    warmup from 1/1000 over the first ``warmup``, then cosine to zero, or steps of x0.1 at 70% and 90%."""
    if done < warmup:
        return 0.001 + 0.999 * done / warmup
    if schedule == "cosine":
        progress = (done - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 0.1 ** sum(done >= m for m in (0.7 * total, 0.9 * total))


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    total: int,
    warmup: int,
    schedule: str,
    done_after: Callable[[int], int] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` of the step count, or of ``done_after(step)`` (e.g. images seen after that many
    steps: a schedule in images is the same whatever the number of workers). The scheduler's state is the
    step count; ``done_after`` is the caller's to restore."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(done_after(step) if done_after else step, total, warmup, schedule)
    )


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks: ``(0, 1)`` unless ``torch.distributed`` is set up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_losses(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each loss averaged over the ranks (torchvision's ``reduce_dict``; the losses themselves on one), as
    numbers: every rank sees the same values, so a non-finite loss on one stops all of them together."""
    names = sorted(losses)  # the same order on every rank
    values = torch.stack([losses[name].detach().float() for name in names])
    _, world = rank_and_world()
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return dict(zip(names, values.tolist(), strict=True))


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[tuple[list[torch.Tensor], list[Target]]],
    device: torch.device,
    *,
    step: int,
    max_steps: int,
    grad_clip: float | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_step: StepCallback | None = None,
) -> int:
    """One pass over ``batches``, stopping at ``max_steps``; returns the new global step. An iterator of
    batches is left where it stopped (no batch taken past ``max_steps``): the next call goes on from there.

    Raises ``FloatingPointError`` on a non-finite loss (averaged over the ranks when ``torch.distributed``
    is set up: every rank raises it at the same step, with the same message): training stops loudly
    instead of going on with weights that are already ruined. ``on_step`` is given the averaged losses.
    """
    model.train()
    for images, targets in itertools.islice(batches, max(0, max_steps - step)):
        images = [on_device(image, device) for image in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = model(images, targets)
        loss = sum(losses.values())
        assert isinstance(loss, torch.Tensor)
        reduced = reduce_losses(losses)
        total = sum(reduced.values())
        if not math.isfinite(total):
            parts = ", ".join(f"{k}={v:.4g}" for k, v in reduced.items())
            raise FloatingPointError(
                f"loss is {total} at step {step} ({parts}); stopping. Lower --lr or check the annotations"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        step += 1
        if on_step is not None:
            on_step(step, reduced | {"loss": total, "lr": optimizer.param_groups[0]["lr"]})
    return step


def on_device(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An image on ``device`` as the models take it: float in [0, 1]. A uint8 image (as the loader hands
    them over: a quarter of the bytes to copy) is made float there."""
    image = image.to(device, non_blocking=True)
    return image if image.is_floating_point() else image.float().div_(255)


@torch.inference_mode()
def predict_coco(
    model: torch.nn.Module,
    dataset: CocoInstances,
    batch_size: int = 4,
    mask_threshold: float = 0.5,
    precision: str = "fp32",
    image_ids: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Detections on every image of ``dataset``'s annotations (or those of ``image_ids``), with or without
    instances, in COCO results format (RLE masks), for COCOeval. The model is run as ``batchseg segment``
    runs it (its own thresholds and resize, masks pasted by :func:`batchseg.inference.paste.paste_to_rle`),
    in batches of the readable images in order; an image that cannot be read has no detections. Each result
    carries the id of the image it was predicted on. ``precision`` is as ``segment``'s ``--precision``."""
    predictor = Predictor(model, dataset.categories, mask_threshold=mask_threshold, precision=precision)
    results: list[dict[str, Any]] = []

    def predict(batch: list[tuple[int, np.ndarray]]) -> None:
        for (image_id, pixels), instances in zip(batch, predictor([p for _, p in batch]), strict=True):
            height, width = pixels.shape[:2]
            results.extend(coco_result(instance, image_id, height, width) for instance in instances)

    batch: list[tuple[int, np.ndarray]] = []
    for image_id in dataset.coco.getImgIds() if image_ids is None else image_ids:
        pixels = dataset.pixels(image_id)
        if pixels is not None:
            batch.append((image_id, pixels))
        if len(batch) == batch_size:
            predict(batch)
            batch = []
    if batch:
        predict(batch)
    return results


def evaluate_model(
    model: torch.nn.Module, dataset: CocoInstances, batch_size: int = 4, precision: str = "fp32"
) -> dict[str, dict[str, float]]:
    """COCO box (and mask) AP of ``model`` on every image of ``dataset``'s annotations (pycocotools), run
    at ``precision`` (:func:`predict_coco`).

    With ``torch.distributed`` set up, every rank must call it: each predicts every world-th image, rank 0
    gathers the detections, puts them in the images' order (one process's) and evaluates once; the other
    ranks get ``{}``."""
    rank, world = rank_and_world()
    ids = dataset.coco.getImgIds()
    results = predict_coco(model, dataset, batch_size, precision=precision, image_ids=ids[rank::world])
    if world > 1:
        shares: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(results, shares, dst=0)
        if shares is None:
            return {}
        order = {image_id: i for i, image_id in enumerate(ids)}
        # a stable sort: an image's detections keep their order, which COCOeval's ties depend on
        results = sorted((r for share in shares for r in share), key=lambda r: order[r["image_id"]])
    return coco_metrics(dataset.coco, results)
