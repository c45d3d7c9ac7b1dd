"""A full disk, for tests: a real one needs a mount (a small tmpfs), which a test may not make; here the
file that :mod:`batchseg.io.atomic` writes into fails as one on a full disk does."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from batchseg.io import atomic


class DiskFull:
    """A file on a full disk: it could be made (an inode: the issue's full disk left 66 empty temporaries),
    but every write fails with ENOSPC."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> DiskFull:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def fill_the_disk(monkeypatch: pytest.MonkeyPatch, bound_for: str = "") -> None:
    """From now on the files :mod:`batchseg.io.atomic` writes aside for a path ending with ``bound_for``
    are on a full disk: Python's own file, the lowest write batchseg makes, fails."""

    def open_on_a_full_disk(path: str, mode: str = "r") -> Any:
        f = open(path, mode)  # noqa: SIM115 (DiskFull closes it)
        destination = atomic.destination(str(path))
        return DiskFull(f) if destination is not None and destination.endswith(bound_for) else f

    monkeypatch.setattr(atomic, "open", open_on_a_full_disk, raising=False)
