"""Storage errors that may go away on their own, and trying those calls again.

Object stores fail now and then (5xx, throttling, timeouts, a restarting server): such transient errors
are retried with exponential backoff for up to ``BATCHSEG_RETRY_SECONDS`` (default 120 s) before they
count, each retry logged and counted. Written here rather than with tenacity: the same policy there needs
as much glue (the tally, the log line, :class:`StorageUnavailable` at the deadline) and costs 30 to 125 µs
a call against 1 µs, on every image read of a job that spends about 500 µs of CPU per image.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from batchseg.errors import StorageUnavailable

log = logging.getLogger(__name__)
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


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` may go away on its own (network, 5xx, throttling) rather than mean what it says."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if _refused_by_the_client(error):
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


def _refused_by_the_client(error: BaseException | None) -> bool:
    """Whether the HTTP client refused to send the request at all (a ValueError or TypeError behind the
    error, e.g. aiohttp's "Cannot combine AUTHORIZATION header with ... credentials encoded in URL" for an
    endpoint URL with user info): the configuration is wrong, and every try fails the same way. botocore
    wraps it in an ``HTTPClientError`` (otherwise transient) that keeps it as ``kwargs["error"]``."""
    while error is not None:
        if isinstance(error, (ValueError, TypeError)):
            return True
        behind = (
            getattr(error, "kwargs", {}).get("error") if type(error).__name__ == "HTTPClientError" else None
        )
        error = behind if isinstance(behind, BaseException) else error.__cause__
    return False


class _Tally:
    """A count that threads add to."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.count += 1


_RETRIES = _Tally()


def count() -> int:
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
