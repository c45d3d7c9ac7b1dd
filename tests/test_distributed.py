"""The training engine on many ranks, without Ray: two local processes joined by torch.distributed (gloo)
average their losses, so a non-finite loss on one stops both at the same step with the same message, and
share validation: each predicts its own images, rank 0 evaluates them all once."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from batchseg.demo import SHAPES_MODEL
from batchseg.train.data import CocoInstances
from batchseg.train.engine import evaluate_model
from batchseg.train.synth import SynthDataset, write_dataset
from tests.ranks import NAN_STEP, WORLD, checkpoint_model, two_ranks


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> SynthDataset:
    return write_dataset(str(tmp_path_factory.mktemp("shapes")), 5, seed=5)


@pytest.fixture(scope="module")
def reports(shapes: SynthDataset, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("ranks")
    init = f"file://{folder / 'rendezvous'}"
    torch.multiprocessing.spawn(
        two_ranks,
        args=(init, str(SHAPES_MODEL), shapes.images, shapes.annotations, str(folder)),
        nprocs=WORLD,
        join=True,
    )
    return [json.loads((folder / f"{rank}.json").read_text()) for rank in range(WORLD)]


def test_every_rank_stops_at_the_same_step_with_the_same_message(reports: list[dict[str, Any]]) -> None:
    first, second = reports
    assert first["error"] == second["error"]
    assert first["error"].startswith(f"loss is nan at step {NAN_STEP} (loss_other=nan, loss_rank=")
    assert len(first["steps"]) == len(second["steps"]) == NAN_STEP  # rank 0's own loss was finite
    # what each rank logs is the mean over the ranks: (1 + 2) / 2 and 1, on both
    assert first["steps"] == second["steps"]
    assert first["steps"][0]["loss_rank"] == 1.5 and first["steps"][0]["loss"] == 2.5


def test_validation_is_shared_by_the_ranks_and_equals_one_process(
    reports: list[dict[str, Any]], shapes: SynthDataset
) -> None:
    first, second = reports
    assert (first["predicted"], second["predicted"]) == ([1, 3, 5], [2, 4])  # every other image
    assert second["metrics"] == {}  # rank 0 evaluates, once
    alone = evaluate_model(
        checkpoint_model(str(SHAPES_MODEL)), CocoInstances(shapes.images, shapes.annotations)
    )
    assert alone["segm"]["AP50"] > 0.5  # a model that finds the shapes: a comparison that can fail
    for kind in ("bbox", "segm"):
        assert first["metrics"][kind] == pytest.approx(alone[kind], abs=1e-9), kind
