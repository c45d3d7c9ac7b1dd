"""One shard end to end, without Ray: fetch and decode images, run the predictor, build rows, write the
shard and its completion record."""

from __future__ import annotations

import functools
import re
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from batchseg.errors import DeviceError, ImageError, ModelFailed, first_line
from batchseg.format.output import OutputDir, ShardRecord, settings_of
from batchseg.format.records import error_kind, error_row, ok_row, to_parquet
from batchseg.inference.models import WeightsInfo, load_state_dict
from batchseg.inference.predictor import Predictor
from batchseg.inference.tiling import Stitcher, Tile, TileGrid
from batchseg.io import retries
from batchseg.io.images import EncodedJpeg, decode_image, orient
from batchseg.io.loader import ImageLoader, Loaded, read_ahead
from batchseg.io.manifest import Shard
from batchseg.io.windowed import Geo, WindowedImage
from batchseg.segment.config import ON_DEVICE, SegmentConfig
from batchseg.segment.job import Job

# torchvision 0.29 deprecates its image codecs for TorchCodec's and says so on every call; TorchCodec needs
# FFmpeg's shared libraries, which pip does not bring, so batchseg keeps decode_jpeg and silences this one
# warning, by its exact message, once for the process.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)  # fmt: skip

# Batches whose masks wait for an encoder thread (or are being encoded) while the model runs the next one:
# the one bound on what a shard holds between forward and encoding, whatever its size.
ENCODING_AHEAD = 2

