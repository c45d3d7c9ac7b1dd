"""Every byte batchseg reads or writes goes through fsspec: local paths, file://, s3://, gs://, http(s)://."""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from batchseg.errors import ImageError


def filesystem(
    uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that serves ``uri`` and the path inside it (fsspec caches instances)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended by ``/``, keeping its protocol (``s3://b/x`` + ``y`` = ``s3://b/x/y``)."""
    return posixpath.join(uri.rstrip("/"), *parts) if uri else posixpath.join(*parts)


def parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URI for a ``path`` that ``fs`` returned (``find`` drops the ``s3://`` of its results)."""
    return fs.unstrip_protocol(path) if not isinstance(fs, LocalFileSystem) else path


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` so that a reader sees the whole object or nothing.

    An object store's PUT is already atomic; a local file is written aside and renamed.
    """
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_image_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of one image; a problem reading it becomes an :class:`ImageError`."""
    try:
        fs, path = filesystem(uri, storage_options)
        return fs.cat_file(path)
    except FileNotFoundError:
        raise ImageError("not_found", f"no such object: {uri}") from None
    except PermissionError:
        raise ImageError("permission_denied", f"permission denied reading {uri}") from None
    except IsADirectoryError:
        raise ImageError("read_error", f"{uri} is a directory, not an image") from None
    except Exception as e:  # any transport error belongs to this image alone
        raise ImageError("read_error", f"could not read {uri}: {type(e).__name__}: {e}") from None
