"""One shard end to end, without Ray: fetch and decode images, run the predictor, build rows, write the
shard and its completion record."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from batchseg.errors import ImageError
from batchseg.format.output import OutputDir, ShardRecord
from batchseg.format.records import error_row, ok_row, to_parquet
from batchseg.inference.models import WeightsInfo, load_state_dict
from batchseg.inference.predictor import Predictor
from batchseg.io import retries
from batchseg.io.images import EncodedJpeg, decode_image, orient
from batchseg.io.loader import ImageLoader, Loaded
from batchseg.io.manifest import Shard
from batchseg.segment.config import ON_DEVICE, SegmentConfig
from batchseg.segment.job import Job


@dataclass(frozen=True)
class ActorSetup:
    """What each actor of a job is given, once: the settings, the weights (resolved and loaded on the
    driver), what goes into each shard's metadata, and the storage environment the driver forwards. Never
    the job's plan, whose shard fingerprints grow with the manifest (35 MB pickled at a million shards)."""

    config: SegmentConfig
    weights: WeightsInfo
    state_dict: dict[str, torch.Tensor] | None  # None: random weights (``--weights none``)
    provenance: dict[str, Any]
    environment: dict[str, str]

    @classmethod
    def of(cls, job: Job) -> ActorSetup:
        """``job``'s setup, its weights loaded here (with the job's storage options and timeouts)."""
        state = load_state_dict(job.weights, job.config.io_options)
        return cls(job.config, job.weights, state, job.provenance, job.environment)


