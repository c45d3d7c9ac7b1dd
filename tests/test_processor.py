"""The shard processor's failures, without Ray or a GPU: which errors of the model become an image's row and
which fail the shard (nothing written), and the bounded queue between the model and mask encoding. The
real small model runs; a stand-in wraps its calls to raise torch's own exception classes and messages."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from batchseg.demo import SHAPES_MODEL
from batchseg.errors import DeviceError, ModelFailed
from batchseg.inference.models import resolve_weights
from batchseg.io.manifest import Shard
from batchseg.segment.config import SegmentConfig
from batchseg.segment.processor import ShardProcessor
from batchseg.train.synth import draw_shapes

SMALL: dict[str, Any] = {"weights": str(SHAPES_MODEL), "min_size": 96, "max_size": 128}
HUGE = 70  # the width of the image that the stand-in finds too large for the device's memory
OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
DEVICE_ERRORS = {
    "illegal_access": lambda: RuntimeError(
        "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously "
        "reported at some other API call, so the stacktrace below might be incorrect."
    ),
    "accelerator": lambda: torch.AcceleratorError("CUDA error: unspecified launch failure"),
    "cudnn": lambda: RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
    "device_assert": lambda: RuntimeError("CUDA error: device-side assert triggered"),
}


def pixels(count: int) -> list[np.ndarray]:
    """Shape images 96 pixels high, image ``i`` ``66 + i`` wide: the stand-ins know each by its width."""
    rng = np.random.default_rng(3)
    return [np.ascontiguousarray(draw_shapes(rng, 96).pixels[:96, : 66 + i]) for i in range(count)]


def shard_of(count: int) -> Shard:
    return Shard(0, [f"id{i}" for i in range(count)], [f"mem://image{i}.png" for i in range(count)])


def processor(tmp_path: pathlib.Path, **changes: Any) -> ShardProcessor:
    config = SegmentConfig(manifest="", output=str(tmp_path / "out"), **(SMALL | changes))
    return ShardProcessor(config, resolve_weights(config.weights, config.model))


def width(item: Any) -> int:
    """An image's width, for ``Predictor.detect``'s images (H x W x 3) and ``describe``'s detections."""
    return int(item[2]) if isinstance(item, tuple) else int(item.shape[1])


class Failing:
    """Stands in for a predictor method: raises ``error()`` on a call whose items include an image of a
    width in ``on`` (every call when ``on`` is None), else calls ``method``; records each call's widths, and
    whether the tensor of the last failed call was freed by the next call (it is held by the traceback
    until the processor leaves its ``except`` block)."""

    def __init__(
        self, method: Callable[[Any], Any], error: Callable[[], BaseException], on: Collection[int] | None
    ) -> None:
        self.method, self.error, self.on = method, error, on
        self.calls: list[list[int]] = []
        self.freed: list[bool] = []
        self.held: Callable[[], Any] | None = None

    def __call__(self, items: Sequence[Any]) -> Any:
        widths = [width(item) for item in items]
        self.calls.append(widths)
        if self.held is not None:
            self.freed.append(self.held() is None)
        if self.on is None or set(self.on) & set(widths):
            batch_tensor = torch.zeros(len(items), 3, 8, 8)  # what a failed batch's frames hold
            self.held = weakref.ref(batch_tensor)
            raise self.error()
        self.held = None
        return self.method(items)


def stand_in(
    shards: ShardProcessor, method: str, error: Callable[[], BaseException], on: Collection[int] | None
) -> Failing:
    """``shards``'s predictor with its ``method`` failing as :class:`Failing` says."""
    failing = Failing(getattr(shards.predictor, method), error, on)
    setattr(shards.predictor, method, failing)
    return failing


@cache
def expected(batch_size: int) -> list[dict[str, Any]]:
    """The rows of 6 images with nothing failing, in batches of ``batch_size`` (a batch pads its images to
    one size, which may move a score in its last digits)."""
    return processor(pathlib.Path("unused"), batch_size=batch_size).rows(shard_of(6), pixels(6))


