"""The predictor's instance fields for each model family, and image reads mapped to error kinds."""

from __future__ import annotations

import pathlib
from typing import Any

import fsspec
import numpy as np
import pycocotools.mask as coco_mask
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from batchseg.analysis.results import open_results
from batchseg.demo import SHAPES_MODEL
from batchseg.errors import ImageError
from batchseg.inference.models import resolve_weights
from batchseg.inference.paste import paste_to_rle
from batchseg.inference.precision import keep_boxes_float32, resolve_precision
from batchseg.inference.predictor import Predictor
from batchseg.io.reader import read_image_bytes
from batchseg.train.synth import draw_shapes
from tests.agreement import agreement, scaled_shapes

SMALL = {"min_size": 96, "max_size": 128, "score_threshold": 0.0, "max_instances": 5}


def images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [draw_shapes(rng, 96).pixels for _ in range(n)]


def test_boxes_only_model_has_no_masks_and_box_areas() -> None:
    predictor = Predictor.from_weights(resolve_weights("none", "fasterrcnn_resnet50_fpn_v2"), **SMALL)
    (instances,) = predictor(images(1))
    assert len(instances) == 5
    for instance in instances:
        x, y, w, h = instance["bbox"]
        assert instance["rle"] is None and instance["keypoints"] is None
        assert instance["area"] == round(w * h)
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0


def test_keypoint_model_gives_17_triplets() -> None:
    predictor = Predictor.from_weights(resolve_weights("none", "keypointrcnn_resnet50_fpn"), **SMALL)
    (instances,) = predictor(images(1))
    assert instances
    for instance in instances:
        assert instance["category"] in ("person", "__background__")
        assert len(instance["keypoints"]) == 51
        assert instance["rle"] is None


def test_batches_give_one_result_per_image_and_scores_descend() -> None:
    predictor = Predictor.from_weights(resolve_weights("none", "maskrcnn_resnet50_fpn"), **SMALL)
    assert predictor([]) == []
    results = predictor(images(3))
    assert len(results) == 3
    for instances in results:
        scores = [i["score"] for i in instances]
        assert scores == sorted(scores, reverse=True)


