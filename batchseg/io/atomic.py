"""Writes that a reader sees whole or not at all: bytes written at once (:func:`write`) or a file streamed
into (:func:`open_whole`). Until it is whole, a file lies aside as ``<path>.tmp-<32 hex digits>`` (an
object store's PUT of bytes is whole already)."""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec

from batchseg.io import retries, storage


def aside(path: str) -> str:
    """Where a file bound for ``path`` is written until it is whole."""
    return f"{path}.tmp-{uuid.uuid4().hex}"


def destination(path: str) -> str | None:
    """The path a file lying aside (:func:`aside`) is bound for; None for any other file."""
    stem, dot_tmp, digits = path.rpartition(".tmp-")
    is_hex = len(digits) == 32 and all(c in "0123456789abcdef" for c in digits)
    return stem if dot_tmp and is_hex else None


def write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` so that a reader sees the whole object or nothing.

    An object store's PUT is already atomic; a local file is written aside and renamed.
    """
    if storage.is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = aside(path)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        retries.retrying(lambda: fs.pipe_file(path, data), f"writing {path}")


@contextlib.contextmanager
def open_whole(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[Any]:
    """A binary file to stream into, that appears at ``path`` whole or not at all: it is written aside
    and moved to ``path`` when the block ends; an error inside removes it (an object store's upload
    would otherwise commit the half written so far when the file closes)."""
    if fs.isdir(path):  # else the move would put the file inside it
        raise IsADirectoryError(errno.EISDIR, "it is a folder", path)
    temporary = aside(path)
    if storage.is_local(fs):
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