def test_an_image_out_of_memory_is_retried_alone_and_is_its_own_row(tmp_path: pathlib.Path) -> None:
    """Its batch is retried one by one once the failed batch's tensors are freed; the image that still
    does not fit is an ``out_of_memory`` row, its neighbours are as without it."""
    shards = processor(tmp_path, batch_size=4)
    detect = stand_in(shards, "detect", lambda: torch.OutOfMemoryError(OUT_OF_MEMORY), on={HUGE})
    rows = shards.rows(shard_of(6), pixels(6))
    assert detect.calls == [[66, 67, 68, 69], [70, 71], [70], [71]]
    assert detect.freed == [True, True]  # the retries began after the except block
    huge = HUGE - 66
    assert rows[huge]["status"] == "error" and rows[huge]["error"].startswith("out_of_memory: ")
    assert OUT_OF_MEMORY in rows[huge]["error"]
    assert (rows[huge]["width"], rows[huge]["height"]) == (HUGE, len(pixels(6)[huge]))
    assert rows[:4] == expected(4)[:4]  # a batch of 4, then 71 alone
    assert rows[5] == expected(1)[5]


@pytest.mark.parametrize("error", DEVICE_ERRORS)
def test_a_device_error_fails_the_shard_and_writes_nothing(tmp_path: pathlib.Path, error: str) -> None:
    """No image is at fault: no row, no shard object, no record, and no retry image by image on a device
    that has failed."""
    paths = []
    for i, image in enumerate(pixels(3)):
        paths.append(str(tmp_path / f"image{i}.png"))
        Image.fromarray(image).save(paths[-1])
    shards = processor(tmp_path, batch_size=4)
    detect = stand_in(shards, "detect", DEVICE_ERRORS[error], on=None)
    with pytest.raises(DeviceError, match=r"the device failed: .*(CUDA error|cuDNN error)"):
        shards.process(Shard(0, ["a", "b", "c"], paths))
    assert detect.calls == [[66, 67, 68]]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


@pytest.mark.parametrize(
    ("batch_size", "images", "failing", "calls"),
    [(1, 4, None, 4), (4, 8, None, 5), (4, 8, {66, 67, 68}, 5), (2, 6, {67}, 5)],
    ids=["each_image", "a_batch_and_each_of_its_images", "most_of_a_batch", "one_image_alone"],
)
def test_a_model_failing_on_most_images_fails_the_shard(
    tmp_path: pathlib.Path, batch_size: int, images: int, failing: set[int] | None, calls: int
) -> None:
    """Most images failing in the model (at least 3) is the model's or the process's fault, not theirs:
    the shard is retried rather than recorded with those rows; a batch that mostly fails image by image
    too fails it at once. One failing image is its own row."""
    shards = processor(tmp_path, batch_size=batch_size)

    def error() -> BaseException:
        return RuntimeError("Expected all tensors to be on the same device")

    detect = stand_in(shards, "detect", error, on=failing)
    if failing != {67}:
        with pytest.raises(ModelFailed, match=r"the model failed on .*Expected all tensors"):
            shards.rows(shard_of(images), pixels(images))
    else:
        rows = shards.rows(shard_of(images), pixels(images))
        assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok", "ok", "ok"]
        assert rows[1]["error"].startswith("inference_error: the model failed on this image: RuntimeError")
    assert len(detect.calls) == calls


def test_a_shard_of_one_input_the_model_cannot_take_is_recorded_with_its_row(tmp_path: pathlib.Path) -> None:
    """Too few failures to blame the model: the shard is written, not failed on every attempt."""
    path = tmp_path / "image.png"
    Image.fromarray(pixels(1)[0]).save(path)
    shards = processor(tmp_path)
    stand_in(shards, "detect", lambda: ValueError("images of this shape are not supported"), on=None)
    record = shards.process(Shard(0, ["a"], [str(path)]))
    assert (record.rows, record.errors) == (1, {"inference_error": 1})


