"""Every byte batchseg reads or writes goes through fsspec: local paths, file://, s3://, gs://, http(s)://.

Object stores fail now and then (5xx, throttling, timeouts, a restarting server): such transient errors
are retried with backoff for up to ``BATCHSEG_RETRY_SECONDS`` (default 120 s) before they count.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from batchseg import log
from batchseg.errors import ImageError, StorageUnavailable

T = TypeVar("T")
RETRY_SECONDS = float(os.environ.get("BATCHSEG_RETRY_SECONDS", "120"))
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
    """The filesystem that serves ``uri`` and the path inside it (fsspec caches instances)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


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
    return bool(_TRANSIENT_TEXT.search(str(error)))


def retrying(call: Callable[[], T], what: str, seconds: float | None = None) -> T:
    """``call()``, retried with exponential backoff (0.5 s up to 10 s) while it fails transiently.

    Raises :class:`StorageUnavailable` when the budget runs out; other errors pass through at once.
    """
    deadline = time.monotonic() + (RETRY_SECONDS if seconds is None else seconds)
    delay = 0.5
    while True:
        try:
            return call()
        except Exception as e:
            if not is_transient(e):
                raise
            if time.monotonic() + delay > deadline:
                raise StorageUnavailable(f"{what}: storage kept failing: {type(e).__name__}: {e}") from e
            log.warning(f"{what}: {type(e).__name__}: {e}; retrying in {delay:.1f} s")
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


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


def listing(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """``fs.ls(path)`` as it is now: object-store listings are cached per filesystem instance, and other
    processes (the actors) write here."""
    fs.invalidate_cache(path)
    return retrying(lambda: fs.ls(path, detail=False), f"listing {path}")


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


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes at ``uri``, transient failures retried."""
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.cat_file(path), f"reading {uri}")


def read_image_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of one image; a problem with this image becomes an :class:`ImageError`, while storage
    that stays unavailable raises :class:`StorageUnavailable` (the shard is retried, not the image failed)."""
    try:
        return read_bytes(uri, storage_options)
    except StorageUnavailable:
        raise
    except FileNotFoundError:
        raise ImageError("not_found", f"no such object: {uri}") from None
    except PermissionError:
        raise ImageError("permission_denied", f"permission denied reading {uri}") from None
    except IsADirectoryError:
        raise ImageError("read_error", f"{uri} is a directory, not an image") from None
    except Exception as e:  # anything else belongs to this image alone
        raise ImageError("read_error", f"could not read {uri}: {type(e).__name__}: {e}") from None
