"""Every byte batchseg reads or writes goes through fsspec: local paths, file://, s3://, gs://, http(s)://.

Object stores fail now and then (5xx, throttling, timeouts, a restarting server): such transient errors
are retried with backoff for up to ``BATCHSEG_RETRY_SECONDS`` (default 120 s) before they count. No call
waits forever: connections and reads time out (``connect_timeout``, ``read_timeout``), and those timeouts
are transient errors too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from batchseg import log
from batchseg.errors import ImageError, StorageUnavailable

T = TypeVar("T")
RETRY_SECONDS = float(os.environ.get("BATCHSEG_RETRY_SECONDS", "120"))
# A connection is refused or made within a few seconds (10 s covers SYNs lost and resent at 1 and 3 s, and
# a TLS handshake with a busy endpoint far away). An object store's first byte comes in well under a
# second, and bytes keep coming on a healthy connection: 30 s without one (botocore waits 60, s3fs 15)
# leaves room for a slow S3-compatible server or the answer to a large PUT, while a stalled read holds
# its shard up for half a minute before it is tried again.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
_TRANSIENT_TYPES = frozenset({
    "ConnectionError", "TimeoutError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ConnectionClosedError", "HTTPClientError", "ServerDisconnectedError", "ClientConnectorError",
    "ClientOSError", "ClientPayloadError", "IncompleteRead", "ResponseParserError", "FSTimeoutError",
})  # fmt: skip
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN}
_TRANSIENT_TEXT = re.compile(
    r"SlowDown|Throttl|RequestTimeout|ServiceUnavailable|InternalError|\((500|502|503|504)\)|Too Many Requests"
)


def filesystem(
    uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that serves ``uri`` and the path inside it (fsspec caches instances), with its
    timeouts set (:func:`with_timeouts`)."""
    fs, path = fsspec.core.url_to_fs(uri, **with_timeouts(uri, storage_options))
    return fs, path