# The kinds of error row an image gets when the model fails on it alone, and how many such rows a shard
# (or a batch) must have before they are taken for the model's fault rather than the images' (see
# too_many_failures).
MODEL_FAILURES = ("inference_error", "out_of_memory")
MIN_MODEL_FAILURES = 3


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
    batch's masks are encoded in other threads while the device runs the next batch (at most
    ``ENCODING_AHEAD`` batches wait). Every image yields exactly one row, in manifest order; a failure that
    is no image's fault (the device, the model failing on most images, storage) raises instead, so that
    the shard is retried rather than recorded.

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
        self.settings = settings_of(self.provenance)  # in each record: the job's, checked on rerun and verify
        self.device = device
        self.predictor = Predictor.from_weights(
            weights,
            score_threshold=config.score_threshold,
            mask_threshold=config.mask_threshold,
            min_size=config.min_size,
            max_size=config.max_size,
            max_instances=config.instances_per_image(tiled=config.tile is not None),
            device=device,
            precision=config.precision,
            storage_options=config.io_options,
            state_dict=state_dict,
        )
        # With --tile, the model keeps a tiled image's many instances per tile; an image taken whole keeps
        # its own number (the model's are best first: the same as the model keeping that many).
        self.whole_limit = config.instances_per_image(tiled=False)
        # JPEGs are decoded in batches on the model's device (nvJPEG on a GPU); everything else with PIL.
        self.decode_on_device = config.decode in ON_DEVICE or (config.decode == "auto" and device != "cpu")
        self.loader = ImageLoader(
            config.io_options,
            prefetch=config.prefetch,
            threads=config.io_threads,
            decode_ahead=2 * config.batch_size,
            keep_jpegs=self.decode_on_device,
            max_pixels=config.max_pixels,
            tile=config.tile,
        )
        # Images of the current shard handed to the model or made error rows, for the progress line
        # (those handed to the model may still be in it).
        self.images_started = 0
        self.images_writing = 0  # images of shards the model is done with, being written
        self.counting = threading.Lock()  # images_started, images_writing and stitching change together
        self.stitching: set[Stitcher] = set()  # tiled images of the current shard not yet stitched
        self.model_turn = threading.Lock()  # the model takes one shard at a time (see process)
        # On a GPU, a batch's masks are encoded on the host while the device runs the next batch.
        self.encoder = (
            ThreadPoolExecutor(config.io_threads, thread_name_prefix="batchseg-encode")
            if device != "cpu"
            else None
        )
        self.encoding: deque[Future[None]] = deque()

    @classmethod
    def for_job(cls, job: Job, device: str = "cpu") -> ShardProcessor:
        """``job``'s processor, its weights loaded here (actors are given an :class:`ActorSetup`)."""
        return cls.for_setup(ActorSetup.of(job), device)

    @classmethod
    def for_setup(cls, setup: ActorSetup, device: str = "cpu") -> ShardProcessor:
        return cls(setup.config, setup.weights, device, setup.provenance, setup.state_dict)

    @property
    def images_in_progress(self) -> float:
        """Images of the shards this processor is working on (in the model, or being written), for the
        progress line; a tiled image in the model counts by the share of its tiles done (a slide may take
        an actor hours)."""
        with self.counting:
            tiles_left = sum(s.remaining / len(s.grid.tiles) for s in self.stitching if not s.failed)
            return self.images_started + self.images_writing - tiles_left

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
        decoded: list[torch.Tensor | None]
        try:
            decoded = list(self._decode_jpegs(tensors))
        except Exception as failure:
            if is_device_error(failure):
                raise device_error(failure) from failure
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

    def _decode_jpegs(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``decode_jpeg`` of the encoded ``tensors`` onto the model's device, ready for the model's stream.

        On a GPU, torchvision allocates the outputs on the current stream, and nvJPEG writes them without
        waiting for the work queued on it (pytorch/vision#9606, meta-pytorch/torchcodec#1634): on the
        model's stream, it could be handed memory the previous batch's kernels are still to read. So the
        decode runs on a stream of its own that holds nothing else, drained first (only the last decode is
        on it), whose memory holds decoded images only, each given back (``record_stream``) only once the
        model's stream is done with it; the model's stream waits for the decode before using its outputs.
        """
        if not self.device.startswith("cuda"):
            decoded: list[torch.Tensor] = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
            return decoded
        model_stream = torch.cuda.current_stream(self.device)
        self._decode_stream.synchronize()
        with torch.cuda.stream(self._decode_stream):
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
        model_stream.wait_stream(self._decode_stream)
        for image in decoded:
            image.record_stream(model_stream)
        return decoded

    @functools.cached_property
    def _decode_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

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
                self.stitching.clear()
        try:
            provenance = self.provenance | {
                "shard": shard.index,
                "device": self.device,
                "precision": self.predictor.precision,
            }
            record = ShardRecord.of(
                shard,
                rows,
                attempt=attempt,
                seconds=seconds,
                storage_retries=storage_retries,
                settings=self.settings,
            )
            return self.output.write_shard(shard, to_parquet(rows, provenance, shard.columns), record)
        finally:
            with self.counting:
                self.images_writing -= len(rows)

    def rows(self, shard: Shard, images: Iterable[Loaded] | None = None) -> list[dict[str, Any]]:
        """One row per image of ``shard``, in its order: ``images`` (pixels, encoded JPEGs or the
        :class:`ImageError` of each), by default read from the shard's URIs.

        Raises :class:`DeviceError` when the device fails, and :class:`ModelFailed` when the model fails
        on most of the images (:func:`too_many_failures`): the shard is then retried, not recorded."""
        with self.counting:  # a Segmenter calls rows() alone: the last batch's tiled images are done
            self.images_started = 0
            self.stitching.clear()
        config = self.config
        rows: list[dict[str, Any] | None] = [None] * len(shard)
        batch: list[tuple[int, Any]] = []
        given: set[int] = set()  # images handed to the model (a tiled one may span batches)
        placed: dict[int, Geo] = {}  # the map placement of images read through io.windowed

        def run_batch() -> None:
            nonlocal batch
            decoded = self._decode_on_device(shard, batch, rows)
            given.update(i for i, _ in decoded)
            self._predict(shard, decoded, rows)
            batch = []

        try:
            for i, image in enumerate(self.loader(shard.uris) if images is None else images):
                self.images_started += 1
                if isinstance(image, ImageError):
                    rows[i] = error_row(shard.image_ids[i], shard.uris[i], image)
                    continue
                if isinstance(image, WindowedImage) and image.geo is not None:
                    placed[i] = image.geo
                for unit in self._units(shard, i, image, rows):
                    batch.append((i, unit))
                    if len(batch) == config.batch_size:
                        run_batch()
            if batch:
                run_batch()
            self._encoded(keep=0)
        finally:  # on an error, no encoder thread may go on filling these rows or holding device memory
            for pending in self.encoding:
                pending.cancel()
            wait(self.encoding)
            self.encoding.clear()
        assert all(r is not None for r in rows)
        done: list[dict[str, Any]] = rows  # type: ignore[assignment]
        for i, geo in placed.items():
            if done[i]["status"] == "ok":
                done[i] |= {"geo_transform": list(geo.transform), "crs": geo.crs}
        failed = [
            r["error"] for r in done if r["status"] == "error" and error_kind(r["error"]) in MODEL_FAILURES
        ]
        if too_many_failures(len(failed), len(given)):
            raise ModelFailed(
                f"the model failed on {len(failed)} of the {len(given)} images it was given (the first: {failed[0]})"
            )
        return done

    def _units(self, shard: Shard, i: int, image: Any, rows: list[dict[str, Any] | None]) -> Iterator[Any]:
        """What the model is given for image ``i``: the image itself, or with ``--tile`` and an image larger
        than a tile, its tiles (:class:`TileOf`), cut from its pixels or read window by window (in the
        loader's threads, a few batches ahead). A window that cannot be read fails its image's row."""
        tile = self.config.tile
        if tile is None or isinstance(image, EncodedJpeg):  # the loader decodes large JPEGs when tiling
            yield image
            return
        width, height = image_size(image)
        if width <= tile and height <= tile:
            if isinstance(image, WindowedImage):  # a TIFF that fits a tile: read whole, as without --tile
                windowed = image
                try:
                    image = windowed.read(0, 0, height, width)
                except ImageError as error:
                    rows[i] = error_row(shard.image_ids[i], shard.uris[i], error, (width, height))
                    return
                finally:
                    windowed.close()
            yield image
            return
        grid = TileGrid(height, width, tile, self.config.overlap)
        tiled = Tiled(grid, Stitcher(grid, self.config.instances_per_image(tiled=True)), image)
        with self.counting:
            self.stitching.add(tiled.stitcher)
        if not isinstance(image, WindowedImage):
            for t in grid.tiles:
                yield TileOf(tile_pixels(image, t), t, tiled)
            return
        windows = read_ahead(
            grid.tiles,
            lambda t: t,
            lambda t: image.read(t.top, t.left, t.height, t.width),
            self.loader.pool,
            fetch_window=2 * self.config.batch_size,
            decode_window=2 * self.config.batch_size,
        )
        try:
            for t in grid.tiles:
                try:
                    pixels = next(windows)
                except ImageError as error:
                    if tiled.stitcher.fail():
                        rows[i] = error_row(shard.image_ids[i], shard.uris[i], error, (width, height))
                    return
                yield TileOf(pixels, t, tiled)
        finally:
            image.close()

    def _predict(self, shard: Shard, batch: list[tuple[int, Any]], rows: list[dict[str, Any] | None]) -> int:
        """The model on ``batch``; its rows are filled now, or on a GPU by an encoder thread while the device
        runs the next batch. Returns on how many of its images the model failed (each an error row).

        A failing batch is retried one by one, so that one image's failure (an input the model cannot
        take, one too large for the memory left) is that image's row alone; a device error fails the
        shard at once (:class:`DeviceError`), and so does a batch whose images mostly fail alone too."""
        kind, message = None, ""
        try:
            detections = self.predictor.detect([pixels_of(image) for _, image in batch])
        except Exception as e:
            if is_device_error(e):
                raise device_error(e) from e
            kind, message = model_failure(e)
        # Out of the except block, the traceback (and the batch's tensors its frames hold) is gone: only now
        # can the device's cache give their memory back for the retry.
        if kind is not None:
            free_device_cache(self.device)
            if len(batch) == 1:
                i, image = batch[0]
                if not isinstance(image, TileOf) or image.of.stitcher.fail():
                    rows[i] = error_row(
                        shard.image_ids[i], shard.uris[i], ImageError(kind, message), image_size(image)
                    )
                return 1
            failed = sum(self._predict(shard, [item], rows) for item in batch)
            if too_many_failures(failed, len(batch)):
                raise ModelFailed(
                    f"the model failed on a batch of {len(batch)} images, and on {failed} of them one by "
                    f"one: {kind}: {message}"
                )
            return failed

        if self.encoder is None:
            self._fill(shard, batch, detections, rows)
            return 0
        forward_done = None
        if self.device.startswith("cuda"):
            forward_done = torch.cuda.Event()
            forward_done.record()
        self.encoding.append(
            self.encoder.submit(
                _beside_the_model,
                functools.partial(self._fill, shard, batch, detections, rows),
                forward_done,
                [tensor for outputs, _, _ in detections for tensor in outputs.values()],
            )
        )
        self._encoded(keep=ENCODING_AHEAD)
        return 0

    def _encoded(self, keep: int) -> None:
        """Wait for the oldest batches being encoded until at most ``keep`` are (raising an encoder's
        error here), and take the finished ones off the queue."""
        while self.encoding and (len(self.encoding) > keep or self.encoding[0].done()):
            self.encoding.popleft().result()

    def _fill(
        self,
        shard: Shard,
        batch: list[tuple[int, Any]],
        detections: list[Any],
        rows: list[dict[str, Any] | None],
    ) -> None:
        """The rows of a batch the model has run on, its masks encoded (:meth:`Predictor.describe`). Out of
        memory for the whole batch, its images are encoded one by one; one that still does not fit is an
        ``out_of_memory`` row. A device error raises :class:`DeviceError`; any other error fails the shard."""
        try:
            whole = [k for k, (_, image) in enumerate(batch) if not isinstance(image, TileOf)]
            tiles = [k for k, (_, image) in enumerate(batch) if isinstance(image, TileOf)]
            described = self.predictor.describe([detections[k] for k in whole])
            stitched = self.predictor.describe_tiles(
                [detections[k] for k in tiles], [(batch[k][1].of.grid, batch[k][1].tile) for k in tiles]
            )
        except Exception as e:
            if is_device_error(e):
                raise device_error(e) from e
            if not is_out_of_memory(e):
                raise
            message = f"encoding its masks ran out of memory: {type(e).__name__}: {first_line(e)}"
        else:
            for k, instances in zip(whole, described, strict=True):
                i, image = batch[k]
                rows[i] = ok_row(
                    shard.image_ids[i], shard.uris[i], *image_size(image), instances[: self.whole_limit]
                )
            for k, (kept, pieces) in zip(tiles, stitched, strict=True):
                i, unit = batch[k]
                if unit.of.stitcher.add(unit.tile, kept, pieces):
                    rows[i] = ok_row(
                        shard.image_ids[i], shard.uris[i], *image_size(unit), unit.of.stitcher.instances()
                    )
            return
        free_device_cache(self.device)  # out of the except block: see _predict
        if len(batch) == 1:
            i, image = batch[0]
            if not isinstance(image, TileOf) or image.of.stitcher.fail():
                error = ImageError("out_of_memory", message)
                rows[i] = error_row(shard.image_ids[i], shard.uris[i], error, image_size(image))
            return
        for item, detection in zip(batch, detections, strict=True):
            self._fill(shard, [item], [detection], rows)


def too_many_failures(failed: int, given: int) -> bool:
    """Whether the model failing on ``failed`` of ``given`` images (each alone) is the model's or the
    process's fault rather than the images': on more than half of them, and on at least
    ``MIN_MODEL_FAILURES``, so that a shard of one or two images, one of them an input the model cannot
    take, is recorded with that image's error row instead of failing on every attempt."""
    return failed >= MIN_MODEL_FAILURES and 2 * failed > given


# What torch's CUDA errors say (a CUDA error, the driver, cuDNN, cuBLAS, a device-side assert): the context
# may be broken for good, and no image is at fault. torch 2.8+ raises torch.AcceleratorError for most.
_DEVICE_ERROR = re.compile(
    r"CUDA error|CUDA driver error|CUDNN_STATUS_|cuDNN error|CUBLAS_STATUS_|cuBLAS error|device-side assert"
    r"|NCCL error|unspecified launch failure"
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device (or the host, for a model on the CPU) running out of memory."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)
    )


def is_device_error(error: BaseException) -> bool:
    """Whether ``error`` is the device failing (see ``_DEVICE_ERROR``) rather than the model on an input."""
    if is_out_of_memory(error):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())  # torch 2.8 and later
    return isinstance(error, accelerator_error) or (
        isinstance(error, RuntimeError) and bool(_DEVICE_ERROR.search(str(error)))
    )


def device_error(error: BaseException) -> DeviceError:
    return DeviceError(f"the device failed: {type(error).__name__}: {first_line(error)}")


def model_failure(error: BaseException) -> tuple[str, str]:
    """The error kind and message of an image the model failed on alone."""
    if is_out_of_memory(error):
        return (
            "out_of_memory",
            f"the model ran out of memory on this image: {type(error).__name__}: {first_line(error)}",
        )
    return "inference_error", f"the model failed on this image: {type(error).__name__}: {error}"


def free_device_cache(device: str) -> None:
    """Give the memory the caching allocator holds back to the device, for a retry after out-of-memory."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


_encoder_streams = threading.local()


def _beside_the_model(work: Callable[[], None], forward_done: Any, tensors: list[torch.Tensor]) -> None:
    """``work`` (a batch's masks: kernels, copies, strings) on this encoder thread's own CUDA stream once
    the batch's forward is done (``forward_done``, an event on the model's stream), so that its kernels run
    beside the next batch's forward and its copies wait for its own kernels only, not for that forward;
    without an event (not CUDA), just ``work()``. ``tensors`` (the model's outputs, made on the model's
    stream) are marked as used on this one, so that their memory is not handed out again until this
    stream's work on them is done."""
    if forward_done is None:
        work()
        return
    stream = getattr(_encoder_streams, "stream", None)
    if stream is None:  # one stream per encoder thread, made once
        stream = _encoder_streams.stream = torch.cuda.Stream()
    stream.wait_event(forward_done)
    for tensor in tensors:
        tensor.record_stream(stream)
    with torch.cuda.stream(stream):
        work()


@dataclass(frozen=True)
class Tiled:
    """An image taken in tiles: its grid, the stitcher gathering its tiles' instances, and its pixels
    (decoded whole, or a :class:`WindowedImage`)."""

    grid: TileGrid
    stitcher: Stitcher
    image: Any


@dataclass(frozen=True)
class TileOf:
    """One tile's pixels, which tile it is, and the image it belongs to."""

    pixels: np.ndarray | torch.Tensor
    tile: Tile
    of: Tiled


def tile_pixels(image: np.ndarray | torch.Tensor, tile: Tile) -> np.ndarray | torch.Tensor:
    """``tile``'s window of pixels decoded whole (a view, not a copy)."""
    rows, columns = slice(tile.top, tile.bottom), slice(tile.left, tile.right)
    return image[:, rows, columns] if isinstance(image, torch.Tensor) else image[rows, columns]


def pixels_of(image: Any) -> np.ndarray | torch.Tensor:
    """What the model is given for one batch item: a tile's pixels, or an image's."""
    return image.pixels if isinstance(image, TileOf) else image


def image_size(image: Any) -> tuple[int, int]:
    """(width, height) of H x W x 3 pixels (numpy), 3 x H x W pixels (torch), a windowed image, or the
    whole image a tile belongs to."""
    if isinstance(image, TileOf):
        return image.of.grid.width, image.of.grid.height
    if isinstance(image, WindowedImage):
        return image.width, image.height
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return int(image.shape[1]), int(image.shape[0])
