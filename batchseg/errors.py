"""The kinds of failure: job-level problems (stop before work), per-image problems (become rows), and
failures that are no image's fault (storage that stays unavailable or refuses the credentials, a failing
device, a model failing on most images: the shard is retried later); how they read, and the one wrapper
that turns any other error into a job-level one; a stop asked for by a signal."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class BatchsegError(Exception):
    """A job-level problem (bad config, unreadable manifest, unwritable output).

    Raised before any work starts; the CLI prints it as one line and exits non-zero. Its ``__cause__``
    (shown with ``--verbose``) is the error behind it, if any.
    """


class ImageError(Exception):
    """A per-image problem. It never stops the job: the image becomes an ``error`` row.

    ``kind`` is a short stable code (``not_found``, ``permission_denied``, ``read_error``,
    ``empty_file``, ``not_an_image``, ``corrupt_image``, ``too_large``, ``inference_error``,
    ``out_of_memory``, ``no_input``); the row's ``error`` column reads ``"<kind>: <message>"``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class StorageUnavailable(RuntimeError):
    """Storage kept failing with transient errors for the whole retry budget: the work is retried later
    (a shard is redone), never recorded as a bad image."""


class CredentialsRejected(StorageUnavailable):
    """The storage refused the credentials themselves (an expired or revoked session token, an unknown key,
    a wrong secret), not one object to them: no image's fault, so the shard fails and is retried later
    (refreshed credentials may pass), like an outage, rather than every image becoming a
    ``permission_denied`` row."""


class DeviceError(RuntimeError):
    """The accelerator failed (a CUDA error, cuDNN, a device-side assert): no image's fault. The shard
    fails and is never recorded, and the process ends, since a CUDA context that met such an error cannot
    be trusted again; a fresh process takes its place."""


class ModelFailed(RuntimeError):
    """The model failed on most of a shard's images (or of a batch's, retried one by one): the failure is
    the model's or the process's, not the images', so the shard fails and is retried later rather than
    recorded with those rows."""


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by ``signum`` (SIGTERM from Kubernetes, ``kill`` or a scheduler; SIGHUP
    when its terminal or ssh session goes): raised in the main thread by :func:`stop_on_signals`, so that
    the job ends as Ctrl-C ends it (every ``except KeyboardInterrupt`` and ``finally`` on the way runs)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The signals that ask a job to stop, besides Ctrl-C's SIGINT (which Python already raises).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def stop_on_signals() -> None:
    """From now on, SIGTERM and SIGHUP raise :class:`Stopped` in the main thread (their default is to end
    the process at once, with no cleanup and no word). The CLI installs this first thing; Python lets only
    the main thread install handlers (a CLI called from another thread keeps the process's own)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stopped)


def stopped_by(interrupt: KeyboardInterrupt) -> int:
    """The signal behind ``interrupt``: a :class:`Stopped`'s, else the last one :func:`stop_on_signals`
    handled (Ray's ``ray.get`` turns the exception a handler raised into a plain KeyboardInterrupt), else
    SIGINT (Ctrl-C)."""
    if isinstance(interrupt, Stopped):
        return interrupt.signum
    return _received[-1] if _received else signal.SIGINT


_received: list[int] = []  # the stop signals handled so far, in order


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise Stopped(signum)


def describe(error: BaseException) -> str:
    """An error in words for a job-level message (the caller names the URI or the step)."""
    if isinstance(error, PermissionError):
        return "access denied (check the credentials and what they may read and write)"
    if isinstance(error, FileNotFoundError):
        return "not found (does its folder or bucket exist?)"
    if isinstance(error, StorageUnavailable):
        return first_line(error)
    return f"{type(error).__name__}: {first_line(error)}"


def first_line(error: BaseException) -> str:
    """An error's message, its first line only: DuckDB's and others' go on with lines of context, and a
    job-level message is one line (``--verbose`` shows the whole error)."""
    return (str(error).strip().splitlines() or [""])[0]


@contextlib.contextmanager
def job_errors(what: str) -> Iterator[None]:
    """Inside, any error becomes a :class:`BatchsegError` reading ``"<what>: <the error in words>"``, with
    the error kept as its cause; a ``BatchsegError`` passes through as it is."""
    try:
        yield
    except BatchsegError:
        raise
    except Exception as e:
        raise BatchsegError(f"{what}: {describe(e)}") from e
