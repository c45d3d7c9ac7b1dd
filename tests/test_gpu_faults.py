"""Failures and streams on a real GPU (``pytest -m gpu``; deselected where CUDA is absent): an image too large
for the device's memory is its own row and the process goes on, a sticky CUDA error ends its actor and a
fresh one does the shard, and the nvJPEG decode never writes memory the model's stream still uses. The same
logic with injected failures runs on the CPU in tests/test_processor.py and tests/test_segment.py."""

from __future__ import annotations

import io
import pathlib
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from batchseg.inference.models import resolve_weights
from batchseg.io.images import EncodedJpeg, decode_image
from batchseg.io.manifest import Shard
from batchseg.segment.config import SegmentConfig
from batchseg.segment.processor import ShardProcessor
from batchseg.train.synth import draw_shapes
from tests.test_segment import SMALL_MODEL, one_bad_gpu_costs_no_row

pytestmark = pytest.mark.gpu


def gpu_processor(tmp_path: pathlib.Path, **changes: Any) -> ShardProcessor:
    config = SegmentConfig(manifest="", output=str(tmp_path / "out"), **(SMALL_MODEL | changes))
    return ShardProcessor(config, resolve_weights(config.weights, config.model), device="cuda")


def shard_of(count: int) -> Shard:
    return Shard(0, [f"id{i}" for i in range(count)], [f"mem://image{i}" for i in range(count)])


def test_an_image_too_large_for_the_gpus_memory_is_its_own_row_and_the_process_goes_on(
    tmp_path: pathlib.Path,
) -> None:
    """With the process held to 1 GiB of the GPU, a 10,000 x 10,000 image (1.2 GB as the model's floats)
    cannot fit, alone or in its batch; its neighbours can."""
    shards = gpu_processor(tmp_path, batch_size=4)
    rng = np.random.default_rng(0)
    small = [draw_shapes(rng, 96).pixels for _ in range(5)]
    huge = np.full((10_000, 10_000, 3), 128, dtype=np.uint8)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(2**30 / total)
    try:
        rows = shards.rows(shard_of(6), [small[0], small[1], huge, small[2], small[3], small[4]])
        assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok", "ok", "ok"]
        assert rows[2]["error"].startswith("out_of_memory: the model ran out of memory on this image: ")
        assert "CUDA out of memory" in rows[2]["error"]
        assert (rows[2]["width"], rows[2]["height"]) == (10_000, 10_000)
        again = shards.rows(shard_of(3), small[:3])  # the same process, its memory given back
        assert [r["status"] for r in again] == ["ok"] * 3
        assert torch.cuda.memory_allocated() < 2**28
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_a_sticky_cuda_error_ends_its_actor_and_a_fresh_one_does_the_shard(
    ray_address: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first actor's model triggers a real device-side assert (its CUDA context is broken for good):
    its shard is never recorded, the actor ends, and a fresh process on the same GPU does the work."""

    def broken(images: Any) -> Any:
        index = torch.tensor([1_000_000], device="cuda")
        return torch.zeros(1, device="cuda")[index].sum().item()  # a device-side assert

    one_bad_gpu_costs_no_row(tmp_path, monkeypatch, broken, 8, actors=(1, 1), gpus_per_actor=1.0)


def jpeg(seed: int, width: int = 1920, height: int = 1080) -> bytes:
    """A baseline JPEG (nvJPEG's hardware path) of smooth colours, where nvJPEG and libjpeg agree closely."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([x / width * 255, y / height * 255, np.full_like(x, 40.0 * (seed % 6))], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_the_gpu_decode_never_writes_memory_the_models_stream_still_uses(tmp_path: pathlib.Path) -> None:
    """pytorch/vision#9606's pattern, 50 times: tensors of the decoded images' sizes are filled, a long
    sleep is queued on the model's stream, then reads and writes of those tensors, which are freed while
    that work still waits; then a batch decode. The queued reads must see their own values, and the
    decoded images must be PIL's (nvJPEG rounds a little otherwise)."""
    shards = gpu_processor(tmp_path, decode="device")
    data = [jpeg(seed) for seed in range(8)]
    expected = [decode_image(d) for d in data]
    for _ in range(50):
        filled = [torch.full((3, 1080, 1920), 7, dtype=torch.uint8, device="cuda") for _ in data]
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)
        sums = [t.sum(dtype=torch.int64) for t in filled]
        for t in filled:
            t.add_(1)
        del filled, t  # freed while the work above still waits behind the sleep
        rows: list[Any] = [None] * len(data)
        decoded = shards._decode_on_device(
            shard_of(len(data)), [(i, EncodedJpeg(d, 1)) for i, d in enumerate(data)], rows
        )
        torch.cuda.synchronize()
        assert [int(s) for s in sums] == [7 * 3 * 1080 * 1920] * len(data)
        assert rows == [None] * len(data)
        for (_, image), want in zip(decoded, expected, strict=True):
            got = image.permute(1, 2, 0).cpu().numpy().astype(np.int16)
            difference = np.abs(got - want.astype(np.int16))
            assert difference.mean() < 1.5 and (difference > 16).mean() < 1e-3
