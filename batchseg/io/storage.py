"""Every byte batchseg reads or writes goes through fsspec: local paths, file://, s3://, gs://, http(s)://.

Here: the filesystem for a URI, with timeouts (no call waits forever: connections and reads time out,
``connect_timeout``, ``read_timeout``, and those timeouts are transient errors, retried as
:mod:`batchseg.io.retries` says), paths, listings and reads. Writes that appear whole are in
:mod:`batchseg.io.atomic`, the reader of many images at once in :mod:`batchseg.io.reader`.
"""

from __future__ import annotations

import datetime
import os
import posixpath
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from batchseg.io import retries

# A connection is refused or made within a few seconds (10 s covers SYNs lost and resent at 1 and 3 s, and
# a TLS handshake with a busy endpoint far away). An object store's first byte comes in well under a
# second, and bytes keep coming on a healthy connection: 30 s without one (botocore waits 60, s3fs 15)
# leaves room for a slow S3-compatible server or the answer to a large PUT, while a stalled read holds
# its shard up for half a minute before it is tried again.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0

# A file to write named ``-`` is standard output, as for most command-line tools (fsspec would take it for
# a file of that name in the working directory): :mod:`batchseg.io.atomic` streams into it.
STDOUT = "-"


def filesystem(
    uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that serves ``uri`` and the path inside it (fsspec caches instances), with its
    timeouts set (:func:`with_timeouts`); ``-`` is :data:`STDOUT` on the local filesystem."""
    if uri == STDOUT:
        return LocalFileSystem(), STDOUT
    fs, path = fsspec.core.url_to_fs(uri, **with_timeouts(uri, storage_options))
    if uri.startswith("file://"):  # percent-encoded (RFC 8089), as Path.as_uri writes it; fsspec keeps the %
        path = urllib.parse.unquote(path)
    return fs, path


def with_timeouts(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` for ``uri`` with batchseg's own ``connect_timeout`` and ``read_timeout`` keys
    (seconds, for any protocol; default :data:`CONNECT_TIMEOUT`, :data:`READ_TIMEOUT`) turned into what
    its filesystem knows: botocore's ``config_kwargs`` for s3://, an aiohttp ``ClientTimeout`` in
    ``client_kwargs`` for http(s):// (whose default gives a silent server 5 minutes). Timeouts already
    set in those win. Other filesystems have no such setting; :class:`batchseg.io.reader.ImageReader`
    bounds their reads."""
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


def read_many(fs: fsspec.AbstractFileSystem, paths: list[str], what: str) -> dict[str, bytes]:
    """The bytes at each of ``paths`` (object stores fetch them concurrently), transient failures retried
    as :class:`batchseg.io.retries.Backoff` says. Only the paths that failed are read again: tried all or
    nothing, a thousand objects from a store that fails one request in a thousand would come back a third
    of the time."""
    return _each_retried(paths, lambda left: fs.cat(left, on_error="return"), what)


def read_ranges(
    fs: fsspec.AbstractFileSystem, path: str, ranges: list[tuple[int, int]], what: str
) -> dict[tuple[int, int], bytes]:
    """The bytes of each ``(start, end)`` range of ``path`` (object stores fetch them concurrently, a range
    request each), retried as :func:`read_many` retries (only the ranges that failed)."""

    def fetch(left: list[tuple[int, int]]) -> dict[tuple[int, int], bytes | Exception]:
        answers = fs.cat_ranges(
            [path] * len(left), [r[0] for r in left], [r[1] for r in left], on_error="return"
        )
        return dict(zip(left, answers, strict=True))

    return _each_retried(ranges, fetch, what)


K = TypeVar("K")


def _each_retried(keys: list[K], fetch: Callable[[list[K]], dict[K, Any]], what: str) -> dict[K, bytes]:
    """``fetch(keys)`` (each key's bytes or exception), the keys that failed fetched again until none has."""
    contents: dict[K, bytes] = {}
    backoff = retries.Backoff(what)
    left = list(keys)
    while left:
        try:
            got = fetch(left)
        except Exception as e:
            got = dict.fromkeys(left, e)
        failed = {k: v for k, v in got.items() if isinstance(v, Exception)}
        contents.update((k, v) for k, v in got.items() if k not in failed)
        if failed:  # a failure that is not transient is raised at once
            errors = list(failed.values())
            time.sleep(backoff.after(next((e for e in errors if not retries.is_transient(e)), errors[0])))
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
    return {name: int(e.get("size") or 0) for name, e in entries(fs, path).items()}


def entries(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict[str, Any]]:
    """Name -> the filesystem's details (size, ETag, times: :func:`modified`) of each file directly in
    ``path``, listed as :func:`listing` lists them."""
    fs.invalidate_cache(path)
    try:
        found = retries.retrying(lambda: fs.ls(path, detail=True), f"listing {path}")
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in found if e.get("type") != "directory"}


def modified(entry: dict[str, Any]) -> float | None:
    """When the file of a listing's ``entry`` was last written (Unix seconds), where the filesystem says:
    local ``mtime``, an object store's ``LastModified``."""
    if isinstance(entry.get("mtime"), int | float):
        return float(entry["mtime"])
    last = entry.get("LastModified")
    return last.timestamp() if isinstance(last, datetime.datetime) else None


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes at ``uri``, transient failures retried."""
    fs, path = filesystem(uri, storage_options)
    return retries.retrying(lambda: fs.cat_file(path), f"reading {uri}")
