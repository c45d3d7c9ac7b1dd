"""Training data: COCO polygons and RLE decoded by pycocotools, bad annotations and images counted."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch

from batchseg.errors import BatchsegError
from batchseg.inference.models import build_model, resolve_weights
from batchseg.train.data import CocoInstances, boxes_of
from batchseg.train.engine import make_scheduler, train_one_epoch
from batchseg.train.synth import write_dataset


def edit(path: str, change) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(pathlib.Path(path).read_text())
    change(data)
    pathlib.Path(path).write_text(json.dumps(data))


def test_targets_match_the_annotations(tmp_path: pathlib.Path) -> None:
    data = write_dataset(str(tmp_path), 4, seed=0, size=64)
    dataset = CocoInstances(data.images, data.annotations)
    assert dataset.categories == ("__background__", "circle", "square", "triangle")
    for index, image_id in enumerate(dataset.ids):
        image, target = dataset[index]
        anns = dataset.coco.imgToAnns[image_id]
        assert image.dtype == torch.float32 and image.shape[0] == 3 and image.min() >= 0 and image.max() <= 1
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        assert target["masks"].sum(dim=(1, 2)).tolist() == [a["area"] for a in anns]
        x, y, w, h = (torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)).unbind(1)
        torch.testing.assert_close(target["boxes"], torch.stack([x, y, x + w, y + h], dim=1))


def test_polygons_bad_annotations_and_empty_images(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_dataset(str(tmp_path), 4, seed=0, size=64)

    def change(coco: dict) -> None:  # type: ignore[type-arg]
        first = coco["annotations"][0]
        x, y, w, h = first["bbox"]
        first["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]  # a polygon instead of RLE
        coco["annotations"].append(
            {
                "id": 900,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 0, 5],
                "segmentation": [[0, 0, 1, 1, 0, 1]],
                "area": 0,
                "iscrowd": 0,
            }
        )
        coco["annotations"].append(
            {
                "id": 901,
                "image_id": 1,
                "category_id": 77,
                "bbox": [0, 0, 5, 5],
                "segmentation": [[0, 0, 5, 0, 5, 5]],
                "area": 12,
                "iscrowd": 0,
            }
        )
        coco["images"].append({"id": 50, "file_name": "nothing-here.jpg", "width": 10, "height": 10})

    edit(data.annotations, change)
    dataset = CocoInstances(data.images, data.annotations)
    assert sum(dataset.stats.dropped.values()) == 2 and dataset.stats.images_without_instances == 1
    err = capsys.readouterr().err
    assert "batchseg: warning: " in err
    assert (
        f"2 of {dataset.stats.annotations} annotations dropped (1 with a box of no size, NaN or outside the "
        "image, 1 of a category id not in 'categories'); 1 images without instances left out of training"
    ) in err
    assert len(dataset) == 4
    _, target = dataset[dataset.ids.index(1)]
    assert target["masks"][0].sum() > 0  # the polygon was rasterised


def test_a_corrupt_image_is_skipped_and_counted(tmp_path: pathlib.Path) -> None:
    data = write_dataset(str(tmp_path), 3, seed=0, size=64)
    pathlib.Path(data.uris[0]).write_bytes(b"not a jpeg")
    dataset = CocoInstances(data.images, data.annotations)
    image, _ = dataset[0]  # the next readable image stands in
    assert dataset.corrupt == 1
    assert torch.equal(image, dataset[1][0])
    for uri in data.uris:
        pathlib.Path(uri).write_bytes(b"")
    with pytest.raises(BatchsegError, match="none of the 3 images"):
        dataset[0]


def test_missing_or_foreign_annotations_fail_with_one_message(tmp_path: pathlib.Path) -> None:
    with pytest.raises(BatchsegError, match="annotations not found"):
        CocoInstances(str(tmp_path), str(tmp_path / "none.json"))
    (tmp_path / "a.json").write_text('{"hello": 1}')
    with pytest.raises(BatchsegError, match="is not a COCO instances JSON"):
        CocoInstances(str(tmp_path), str(tmp_path / "a.json"))


def test_boxes_of_masks_are_tight_and_exclusive() -> None:
    masks = torch.zeros((1, 10, 10), dtype=torch.uint8)
    masks[0, 2:5, 3:9] = 1
    assert boxes_of(masks).tolist() == [[3.0, 2.0, 9.0, 5.0]]


def test_schedules() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = make_scheduler(optimizer, total=100, warmup=10, schedule="cosine")
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        cosine.step()
    assert lrs[0] == pytest.approx(0.001) and lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5)
    assert lrs[99] < 0.001
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    step = make_scheduler(optimizer, total=100, warmup=0, schedule="step")
    factors = [step.lr_lambdas[0](i) for i in (0, 69, 70, 89, 90)]
    assert factors == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])


def test_a_non_finite_loss_stops_training_loudly(tmp_path: pathlib.Path) -> None:
    data = write_dataset(str(tmp_path), 2, seed=0, size=64)
    dataset = CocoInstances(data.images, data.annotations)
    model = build_model(resolve_weights("none", "maskrcnn_small")).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e30)
    scheduler = make_scheduler(optimizer, 10, 0, "cosine")
    images, targets = zip(*[dataset[i] for i in range(2)], strict=True)
    batches = [(list(images), list(targets))] * 5
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step [1-4].*Lower --lr"):
        train_one_epoch(model, optimizer, scheduler, batches, torch.device("cpu"), step=0, max_steps=5)


def test_train_min_sizes_and_max_size_reach_the_model_and_the_segment_resize(tmp_path: pathlib.Path) -> None:
    """`batchseg train --min-sizes 96,112 --max-size 160` trains at those sizes, and a checkpoint made so
    makes `segment` resize to its last training size unless told otherwise."""
    from batchseg.inference.predictor import Predictor
    from batchseg.train.trainer import TrainConfig, train_model

    categories = ("__background__", "circle", "square", "triangle")
    weights = resolve_weights("none", "maskrcnn_small")
    config = TrainConfig(
        images="x", annotations="y", output="z", iterations=1, min_sizes=(96, 112), max_size=160
    )
    model: Any = train_model(weights, categories, config)
    assert (model.transform.min_size, model.transform.max_size) == ((96, 112), 160)
    default: Any = train_model(
        weights, categories, TrainConfig(images="x", annotations="y", output="z", iterations=1)
    )
    assert (default.transform.min_size, default.transform.max_size) == ((112, 144, 128), 256)

    checkpoint = tmp_path / "model.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "model_name": "maskrcnn_small",
            "categories": list(categories),
            "min_size": 112,
            "max_size": 160,
        },
        checkpoint,
    )
    info = resolve_weights(str(checkpoint))
    predictor: Any = Predictor.from_weights(info)
    assert (predictor.model.transform.min_size, predictor.model.transform.max_size) == ((112,), 160)
    told: Any = Predictor.from_weights(info, min_size=200, max_size=300)
    assert (told.model.transform.min_size, told.model.transform.max_size) == ((200,), 300)


def test_model_pt_from_a_checkpoint_made_before_the_resize_was_recorded() -> None:
    """Rerunning a finished run whose last checkpoint predates min_size/max_size writes model.pt without
    them (segment then uses the model's own resize), instead of failing with a KeyError."""
    from batchseg.train.trainer import deployable

    old = {
        "model": {},
        "model_name": "maskrcnn_small",
        "categories": ["__background__", "a"],
        "step": 4,
        "config": {},
        "optimizer": {},
        "scheduler": {},
    }
    assert deployable(old) == {k: old[k] for k in ("model", "model_name", "categories", "step", "config")}
    assert deployable(old | {"min_size": 96, "max_size": 128})["min_size"] == 96