def test_a_batch_is_described_as_each_image_alone() -> None:
    """One copy per batch gives what the model's tensors say, image by image."""
    predictor = Predictor.from_weights(resolve_weights("none", "maskrcnn_resnet50_fpn"), **SMALL)
    detections = predictor.detect(images(3))
    described = predictor.describe(detections)
    for detection, instances in zip(detections, described, strict=True):
        assert predictor.describe([detection]) == [instances]
        out, height, width = detection
        assert [(i["rle"], i["area"]) for i in instances] == paste_to_rle(
            out["masks"], out["boxes"], height, width
        )
        for instance, (x1, y1, x2, y2), score, label in zip(
            instances, out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(), strict=True
        ):
            assert instance["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            assert (instance["score"], instance["category_id"]) == (score, label)


# (height, width): the long side capped at max_size leaves the short one under a pixel, or nothing to scale.
EXTREME_SIZES = [(1, 10000), (10000, 1), (3000, 4), (4, 3000), (1, 1)]


def stretched(height: int, width: int) -> np.ndarray:
    """A shapes image squeezed or stretched to ``height`` x ``width`` pixels."""
    pixels = draw_shapes(np.random.default_rng(height + width), 96).pixels
    return np.array(Image.fromarray(pixels).resize((width, height)))


def assert_inside(instances: list[dict[str, Any]], height: int, width: int) -> None:
    """Boxes lie in the image, and each mask decodes (pycocotools) to height x width with its area."""
    # Rows keep boxes in float32 (records.SCHEMA): y + h, added in float64, may pass the edge by a rounding
    # (0.2966068 + 0.7033932 on a 1-pixel-high image), never by more.
    slack = float(np.finfo(np.float32).eps) * max(height, width)
    for instance in instances:
        x, y, w, h = instance["bbox"]
        assert 0 <= x <= x + w <= width + slack and 0 <= y <= y + h <= height + slack, instance["bbox"]
        mask = coco_mask.decode({"size": [height, width], "counts": instance["rle"]})
        assert mask.shape == (height, width)
        assert int(mask.sum()) == instance["area"]


@pytest.fixture(scope="module")
def shapes_predictor() -> Predictor:
    """The shipped shapes model: its resize (144, capped at 256) squeezes a 4 x 3000 image under a pixel."""
    return Predictor.from_weights(resolve_weights(str(SHAPES_MODEL)), score_threshold=0.0)


@pytest.mark.parametrize(("height", "width"), EXTREME_SIZES)
def test_extreme_aspect_ratios_give_instances_in_the_image(
    shapes_predictor: Predictor, height: int, width: int
) -> None:
    (instances,) = shapes_predictor([stretched(height, width)])
    assert instances  # score threshold 0: the model always proposes something
    assert_inside(instances, height, width)


def test_extreme_aspect_ratios_are_ok_rows(tmp_path: pathlib.Path) -> None:
    """Through the shard processor (no Ray), in one batch with a normal image."""
    from batchseg.io.manifest import iter_shards
    from batchseg.segment.job import SegmentConfig, prepare_job
    from batchseg.segment.processor import ShardProcessor

    sizes = [*EXTREME_SIZES, (96, 96)]
    uris = []
    for height, width in sizes:
        uris.append(str(tmp_path / f"{height}x{width}.png"))
        Image.fromarray(stretched(height, width)).save(uris[-1])
    (tmp_path / "manifest.csv").write_text("uri\n" + "".join(f"{u}\n" for u in uris))
    config = SegmentConfig(
        manifest=str(tmp_path / "manifest.csv"),
        output=str(tmp_path / "out"),
        weights=str(SHAPES_MODEL),
        score_threshold=0.0,
        batch_size=len(sizes),
    )
    with prepare_job(config) as job:
        ShardProcessor.for_job(job).process(next(iter_shards(job.plan)))
    rows = open_results(config.output).to_table().to_pylist()
    assert [(r["status"], r["error"]) for r in rows] == [("ok", None)] * len(sizes)
    for row, (height, width) in zip(rows, sizes, strict=True):
        assert (row["height"], row["width"]) == (height, width)
        assert row["instances"]
        assert_inside(row["instances"], height, width)


def test_precision_auto_is_fp32_on_cpu_and_bf16_only_on_a_gpu_that_has_it_natively(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    # A V100 or a T4: torch emulates bf16 there (slower than fp32), and says so only when asked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", "cuda") == resolve_precision("auto", "cuda:1") == "fp16"
    assert resolve_precision("bf16", "cuda") == "bf16"  # asked for: emulated, but as asked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere on
    assert resolve_precision("auto", "cuda") == "bf16"


def test_bf16_boxes_are_decoded_and_resized_in_fp32() -> None:
    """Under bf16 autocast (the CPU's: the same policy as CUDA's, but without bf16 units here, slow) the
    shipped model's boxes are float32 numbers, within a fraction of a pixel of fp32's and not on bf16's grid,
    and its masks are pasted into them. Images of about 1000 pixels at the model's own resize (144): bf16
    boxes were 1.55 px from fp32's on 4 such images, every coordinate from 512 px on a multiple of 4
    (bench/precision.py measures --min-size 1024)."""
    images = scaled_shapes(2, seed=0, side=1000)
    weights = resolve_weights(str(SHAPES_MODEL))
    fp32, bf16 = (Predictor.from_weights(weights, precision=p) for p in ("fp32", "bf16"))
    detections = bf16.detect(images)
    assert [out["boxes"].dtype for out, _, _ in detections] == [torch.float32] * len(images)
    found = agreement(fp32(images), bf16.describe(detections), [i.shape[:2] for i in images])
    assert found.pairs == found.instances >= 4, found.line()
    assert found.box_px < 0.5 and found.on_grid < 0.5, found.line()
    assert found.mask_iou is not None and found.mask_iou > 0.95, found.line()
    heads = (bf16.model.rpn.head, bf16.model.roi_heads.box_predictor)
    hooks = [dict(head._forward_hooks) for head in heads]
    keep_boxes_float32(bf16.model)  # again, as each validation in training does: nothing changes
    assert [dict(head._forward_hooks) for head in heads] == hooks


class DeniedFileSystem(MemoryFileSystem):
    protocol = "denied"

    def cat_file(self, path, start=None, end=None, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(path)


def test_read_errors_become_image_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fsspec.register_implementation("denied", DeniedFileSystem, clobber=True)
    cases = {
        "denied://bucket/a.jpg": "permission_denied",
        str(tmp_path / "missing.jpg"): "not_found",
        str(tmp_path): "read_error",
    }
    for uri, kind in cases.items():
        with pytest.raises(ImageError) as info:
            read_image_bytes(uri)
        assert info.value.kind == kind, uri
        assert uri.split("://")[-1] in info.value.message
