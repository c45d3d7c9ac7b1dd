"""The GPU tier (``pytest -m gpu`` where CUDA is; deselected elsewhere): the shipped model's rows on a GPU
against the CPU's on the same images, and its bf16 boxes against fp32's."""

from __future__ import annotations

import pathlib

import pytest
import torch

from batchseg.demo import HELD_OUT_SEED, SHAPES_MODEL
from batchseg.inference.models import resolve_weights
from batchseg.inference.precision import resolve_precision
from batchseg.inference.predictor import Predictor
from batchseg.io.manifest import iter_shards
from batchseg.segment.job import SegmentConfig, prepare_job
from batchseg.segment.processor import ShardProcessor
from batchseg.train.synth import write_dataset
from tests.agreement import agreement, scaled_shapes

pytestmark = pytest.mark.gpu


def test_auto_precision_is_bf16_where_the_gpu_has_it_natively() -> None:
    native = torch.cuda.get_device_capability() >= (8, 0)  # Ampere on
    assert resolve_precision("auto", "cuda") == ("bf16" if native else "fp16")


def test_gpu_rows_match_cpu_rows_on_the_same_images(tmp_path: pathlib.Path) -> None:
    """The shard processor with segment's defaults on each device: on the GPU, auto precision (bf16 on
    Ampere on), JPEGs decoded in batches by nvJPEG, masks to run lengths on the device; on the CPU, fp32 and
    PIL. The same instances, boxes within 2 px on average, masks overlapping."""
    data = write_dataset(str(tmp_path / "data"), 32, seed=HELD_OUT_SEED, size=128)
    config = SegmentConfig(
        manifest=data.manifest, output=str(tmp_path / "out"), weights=str(SHAPES_MODEL), batch_size=8
    )
    with prepare_job(config) as job:
        (shard,) = iter_shards(job.plan)
    rows = {device: ShardProcessor.for_job(job, device).rows(shard) for device in ("cpu", "cuda")}
    assert [r["status"] for r in rows["cuda"]] == [r["status"] for r in rows["cpu"]] == ["ok"] * len(shard)
    assert [(r["width"], r["height"]) for r in rows["cuda"]] == [
        (r["width"], r["height"]) for r in rows["cpu"]
    ]
    found = agreement(
        [r["instances"] for r in rows["cpu"]],
        [r["instances"] for r in rows["cuda"]],
        [(r["height"], r["width"]) for r in rows["cpu"]],
    )
    assert found.instances >= len(shard) and found.pairs >= 0.9 * found.instances, found.line()
    assert found.box_px <= 2.0, found.line()
    assert found.mask_iou is not None and found.mask_iou >= 0.6, found.line()


def test_fp32_on_the_gpu_gives_the_cpus_boxes_and_masks() -> None:
    """The same pixels, fp32 on both (the GPU's convolutions in TF32, torch's default for cuDNN)."""
    images = scaled_shapes(4, seed=1, side=256)
    weights = resolve_weights(str(SHAPES_MODEL))
    cpu, gpu = (Predictor.from_weights(weights, device=d, precision="fp32") for d in ("cpu", "cuda"))
    found = agreement(cpu(images), gpu(images), [i.shape[:2] for i in images])
    assert found.instances >= len(images) and found.pairs >= 0.9 * found.instances, found.line()
    assert found.box_px <= 1.0, found.line()
    assert found.mask_iou is not None and found.mask_iou >= 0.8, found.line()


def test_bf16_boxes_are_fp32_boxes_on_the_gpu() -> None:
    """The issue's measure, on the GPU: images of about 1000 px at --min-size 1024; bf16 boxes within 2 px
    of fp32's on average and not on bf16's grid (a multiple of 4 px from 512 on)."""
    images = scaled_shapes(8, seed=0, side=1000)
    weights = resolve_weights(str(SHAPES_MODEL))
    options = {"min_size": 1024, "max_size": 2048, "device": "cuda"}
    fp32, bf16 = (Predictor.from_weights(weights, precision=p, **options) for p in ("fp32", "bf16"))
    detections = bf16.detect(images)
    assert [out["boxes"].dtype for out, _, _ in detections] == [torch.float32] * len(images)
    found = agreement(fp32(images), bf16.describe(detections), [i.shape[:2] for i in images])
    assert found.instances >= len(images) and found.pairs >= 0.9 * found.instances, found.line()
    assert found.box_px <= 2.0 and found.on_grid < 0.5, found.line()
