"""Reading images: one (:func:`read_image_bytes`) or many at once (:class:`ImageReader`, whose GETs wait
together on fsspec's event loop). A problem of one image becomes its :class:`ImageError` (a missing
object, a FIFO, socket or device refused before it is opened); storage that keeps failing is
:class:`StorageUnavailable`, and no read waits forever."""

from __future__ import annotations

import asyncio
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any

import fsspec

from batchseg.errors import CredentialsRejected, ImageError, StorageUnavailable
from batchseg.io import retries, storage


def read_image_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of one image; a problem with this image becomes an :class:`ImageError`, while storage
    that stays unavailable raises :class:`StorageUnavailable` (the shard is retried, not the image failed)."""
    fs, path = storage.filesystem(uri, image_read_options(uri, storage_options))
    return _read_image(fs, path, uri)


def _read_image(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> bytes:
    try:
        if storage.is_local(fs):
            refuse_special_file(path, uri)
        return retries.retrying(lambda: fs.cat_file(path), f"reading {uri}")
    except (StorageUnavailable, ImageError):
        raise
    except Exception as e:
        raise read_failure(e, uri) from None


_SPECIAL_FILES = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                  stat.S_IFBLK: "a block device"}  # fmt: skip


def refuse_special_file(path: str, uri: str) -> None:
    """Raise an :class:`ImageError` if ``path`` is a FIFO, socket or device, found before opening it: opening
    a FIFO waits for a writer, forever, and reading a device may never end either."""
    kind = _SPECIAL_FILES.get(stat.S_IFMT(os.stat(path).st_mode))
    if kind:
        raise ImageError("read_error", f"{uri} is {kind}, not an image file")


# What an object store answers when it refuses the credentials themselves rather than access to one object:
# a session token that expired or was revoked, a key it does not know, a signature made with the wrong
# secret. botocore's codes (S3's, STS's and the other AWS services'); s3fs turns each into a PermissionError
# or an OSError, keeping botocore's error as the cause.
_REJECTED_CREDENTIALS = frozenset({
    "ExpiredToken", "ExpiredTokenException", "InvalidToken", "TokenRefreshRequired", "RequestExpired",
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "UnrecognizedClientException",
})  # fmt: skip


def rejected_credentials(error: BaseException | None) -> str | None:
    """The store's error code when ``error`` (or an error behind it) is a refusal of the credentials
    themselves (see ``_REJECTED_CREDENTIALS``), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = (getattr(error, "response", None) or {}).get("Error", {}).get("Code")
        if code in _REJECTED_CREDENTIALS:
            return str(code)
        error = error.__cause__ or error.__context__
    return None


def read_failure(error: Exception, uri: str) -> CredentialsRejected | ImageError:
    """What a read that failed for good (not transiently) means: credentials the store refuses fail the
    shard (:class:`CredentialsRejected`: every image would fail alike, and refreshed ones may pass),
    anything else is this image's problem (:func:`image_error`)."""
    code = rejected_credentials(error)
    if code:
        return CredentialsRejected(
            f"reading {uri}: the storage refused the credentials ({code}: "
            f"{type(error).__name__}: {error}); they may have expired or been revoked"
        )
    return image_error(error, uri)


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
        connect, read = storage.timeouts(self.storage_options)
        self.deadline = connect + 2 * read
        # How long a caller waits for any read, retries included: past it, the storage hangs (a blocking
        # read on a hung NFS mount cannot be interrupted, only given up on).
        self.patience = retries.RETRY_SECONDS + 2 * self.deadline
        # Blocking reads (local disk, NFS) gain nothing from hundreds of threads: a large --prefetch
        # still waits in order, the threads stay few.
        self.threads = ThreadPoolExecutor(
            min(in_flight, MAX_READ_THREADS), thread_name_prefix="batchseg-read"
        )

    def fetch(self, uri: str) -> Future[bytes]:
        try:
            fs, path = storage.filesystem(uri, image_read_options(uri, self.storage_options, self.in_flight))
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
        backoff = retries.Backoff(f"reading {uri}")
        while True:
            try:
                return await self._read_once(fs, path)
            except Exception as e:
                try:
                    delay = backoff.after(e)
                except StorageUnavailable:
                    raise
                except Exception as final:
                    raise read_failure(final, uri) from None
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
