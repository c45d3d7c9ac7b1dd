"""Examples to training batches: images fetched far ahead of the step (the reader ``segment`` uses),
decoded and their masks built in threads, handed over as uint8 (the device makes them float)."""

from __future__ import annotations

import logging
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from batchseg.errors import BatchsegError, ImageError
from batchseg.io.loader import ImageLoader, read_ahead
from batchseg.train.config import TrainConfig
from batchseg.train.data import Target, to_sample
from batchseg.train.examples import Example

log = logging.getLogger(__name__)

Sample = tuple[torch.Tensor, Target]
Batch = tuple[list[torch.Tensor], list[Target]]


class TrainingLoader:
    """Batches of ``batch_size`` examples, in order, as ``(images, targets)`` (:func:`to_sample`).

    Args:
        storage_options: fsspec options for the images' URIs.
        prefetch: image reads in flight ahead of the step (at most this many encoded images wait).
        threads: threads decoding images and building their masks, ``2 * batch_size`` samples ahead.
        flip: mirror each image with probability 1/2, drawn from (``seed``, epoch, image id): the same on
            a rerun, whatever the threads do.
        pin_memory: page-lock images and targets in the decoding threads (for CUDA), so that their
            ``non_blocking`` copies to the device run asynchronously, off the training thread.

    An image that cannot be read or decoded is left out of its batch (counted in :attr:`unreadable`,
    logged); a batch left with no image takes the last readable one again, so every worker still takes
    its steps (DDP needs equal steps). Storage that stays unavailable raises ``StorageUnavailable``.
    """

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        *,
        prefetch: int = 64,
        threads: int = 4,
        flip: bool = True,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.images = ImageLoader(storage_options, prefetch=prefetch, threads=threads)  # segment's reads
        self.flip = flip
        self.seed = seed
        self.pin_memory = pin_memory
        self.unreadable = 0

    @classmethod
    def from_config(cls, config: TrainConfig, device: torch.device) -> TrainingLoader:
        """A training worker's loader: ``--prefetch``, ``--loader-workers`` threads, ``--seed``'s flips,
        pinned when the model is on a CUDA device."""
        return cls(
            config.storage_options,
            prefetch=config.prefetch,
            threads=config.loader_workers,
            seed=config.seed,
            pin_memory=device.type == "cuda",
        )

    def batches(self, examples: Iterable[tuple[int, Example]], batch_size: int) -> Iterator[Batch]:
        """``examples`` (each with its epoch, which the flip is drawn from) cut into batches every
        ``batch_size``: one stream may run through many epochs (an epoch of whole batches starts a batch).

        The reads begin here, not at the first batch asked for: they wait on storage while the caller
        still builds its model or trains on what came before."""

        def fetch(item: tuple[int, Example]) -> tuple[int, Example, Future[bytes]]:
            epoch, example = item
            return epoch, example, self.images.reader.fetch(example.uri)

        loaded = read_ahead(
            examples, fetch, self._load, self.images.pool,
            fetch_window=max(self.images.prefetch, 2 * batch_size), decode_window=2 * batch_size,
        )  # fmt: skip
        return self._batched(loaded, batch_size)

    def _load(self, fetched: tuple[int, Example, Future[bytes]]) -> Sample | ImageError:
        epoch, example, data = fetched
        pixels = self.images.load(data)  # never an EncodedJpeg: the loader keeps no JPEG encoded
        if isinstance(pixels, ImageError):
            return pixels
        assert isinstance(pixels, np.ndarray)
        flip = self.flip and zlib.crc32(f"{self.seed}/{epoch}/{example.image_id}".encode()) % 2 == 1
        image, target = to_sample(example, pixels, flip)
        if self.pin_memory:
            image, target = image.pin_memory(), {k: v.pin_memory() for k, v in target.items()}
        return image, target

    def _batched(self, loaded: Iterator[Sample | ImageError], batch_size: int) -> Iterator[Batch]:
        pending: deque[Sample | ImageError] = deque()
        last: Sample | None = None
        while True:
            batch: list[Sample] = []
            taken = 0
            for item in _take(loaded, pending, batch_size):
                taken += 1
                if isinstance(item, ImageError):
                    self._skipped(item)
                else:
                    batch.append(item)
            if taken == 0:
                return
            if not batch:
                last = last or _first_readable(loaded, pending)
                batch = [last]
            last = batch[-1]
            yield [image for image, _ in batch], [target for _, target in batch]

    def _skipped(self, error: ImageError) -> None:
        self.unreadable += 1
        log.warning(f"skipping an image in training: {error}")


def _take(loaded: Iterator[Any], pending: deque[Any], count: int) -> Iterator[Any]:
    """The next ``count`` items: those looked at ahead first, then the stream's."""
    for _ in range(count):
        if pending:
            yield pending.popleft()
        elif (item := next(loaded, None)) is not None:
            yield item
        else:
            return


def _first_readable(loaded: Iterator[Any], pending: deque[Any]) -> Sample:
    """The first readable sample ahead in the stream, left in it (kept in ``pending``) for its own batch."""
    for item in pending:
        if not isinstance(item, ImageError):
            return item
    for item in loaded:
        pending.append(item)
        if not isinstance(item, ImageError):
            return item
    raise BatchsegError("none of this worker's images of the epoch can be read")
