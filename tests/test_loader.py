"""Images fetched far ahead and decoded a little ahead, in order, with every bad input still one result."""

from __future__ import annotations

import pathlib
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import fsspec
import numpy as np
import pytest

from batchseg.errors import ImageError, StorageUnavailable
from batchseg.io import retries
from batchseg.io.images import EncodedJpeg, decode_image
from batchseg.io.loader import ImageLoader, read_ahead
from batchseg.io.reader import ImageReader
from tests.imagefiles import BOMB_TEST_MAX_PIXELS, write_bad_files


class CountingFetcher:
    """Fetches that finish only when released, counting how many are pending at most."""

    def __init__(self) -> None:
        self.pending: list[Future[int]] = []
        self.most = 0
        self.lock = threading.Lock()

    def __call__(self, item: int) -> Future[int]:
        future: Future[int] = Future()
        with self.lock:
            self.pending.append(future)
            self.most = max(self.most, sum(not f.done() for f in self.pending))
        threading.Timer(0.002, future.set_result, (item,)).start()
        return future


@pytest.mark.parametrize(("fetch_window", "decode_window"), [(1, 1), (3, 1), (16, 4), (100, 100)])
def test_read_ahead_keeps_order_and_its_windows(fetch_window: int, decode_window: int) -> None:
    fetcher = CountingFetcher()
    decoded: list[int] = []
    with ThreadPoolExecutor(4) as pool:
        for value in read_ahead(
            range(50), fetcher, lambda f: f.result() * 10, pool, fetch_window, decode_window
        ):
            decoded.append(value)
    assert decoded == [i * 10 for i in range(50)]
    assert 1 <= fetcher.most <= fetch_window


def test_read_ahead_begins_its_fetches_when_called_and_decodes_when_asked() -> None:
    """A shard's reads wait on storage while its consumer still works on the shard before it."""
    fetched: list[int] = []
    decoded: list[int] = []

    def fetch(item: int) -> Future[int]:
        fetched.append(item)
        future: Future[int] = Future()
        future.set_result(item)
        return future

    def decode(future: Future[int]) -> int:
        decoded.append(future.result())
        return future.result()

    with ThreadPoolExecutor(2) as pool:
        images = read_ahead(range(10), fetch, decode, pool, 4, 2)
        assert (fetched, decoded) == ([0, 1, 2, 3], [])
        assert list(images) == list(range(10))
    assert fetched == decoded == list(range(10))


def test_read_ahead_raises_a_stage_error_at_its_item() -> None:
    def fetch(i: int) -> Future[int]:
        future: Future[int] = Future()
        if i == 3:
            future.set_exception(StorageUnavailable("storage kept failing"))
        else:
            future.set_result(i)
        return future

    got = []
    with ThreadPoolExecutor(2) as pool, pytest.raises(StorageUnavailable):
        for value in read_ahead(range(10), fetch, lambda f: f.result(), pool, 8, 2):
            got.append(value)
    assert got == [0, 1, 2]


@pytest.mark.parametrize("prefetch", [1, 2, 64])
@pytest.mark.parametrize("keep_jpegs", [False, True])
def test_loader_gives_each_file_what_decode_image_gives(
    tmp_path: pathlib.Path, prefetch: int, keep_jpegs: bool
) -> None:
    files = write_bad_files(tmp_path)
    uris = [str(tmp_path / name) for name in files] + [str(tmp_path / "missing.jpg"), "nosuch://x/y.jpg"]
    loader = ImageLoader(
        prefetch=prefetch, threads=2, decode_ahead=3, keep_jpegs=keep_jpegs, max_pixels=BOMB_TEST_MAX_PIXELS
    )
    loaded = list(loader(uris))
    assert len(loaded) == len(uris)
    for uri, kind, image in zip(uris, [*files.values(), "not_found", "read_error"], loaded, strict=True):
        if keep_jpegs and uri.endswith("truncated.jpg"):  # its header is fine: the device decode judges it
            assert isinstance(image, EncodedJpeg)
        elif kind is not None:
            assert isinstance(image, ImageError) and image.kind == kind, (uri, image)
            continue
        elif isinstance(image, EncodedJpeg):
            assert keep_jpegs and uri.endswith(".jpg") and image.data == pathlib.Path(uri).read_bytes()
        else:
            expected = decode_image(pathlib.Path(uri).read_bytes(), BOMB_TEST_MAX_PIXELS)
            assert isinstance(image, np.ndarray) and np.array_equal(image, expected), uri
    kept = [x for x in loaded if isinstance(x, EncodedJpeg)]
    assert len(kept) == (3 if keep_jpegs else 0)  # grey, exif-rotated, truncated; CMYK goes through PIL


def test_an_object_store_that_does_not_answer_is_storage_unavailable_not_an_image_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The asynchronous reads retry transient failures as the blocking ones do, then give up on the shard."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(retries, "RETRY_SECONDS", 1.0)
    options = {"key": "k", "secret": "s", "endpoint_url": f"http://127.0.0.1:{port}"}
    options["config_kwargs"] = {"connect_timeout": 1, "retries": {"max_attempts": 1}}
    reader = ImageReader(options, in_flight=4)
    future = reader.fetch("s3://bucket/image.jpg")  # a coroutine on fsspec's loop: s3fs is asynchronous
    with pytest.raises(StorageUnavailable, match=r"reading s3://bucket/image\.jpg: storage kept failing"):
        future.result(timeout=120)


def test_a_huge_prefetch_on_local_files_keeps_the_threads_few(tmp_path: pathlib.Path) -> None:

    jpeg = (pathlib.Path(__file__).parent / "imagefiles.py").read_bytes()  # any bytes: a not_an_image row
    uris = []
    for i in range(300):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg)
        uris.append(str(tmp_path / f"{i}.jpg"))
    before = set(threading.enumerate())
    loader = ImageLoader(prefetch=1_000_000, threads=2)
    results = list(loader(uris))
    assert [r.kind for r in results if isinstance(r, ImageError)] == ["not_an_image"] * 300
    readers = [t for t in set(threading.enumerate()) - before if t.name.startswith("batchseg-read")]
    assert 1 <= len(readers) <= 32, len(readers)


class HungFileSystem(fsspec.AbstractFileSystem):
    """A blocking filesystem whose reads never end, as on a hung NFS mount (no real one can be had here)."""

    protocol = "hung"
    release = threading.Event()

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: object
    ) -> bytes:
        self.release.wait()
        return b""


def test_a_blocking_read_that_never_ends_is_storage_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads on a thread cannot be interrupted; the loader stops waiting for one after the reader's
    patience (retry budget plus twice a try's deadline)."""
    monkeypatch.setattr(retries, "RETRY_SECONDS", 0.5)
    fsspec.register_implementation("hung", HungFileSystem, clobber=True)
    loader = ImageLoader({"connect_timeout": 0.5, "read_timeout": 0.5}, prefetch=2, threads=1)
    assert loader.reader.patience == 3.5
    start = time.monotonic()
    try:
        with ThreadPoolExecutor(1) as guard:  # a loader that waits forever fails the test, not hangs it
            consumer = guard.submit(lambda: list(loader(["hung://a.jpg", "hung://b.jpg"])))
            with pytest.raises(StorageUnavailable, match=r"has not ended after 3.5 s: the storage hangs"):
                consumer.result(timeout=15)
    finally:
        HungFileSystem.release.set()
    assert 3.5 <= time.monotonic() - start < 10