# One encoder thread: the stand-in's record of calls and frees is in the order they were made.
@pytest.mark.parametrize("threads", [0, 1], ids=["in_line", "encoder_thread"])
def test_out_of_memory_while_encoding_masks_is_retried_image_by_image(
    tmp_path: pathlib.Path, threads: int
) -> None:
    shards = processor(tmp_path, batch_size=4)
    shards.encoder = ThreadPoolExecutor(threads) if threads else None
    describe = stand_in(shards, "describe", lambda: torch.OutOfMemoryError(OUT_OF_MEMORY), on={HUGE})
    rows = shards.rows(shard_of(6), pixels(6))
    assert describe.calls == [[66, 67, 68, 69], [70, 71], [70], [71]]
    assert describe.freed == [True, True]
    huge = HUGE - 66
    assert rows[huge]["error"].startswith("out_of_memory: encoding its masks ran out of memory: ")
    assert rows[:huge] + rows[huge + 1 :] == expected(4)[:huge] + expected(4)[huge + 1 :]


@pytest.mark.parametrize("threads", [0, 1], ids=["in_line", "encoder_thread"])
def test_a_device_error_while_encoding_masks_fails_the_shard(tmp_path: pathlib.Path, threads: int) -> None:
    shards = processor(tmp_path, batch_size=2)
    shards.encoder = ThreadPoolExecutor(threads) if threads else None
    describe = stand_in(shards, "describe", DEVICE_ERRORS["illegal_access"], on={HUGE})
    with pytest.raises(DeviceError, match="an illegal memory access"):
        shards.rows(shard_of(8), pixels(8))
    assert [70, 71] in describe.calls and [70] not in describe.calls


def test_at_most_two_batches_wait_for_mask_encoding(tmp_path: pathlib.Path) -> None:
    """However long the shard and however slow the encoding, the model runs at most two batches ahead of
    it, so a shard's detections do not pile up in memory. Here encoding does not begin until the model
    has run every batch or has waited 0.5 s for the encoders (then one batch is encoded)."""
    shards = processor(tmp_path, batch_size=1)
    shards.encoder = ThreadPoolExecutor(2)
    detect, describe = shards.predictor.detect, shards.predictor.describe
    gate = threading.Condition()
    state = {"detected": 0, "detecting": False, "idle_since": time.monotonic(), "released": 0, "encoded": 0}
    ahead: list[int] = []  # batches run by the model and not yet encoded, as each batch begins

    def counting_detect(images: Any) -> Any:
        with gate:
            ahead.append(state["detected"] - state["encoded"])
            state["detecting"] = True
        try:
            return detect(images)
        finally:
            with gate:
                state["detected"] += 1
                state["detecting"], state["idle_since"] = False, time.monotonic()
                gate.notify_all()

    def gated_describe(detections: Any) -> Any:
        with gate:
            assert gate.wait_for(lambda: state["released"] > 0 or state["detected"] == 6, timeout=60)
            state["released"] = max(state["released"] - 1, 0)
        result = describe(detections)
        with gate:
            state["encoded"] += 1
        return result

    def release_when_the_model_waits() -> None:
        while state["encoded"] < 6:
            time.sleep(0.05)
            with gate:
                if not state["detecting"] and time.monotonic() - state["idle_since"] > 0.5:
                    state["released"] += 1
                    state["idle_since"] = time.monotonic()
                    gate.notify_all()

    shards.predictor.detect = counting_detect  # type: ignore[method-assign]
    shards.predictor.describe = gated_describe  # type: ignore[method-assign]
    releaser = threading.Thread(target=release_when_the_model_waits, daemon=True)
    releaser.start()
    rows = shards.rows(shard_of(6), pixels(6))
    releaser.join(timeout=10)
    assert len(ahead) == 6 and max(ahead) <= 2
    assert rows == expected(1)


def test_torchvisions_deprecation_warning_is_not_said_on_every_decode() -> None:
    """torchvision 0.29 warns on every ``decode_jpeg`` call; the processor silences that one warning, so
    even warnings made errors let a decode through."""
    code = (
        "import io, numpy, torch, PIL.Image, torchvision.io as tio\n"
        "import batchseg.segment.processor\n"
        "buffer = io.BytesIO(); PIL.Image.fromarray(numpy.zeros((8, 8, 3), numpy.uint8)).save(buffer, 'JPEG')\n"
        "data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)\n"
        "for _ in range(2): tio.decode_jpeg([data], mode=tio.ImageReadMode.RGB)\n"
    )
    run = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