class ShardProcessor:
    """Holds a model; turns one shard into one Parquet object and a completion record.

    Images are fetched ``--prefetch`` ahead of the model (many reads in flight on one event loop for
    object stores), so the model does not wait on storage latency, and checked and (but for JPEGs bound
    for the GPU's decoder) decoded in ``--io-threads`` threads ``2 * batch_size`` ahead; on a GPU, each
    batch's masks are encoded in other threads while the device runs the next batch. Every image yields
    exactly one row, in manifest order.

    :meth:`process` may be called for several shards at once (an actor takes the two queued on it): each
    shard's reads begin at once, the model takes the shards one at a time, and a shard is written once
    the model has moved on to the next, so shards follow each other on the model without a gap.
    """

    def __init__(
        self,
        config: SegmentConfig,
        weights: WeightsInfo,
        device: str = "cpu",
        provenance: dict[str, Any] | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """``config``'s settings with ``weights`` on ``device``; ``provenance`` goes into each shard's
        Parquet metadata (:meth:`process`; :meth:`rows` alone needs none, nor an output). ``state_dict``:
        the weights already loaded (an actor's, loaded once on the driver); None: loaded here."""
        self.config = config
        self.provenance = provenance or {}
        self.device = device
        self.predictor = Predictor.from_weights(
            weights,
            score_threshold=config.score_threshold,
            mask_threshold=config.mask_threshold,
            min_size=config.min_size,
            max_size=config.max_size,
            max_instances=config.max_instances,
            device=device,
            precision=config.precision,
            storage_options=config.io_options,
            state_dict=state_dict,
        )
        # JPEGs are decoded in batches on the model's device (nvJPEG on a GPU); everything else with PIL.
        self.decode_on_device = config.decode in ON_DEVICE or (config.decode == "auto" and device != "cpu")
        self.loader = ImageLoader(
            config.io_options,
            prefetch=config.prefetch,
            threads=config.io_threads,
            decode_ahead=2 * config.batch_size,
            keep_jpegs=self.decode_on_device,
            max_pixels=config.max_pixels,
        )
        # Images of the current shard handed to the model or made error rows, for the progress line
        # (those handed to the model may still be in it).
        self.images_started = 0
        self.images_writing = 0  # images of shards the model is done with, being written
        self.counting = threading.Lock()  # images_started and images_writing change together
        self.model_turn = threading.Lock()  # the model takes one shard at a time (see process)
        # On a GPU, a batch's masks are encoded on the host while the device runs the next batch.
        self.encoder = (
            ThreadPoolExecutor(config.io_threads, thread_name_prefix="batchseg-encode")
            if device != "cpu"
            else None
        )
        self.encoding: list[Future[None]] = []

    @classmethod
    def for_job(cls, job: Job, device: str = "cpu") -> ShardProcessor:
        """``job``'s processor, its weights loaded here (actors are given an :class:`ActorSetup`)."""
        return cls.for_setup(ActorSetup.of(job), device)

    @classmethod
    def for_setup(cls, setup: ActorSetup, device: str = "cpu") -> ShardProcessor:
        return cls(setup.config, setup.weights, device, setup.provenance, setup.state_dict)

    @property
    def images_in_progress(self) -> int:
        """Images of the shards this processor is working on (in the model, or being written), for the
        progress line."""
        with self.counting:
            return self.images_started + self.images_writing

    @functools.cached_property
    def output(self) -> OutputDir:
        return OutputDir(self.config.output, self.config.io_options)

    def _decode_on_device(
        self, shard: Shard, batch: list[tuple[int, Any]], rows: list[Any]
    ) -> list[tuple[int, Any]]:
        """The batch with its JPEGs decoded on the device, 3 x H x W uint8 tensors as displayed; a JPEG
        the device decoder refuses goes through PIL, whose verdict (pixels or an error row) stands."""
        encoded = [(i, image) for i, image in batch if isinstance(image, EncodedJpeg)]
        if not encoded:
            return batch
        tensors = [torch.frombuffer(bytearray(e.data), dtype=torch.uint8) for _, e in encoded]
        try:
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
        except Exception:
            decoded = [None] * len(encoded)
        pixels: dict[int, Any] = {}
        for (i, e), image in zip(encoded, decoded, strict=True):
            if image is not None:
                pixels[i] = orient(image, e.orientation)
                continue
            try:
                pixels[i] = decode_image(e.data, self.config.max_pixels)
            except ImageError as error:
                rows[i] = error_row(shard.image_ids[i], shard.uris[i], error)
        return [(i, pixels.get(i, image)) for i, image in batch if rows[i] is None]

    def process(self, shard: Shard, attempt: int = 1) -> ShardRecord:
        """Segment every image of ``shard``, write its rows and record; return the record.

        Safe to call for several shards at once: the shard's reads begin now, while the model may still
        be on another shard; the model takes the shards in turn; the writes (rows, then record) follow
        once the model has moved on. The record is returned only once both are written, and a failed
        write fails this call alone."""
        images = self.loader(shard.uris)
        with self.model_turn:
            start = time.time()
            # One shard in the model at a time: the retries during its turn are counted in its record (its
            # own reads', the next shard's begun early, the last shard's writes), each in one record.
            retries_before = retries.count()
            rows = self.rows(shard, images)
            seconds, storage_retries = time.time() - start, retries.count() - retries_before
            with self.counting:
                self.images_started, self.images_writing = 0, self.images_writing + len(rows)
        try:
            provenance = self.provenance | {
                "shard": shard.index,
                "device": self.device,
                "precision": self.predictor.precision,
            }
            record = ShardRecord.of(
                shard, rows, attempt=attempt, seconds=seconds, storage_retries=storage_retries
            )
            return self.output.write_shard(shard, to_parquet(rows, provenance, shard.columns), record)
        finally:
            with self.counting:
                self.images_writing -= len(rows)

    def rows(self, shard: Shard, images: Iterable[Loaded] | None = None) -> list[dict[str, Any]]:
        """One row per image of ``shard``, in its order: ``images`` (pixels, encoded JPEGs or the
        :class:`ImageError` of each), by default read from the shard's URIs."""
        self.images_started = 0
        self.encoding = []
        config = self.config
        rows: list[dict[str, Any] | None] = [None] * len(shard)
        batch: list[tuple[int, Any]] = []
        for i, image in enumerate(self.loader(shard.uris) if images is None else images):
            if isinstance(image, ImageError):
                rows[i] = error_row(shard.image_ids[i], shard.uris[i], image)
                self.images_started += 1
            else:
                batch.append((i, image))
            if len(batch) == config.batch_size or (i == len(shard) - 1 and batch):
                self.images_started += len(batch)
                self._predict(shard, self._decode_on_device(shard, batch, rows), rows)
                batch = []
        for pending in self.encoding:
            pending.result()
        self.encoding.clear()
        assert all(r is not None for r in rows)
        return rows  # type: ignore[return-value]

    def _predict(self, shard: Shard, batch: list[tuple[int, Any]], rows: list[dict[str, Any] | None]) -> None:
        try:
            detections = self.predictor.detect([image for _, image in batch])
        except Exception as e:
            if len(batch) > 1:  # one bad image must not fail its neighbours: retry them one by one
                for item in batch:
                    self._predict(shard, [item], rows)
                return
            i, image = batch[0]
            error = ImageError("inference_error", f"the model failed on this image: {type(e).__name__}: {e}")
            rows[i] = error_row(shard.image_ids[i], shard.uris[i], error, image_size(image))
            return

        def fill() -> None:
            for (i, image), instances in zip(batch, self.predictor.describe(detections), strict=True):
                rows[i] = ok_row(shard.image_ids[i], shard.uris[i], *image_size(image), instances)

        if self.encoder is None:
            fill()
        else:
            forward_done = None
            if self.device.startswith("cuda"):
                forward_done = torch.cuda.Event()
                forward_done.record()
            self.encoding.append(self.encoder.submit(_beside_the_model, fill, forward_done))


def _beside_the_model(work: Callable[[], None], forward_done: Any) -> None:
    """``work`` (a batch's masks: kernels, copies, strings) on a CUDA stream of its own once the batch's
    forward is done (``forward_done``, an event on the model's stream), so that its kernels run beside the
    next batch's forward and its copies wait for its own kernels only, not for that forward; without an
    event (not CUDA), just ``work()``."""
    if forward_done is None:
        work()
        return
    stream = torch.cuda.Stream()
    stream.wait_event(forward_done)
    with torch.cuda.stream(stream):
        work()


def image_size(image: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(width, height) of H x W x 3 pixels (numpy) or 3 x H x W pixels (torch)."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return int(image.shape[1]), int(image.shape[0])
