"""A shard's images, in order, fetched far ahead of the model and decoded a little ahead of it."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from batchseg.errors import ImageError
from batchseg.io.images import DEFAULT_MAX_PIXELS, EncodedJpeg, decode_image, jpeg_orientation
from batchseg.io.reader import ImageReader, read_image_bytes
from batchseg.io.windowed import WindowedImage, is_windowed, open_windowed

T = TypeVar("T")
B = TypeVar("B")
R = TypeVar("R")
_END = object()


def read_ahead(
    items: Iterable[T],
    fetch: Callable[[T], B],
    decode: Callable[[B], R],
    pool: ThreadPoolExecutor,
    fetch_window: int,
    decode_window: int,
) -> Iterator[R]:
    """``decode(fetch(item))`` for each item, in order, both stages running ahead of the consumer (``fetch``
    starts a read and returns at once, e.g. a future): fetches
    up to ``fetch_window`` items ahead (so at most that many fetched items wait), decodes in ``pool`` up to
    ``decode_window`` ahead (so at most that many decoded ones wait). An error raised by either stage is
    raised here, at its item.

    The fetches begin when this is called, not when the first item is asked for: a shard's reads then
    wait on storage while the consumer still works on the shard before it. Decodes (CPU work that would
    hold ``pool``'s threads waiting for fetches) begin with the first item asked for."""
    pending = iter(items)
    fetching: deque[B] = deque()
    decoding: deque[Future[R]] = deque()

    def fetch_ahead() -> None:
        while len(fetching) + len(decoding) < fetch_window and (item := next(pending, _END)) is not _END:
            fetching.append(fetch(item))  # type: ignore[arg-type]

    def top_up() -> None:
        fetch_ahead()
        while fetching and len(decoding) < decode_window:
            decoding.append(pool.submit(decode, fetching.popleft()))

    def in_order() -> Iterator[R]:
        top_up()
        while decoding:
            result = decoding.popleft().result()
            top_up()
            yield result

    fetch_ahead()
    return in_order()


Loaded = np.ndarray | EncodedJpeg | WindowedImage | ImageError


class ImageLoader:
    """Turns image URIs into pixels (or encoded JPEGs for a batched decode on the model's device), in order.

    Args:
        storage_options: fsspec options for the URIs.
        prefetch: reads in flight ahead of the consumer (see :class:`ImageReader`); at most this many
            encoded images wait in memory.
        threads: threads checking and decoding fetched images (PIL and numpy release the GIL).
        decode_ahead: decoded images kept ready ahead of the consumer (e.g. two batches).
        keep_jpegs: leave a plain JPEG encoded (:class:`EncodedJpeg`: its header and EXIF orientation
            checked) for ``torchvision.io.decode_jpeg``; everything else is decoded with PIL.
        max_pixels: larger images become ``too_large`` errors, found from the header.
        tile: with ``--tile``, a TIFF is opened for windowed reads (:class:`WindowedImage`, its windows read
            later, by the caller) instead of being read and decoded whole, and a JPEG larger than a tile is
            decoded here rather than left encoded.

    Each image gives its pixels (H x W x 3 uint8 as displayed), an :class:`EncodedJpeg`, or the
    :class:`ImageError` that stands for it in its row; storage that stays unavailable raises
    :class:`batchseg.errors.StorageUnavailable`.
    """

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        *,
        prefetch: int = 64,
        threads: int = 4,
        decode_ahead: int = 8,
        keep_jpegs: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        tile: int | None = None,
    ) -> None:
        self.storage_options = storage_options
        self.tile = tile
        self.reader = ImageReader(storage_options, in_flight=prefetch)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="batchseg-decode")
        self.prefetch = prefetch
        self.decode_ahead = decode_ahead
        self.keep_jpegs = keep_jpegs
        self.max_pixels = max_pixels

    def __call__(self, uris: Iterable[str]) -> Iterator[Loaded]:
        return read_ahead(
            uris,
            self.fetch,
            self.load,
            self.pool,
            fetch_window=max(self.prefetch, self.decode_ahead),
            decode_window=self.decode_ahead,
        )

    def fetch(self, uri: str) -> Future[bytes] | str:
        """The read of ``uri`` begun; a TIFF to be read window by window is left for :meth:`load`."""
        return uri if self.tile is not None and is_windowed(uri) else self.reader.fetch(uri)

    def load(self, fetched: Future[bytes] | str) -> Loaded:
        try:
            if isinstance(fetched, str):
                windowed = open_windowed(fetched, self.storage_options, self.max_pixels)
                if windowed is not None:
                    return windowed
                data = read_image_bytes(fetched, self.storage_options)
            else:
                data = self.reader.result(fetched)
            if self.keep_jpegs and (orientation := jpeg_orientation(data, self.max_pixels, self.tile)):
                return EncodedJpeg(data, orientation)
            return decode_image(data, self.max_pixels)
        except ImageError as e:
            return e
