"""Writes that a reader sees whole or not at all: bytes written at once (:func:`write`) or a file streamed
into (:func:`open_whole`). Until it is whole, a local file lies aside, hidden, as
``.<name>.tmp-<32 hex digits>`` beside its target (an object store's PUT of bytes is whole already).

A local path is written where it leads: through a symbolic link to the link's target (the link stays);
into a FIFO, a device (``/dev/null``) or ``-`` (stdout, :data:`~batchseg.io.storage.STDOUT`) as a stream,
since renaming a file there would put a regular file in its place and its reader would get nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec

from batchseg.io import retries, storage


def aside(path: str) -> str:
    """Where a file bound for ``path`` is written until it is whole: beside it, named with a leading dot
    so that directory readers (pyarrow, pandas, Spark) skip it as they skip ``_`` names."""
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")


def destination(path: str) -> str | None:
    """The path a file lying aside (:func:`aside`; older batchseg named it without the leading dot) is
    bound for; None for any other file."""
    stem, dot_tmp, digits = path.rpartition(".tmp-")
    is_hex = len(digits) == 32 and all(c in "0123456789abcdef" for c in digits)
    if not (dot_tmp and is_hex):
        return None
    folder, name = posixpath.split(stem)
    return posixpath.join(folder, name.removeprefix("."))


def write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` so that a reader sees the whole object or nothing.

    An object store's PUT is already atomic; a local file is written aside and renamed (or streamed, where
    ``path`` is no regular file: see the module).
    """
    if storage.is_local(fs):
        with _open_local(path) as f:
            f.write(data)
    else:
        retries.retrying(lambda: fs.pipe_file(path, data), f"writing {path}")


def create(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``data`` at ``path``, whole, only if nothing is there; :class:`FileExistsError` if something is.

    On local disk a hard link of the whole file (atomic; where the filesystem has no hard links, an
    exclusive create, briefly empty); on an object store a conditional PUT (``If-None-Match: *``: AWS S3,
    SeaweedFS, MinIO). Returns False where the store has no such condition and the write was a plain one
    (the last writer wins: the caller reads back what is there), True where it was exclusive.
    """
    if not storage.is_local(fs):
        try:
            retries.retrying(lambda: fs.pipe_file(path, data, mode="create"), f"writing {path}")
            return True
        except (FileExistsError, PermissionError, FileNotFoundError):
            raise
        except OSError:  # a refused condition (SeaweedFS: 412 as EINVAL) or a store without it (501)
            fs.invalidate_cache(path)
            if fs.exists(path):
                raise FileExistsError(errno.EEXIST, "it exists", path) from None
        retries.retrying(lambda: fs.pipe_file(path, data), f"writing {path}")
        return False
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    whole = aside(path)
    with open(whole, "wb") as f:
        f.write(data)
    try:
        os.link(whole, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
            f.write(data)
    finally:
        os.unlink(whole)
    return True


@contextlib.contextmanager
def open_whole(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[Any]:
    """A binary file to stream into, that appears at ``path`` whole or not at all: it is written aside
    and moved to ``path`` when the block ends; an error inside removes it (an object store's upload
    would otherwise commit the half written so far when the file closes). A local ``path`` that is no
    regular file is streamed into (see the module)."""
    if storage.is_local(fs):
        with _open_local(path) as f:
            yield f
        return
    if fs.isdir(path):  # else the move would put the file inside it
        raise IsADirectoryError(errno.EISDIR, "it is a folder", path)
    temporary = aside(path)
    f = fs.open(temporary, "wb")
    try:
        with f:
            yield f
        fs.mv(temporary, path)
    except BaseException:
        with contextlib.suppress(Exception):  # never written (an object store writes on close), or gone
            fs.rm(temporary)
        raise


@contextlib.contextmanager
def _open_local(path: str) -> Iterator[Any]:
    """The local file to write ``path``'s bytes into (see the module). A file written aside is removed on
    any error (a full disk's included): no failed write leaves one behind."""
    if path == storage.STDOUT:
        sys.stdout.flush()  # what was printed before comes first
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    if _is_stream(path):
        with open(path, "wb") as f:
            yield f
        return
    target = os.path.realpath(path)  # a link's target: renaming onto the link would replace the link
    if os.path.isdir(target):  # else the rename would fail with a less helpful error, or nest the file
        raise IsADirectoryError(errno.EISDIR, "it is a folder", path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = aside(target)
    try:
        with open(temporary, "wb") as f:
            yield f
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def _is_stream(path: str) -> bool:
    """Whether ``path`` (its links followed) is there and neither a regular file nor a folder: a FIFO, a
    device, a socket, which are written into, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
