"""What each of two local torch.distributed (gloo) ranks does in tests/test_distributed.py: a module of its
own, so that the processes it spawns import the training engine only (not Ray, which batchseg.demo brings)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import torch
import torch.distributed as dist

from batchseg.inference.models import build_model, load_state_dict, resolve_weights
from batchseg.train.data import CocoInstances
from batchseg.train.engine import evaluate_model, make_optimizer, make_scheduler, train_one_epoch

WORLD = 2
NAN_STEP = 1  # the step at which rank 1 (only) computes a NaN loss


class RankLosses(torch.nn.Module):
    """Stands in for a detection model in training: a loss that differs per rank, and on rank 1 a NaN at
    :data:`NAN_STEP`."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        broken = self.rank == 1 and self.calls == NAN_STEP
        self.calls += 1
        return {
            "loss_rank": self.weight * (self.rank + 1),
            "loss_other": self.weight * (float("nan") if broken else 1.0),
        }


def two_ranks(rank: int, init: str, weights: str, images: str, annotations: str, reports: str) -> None:
    """One rank's run (``torch.multiprocessing.spawn`` gives the rank): three steps of :class:`RankLosses`,
    then validation of the checkpoint ``weights``; what it saw goes to ``reports/<rank>.json``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        report: dict[str, Any] = {"steps": []}
        model = RankLosses(rank)
        optimizer = make_optimizer(model, "adamw", 1e-3, 0.0)
        try:
            train_one_epoch(
                model,
                optimizer,
                make_scheduler(optimizer, 3, 0, "cosine"),
                [([torch.zeros(1)], [{}])] * 3,
                torch.device("cpu"),
                step=0,
                max_steps=3,
                on_step=lambda step, metrics: report["steps"].append(metrics),
            )
        except FloatingPointError as e:
            report["error"] = str(e)
        data = CocoInstances(images, annotations)
        read = data.pixels
        report["predicted"] = []

        def pixels(image_id: int) -> Any:
            report["predicted"].append(image_id)
            return read(image_id)

        data.pixels = pixels  # type: ignore[method-assign]
        report["metrics"] = evaluate_model(checkpoint_model(weights), data)
        pathlib.Path(reports, f"{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def checkpoint_model(weights: str) -> torch.nn.Module:
    """The checkpoint's model at the resize it was trained for, as ``segment`` builds it."""
    info = resolve_weights(weights)
    return build_model(info, load_state_dict(info), min_size=info.min_size, max_size=info.max_size)