def with_timeouts(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` for ``uri`` with batchseg's own ``connect_timeout`` and ``read_timeout`` keys
    (seconds, for any protocol; default :data:`CONNECT_TIMEOUT`, :data:`READ_TIMEOUT`) turned into what
    its filesystem knows: botocore's ``config_kwargs`` for s3://, an aiohttp ``ClientTimeout`` in
    ``client_kwargs`` for http(s):// (whose default gives a silent server 5 minutes). Timeouts already
    set in those win. Other filesystems have no such setting; :class:`ImageReader` bounds their reads."""
    options = dict(storage_options or {})
    connect, read = timeouts(options)
    options.pop("connect_timeout", None)
    options.pop("read_timeout", None)
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", connect)
        config.setdefault("read_timeout", read)
        options["config_kwargs"] = config
    elif protocol in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read))
        options["client_kwargs"] = client
    return options


def timeouts(storage_options: dict[str, Any] | None) -> tuple[float, float]:
    """The (connect, read) timeouts in seconds that ``storage_options`` ask for."""
    options = storage_options or {}
    return float(options.get("connect_timeout", CONNECT_TIMEOUT)), float(
        options.get("read_timeout", READ_TIMEOUT)
    )


FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_")


def forwarded_environment() -> dict[str, str]:
    """The driver's object-store credentials and endpoints from the environment, for Ray workers, which do
    not share the driver's environment on a cluster. They travel inside task arguments, never in a
    runtime_env (Ray logs those) or any file."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def apply_environment(environment: dict[str, str]) -> None:
    os.environ.update(environment)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` may go away on its own (network, 5xx, throttling) rather than mean what it says."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if {c.__name__ for c in type(error).__mro__} & _TRANSIENT_TYPES:
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    if _TRANSIENT_TEXT.search(str(error)):
        return True
    # s3fs turns botocore's errors into OSErrors whose message may not say what happened (a 503 SlowDown
    # becomes "Please reduce your request rate."), keeping the original as the cause.
    return error.__cause__ is not None and is_transient(error.__cause__)


class _Tally:
    """A count that threads add to."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.count += 1


_RETRIES = _Tally()


def retries() -> int:
    """How many times a storage call has been tried again in this process so far (a shard's record holds
    the difference over the shard)."""
    return _RETRIES.count


class Backoff:
    """When to try a failing storage call again: exponential backoff (0.5 s up to 10 s) while it fails
    transiently, for up to ``seconds`` (default ``BATCHSEG_RETRY_SECONDS``) in all."""

    def __init__(self, what: str, seconds: float | None = None) -> None:
        self.what = what
        self.deadline = time.monotonic() + (RETRY_SECONDS if seconds is None else seconds)
        self.delay = 0.5

    def after(self, error: Exception) -> float:
        """The seconds to wait before the next try after ``error``; raises ``error`` itself when it is not
        transient, and :class:`StorageUnavailable` when the time is up."""
        if not is_transient(error):
            raise error
        if time.monotonic() + self.delay > self.deadline:
            raise StorageUnavailable(
                f"{self.what}: storage kept failing: {type(error).__name__}: {error}"
            ) from error
        log.warning(f"{self.what}: {type(error).__name__}: {error}; retrying in {self.delay:.1f} s")
        _RETRIES.add()
        delay, self.delay = self.delay, min(2 * self.delay, 10.0)
        return delay


def retrying(call: Callable[[], T], what: str, seconds: float | None = None) -> T:
    """``call()``, retried as :class:`Backoff` says while it fails transiently.

    Raises :class:`StorageUnavailable` when the budget runs out; other errors pass through at once.
    """
    backoff = Backoff(what, seconds)
    while True:
        try:
            return call()
        except Exception as e:
            time.sleep(backoff.after(e))


def read_many(fs: fsspec.AbstractFileSystem, paths: list[str], what: str) -> dict[str, bytes]:
    """The bytes at each of ``paths`` (object stores fetch them concurrently), transient failures retried
    as :class:`Backoff` says. Only the paths that failed are read again: tried all or nothing, a thousand
    objects from a store that fails one request in a thousand would come back a third of the time."""
    contents: dict[str, bytes] = {}
    backoff = Backoff(what)
    left = list(paths)
    while left:
        try:
            got = fs.cat(left, on_error="return")
        except Exception as e:
            got = dict.fromkeys(left, e)
        failed = {p: v for p, v in got.items() if isinstance(v, Exception)}
        contents.update((p, v) for p, v in got.items() if p not in failed)
        if failed:  # a failure that is not transient is raised at once
            errors = list(failed.values())
            time.sleep(backoff.after(next((e for e in errors if not is_transient(e)), errors[0])))
        left = list(failed)
    return contents


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended by ``/``, keeping its protocol (``s3://b/x`` + ``y`` = ``s3://b/x/y``)."""
    return posixpath.join(uri.rstrip("/"), *parts) if uri else posixpath.join(*parts)


def parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URI for a ``path`` that ``fs`` returned (``find`` drops the ``s3://`` of its results)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def listing(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, int]:
    """Name -> size of each file directly in ``path`` as it is now (object-store listings are cached per
    filesystem instance, and other processes, the actors, write here); {} when ``path`` does not exist."""
    fs.invalidate_cache(path)
    try:
        entries = retrying(lambda: fs.ls(path, detail=True), f"listing {path}")
    except FileNotFoundError:
        return {}
    return {
        e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
        for e in entries
        if e.get("type") != "directory"
    }


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` so that a reader sees the whole object or nothing.

    An object store's PUT is already atomic; a local file is written aside and renamed.
    """
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        retrying(lambda: fs.pipe_file(path, data), f"writing {path}")


@contextlib.contextmanager
def open_whole(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[Any]:
    """A binary file to stream into, that appears at ``path`` whole or not at all: it is written aside
    and moved to ``path`` when the block ends; an error inside removes it (an object store's upload
    would otherwise commit the half written so far when the file closes)."""
    if fs.isdir(path):  # else the move would put the file inside it
        raise IsADirectoryError(errno.EISDIR, "it is a folder", path)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    f = fs.open(temporary, "wb")
    try:
        with f:
            yield f
        fs.mv(temporary, path)
    except BaseException:
        with contextlib.suppress(Exception):  # never written (an object store writes on close), or gone
            fs.rm(temporary)
        raise


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes at ``uri``, transient failures retried."""
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.cat_file(path), f"reading {uri}")


def read_image_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of one image; a problem with this image becomes an :class:`ImageError`, while storage
    that stays unavailable raises :class:`StorageUnavailable` (the shard is retried, not the image failed)."""
    fs, path = filesystem(uri, image_read_options(uri, storage_options))
    return _read_image(fs, path, uri)


def _read_image(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> bytes:
    try:
        if is_local(fs):
            _refuse_special_file(path, uri)
        return retrying(lambda: fs.cat_file(path), f"reading {uri}")
    except (StorageUnavailable, ImageError):
        raise
    except Exception as e:
        raise image_error(e, uri) from None


_SPECIAL_FILES = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                  stat.S_IFBLK: "a block device"}  # fmt: skip


def _refuse_special_file(path: str, uri: str) -> None:
    """Raise an :class:`ImageError` if ``path`` is a FIFO, socket or device, found before opening it: opening
    a FIFO waits for a writer, forever, and reading a device may never end either."""
    kind = _SPECIAL_FILES.get(stat.S_IFMT(os.stat(path).st_mode))
    if kind:
        raise ImageError("read_error", f"{uri} is {kind}, not an image file")


def image_error(error: Exception, uri: str) -> ImageError:
    """The :class:`ImageError` of a read that failed for this image alone (not :class:`StorageUnavailable`,
    which retries the shard)."""
    if isinstance(error, FileNotFoundError):
        return ImageError("not_found", f"no such object: {uri}")
    if isinstance(error, PermissionError):
        return ImageError("permission_denied", f"permission denied reading {uri}")
    if isinstance(error, IsADirectoryError):
        return ImageError("read_error", f"{uri} is a directory, not an image")
    return ImageError("read_error", f"could not read {uri}: {type(error).__name__}: {error}")


def image_read_options(
    uri: str, storage_options: dict[str, Any] | None, in_flight: int = 10
) -> dict[str, Any]:
    """``storage_options`` for reading whole images from ``uri``, with up to ``in_flight`` at once.

    s3fs reads an object of over 5 MiB in parallel ranges, and to know the size it first asks for it
    (a HEAD per image: a second round trip); images are read with one GET each. Its connection pool
    (botocore's ``max_pool_connections``, 10 by default) would cap the reads in flight, so it is made at
    least ``in_flight``. Values the user set win.
    """
    options = dict(storage_options or {})
    if uri.startswith(("s3://", "s3a://")):
        options.setdefault("max_concurrency", 1)
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", max(in_flight, 10))
        options["config_kwargs"] = config
    return options


MAX_READ_THREADS = 32


class ImageReader:
    """Reads images many at once: :meth:`fetch` returns a future of one image's bytes at once.

    On an asynchronous filesystem (s3fs, gcsfs, http: fsspec's ``async_impl``) each read is a coroutine
    on fsspec's event loop, so a hundred GETs can wait on the network together with no thread each; on
    the others (local disk, NFS mounts) each read takes a thread, up to ``in_flight`` (at most
    ``MAX_READ_THREADS``) of them. Results are those of :func:`read_image_bytes`: the bytes, an
    :class:`ImageError` for this image, or :class:`StorageUnavailable` once transient failures have been
    retried for ``BATCHSEG_RETRY_SECONDS``.
    An asynchronous read that has not ended within ``connect_timeout + 2 * read_timeout`` (the
    filesystem's own retries included: room for one stalled try and another) is a transient
    ``TimeoutError``, whatever the filesystem's own timeouts, so no read waits forever.
    The caller bounds how many reads are pending (each holds an encoded image once it is done), and waits
    for each at most :attr:`patience` (see :meth:`result`).
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, in_flight: int = 64) -> None:
        self.storage_options = storage_options or {}
        self.in_flight = in_flight
        connect, read = timeouts(self.storage_options)
        self.deadline = connect + 2 * read
        # How long a caller waits for any read, retries included: past it, the storage hangs (a blocking
        # read on a hung NFS mount cannot be interrupted, only given up on).
        self.patience = RETRY_SECONDS + 2 * self.deadline
        # Blocking reads (local disk, NFS) gain nothing from hundreds of threads: a large --prefetch
        # still waits in order, the threads stay few.
        self.threads = ThreadPoolExecutor(
            min(in_flight, MAX_READ_THREADS), thread_name_prefix="batchseg-read"
        )

    def fetch(self, uri: str) -> Future[bytes]:
        try:
            fs, path = filesystem(uri, image_read_options(uri, self.storage_options, self.in_flight))
        except Exception as e:  # e.g. a protocol fsspec does not know: this image's problem
            failed: Future[bytes] = Future()
            failed.set_exception(image_error(e, uri))
            return failed
        if getattr(fs, "async_impl", False) and getattr(fs, "asynchronous", True) is False:
            return asyncio.run_coroutine_threadsafe(self._read(fs, path, uri), fs.loop)
        return self.threads.submit(_read_image, fs, path, uri)

    def result(self, fetched: Future[bytes]) -> bytes:
        """The bytes of a :meth:`fetch`, waited for at most :attr:`patience`: a blocking read that hangs
        (a hung NFS mount) is :class:`StorageUnavailable` then (its thread is left behind), never a wait
        without end."""
        try:
            return fetched.result(timeout=self.patience)
        except FuturesTimeout:
            fetched.cancel()
            raise StorageUnavailable(
                f"an image read has not ended after {self.patience:g} s: the storage hangs"
            ) from None

    async def _read(self, fs: Any, path: str, uri: str) -> bytes:
        backoff = Backoff(f"reading {uri}")
        while True:
            try:
                return await self._read_once(fs, path)
            except Exception as e:
                try:
                    delay = backoff.after(e)
                except StorageUnavailable:
                    raise
                except Exception as final:
                    raise image_error(final, uri) from None
                await asyncio.sleep(delay)

    async def _read_once(self, fs: Any, path: str) -> bytes:
        """One try at reading ``path``, given up after :attr:`deadline` (its own ``TimeoutError``, told
        apart from the filesystem's)."""
        reading = asyncio.ensure_future(fs._cat_file(path))
        try:
            done, _ = await asyncio.wait({reading}, timeout=self.deadline)
        finally:
            reading.cancel()  # nothing once it is done; else no one waits for it any more
        if not done:
            raise TimeoutError(f"no whole answer within {self.deadline:g} s")
        data: bytes = reading.result()
        return data
