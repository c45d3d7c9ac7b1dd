"""batchseg's messages to people, through the standard ``logging`` module under the ``batchseg`` logger.

Each module logs to its own child (``logging.getLogger(__name__)``): progress at INFO, warnings, and the
job-level error. A library user (``Segmenter``, ``open_results``) configures them as any other logger;
left unconfigured, Python prints warnings and errors alone. The processes batchseg runs itself (the
CLI, its Ray actors and Ray Train workers), and a job run from Python in a program that has not
configured logging (:func:`unless_configured`), print them on stderr as one line each, starting
``batchseg:`` (:func:`to_stderr`). ``--verbose`` (or ``BATCHSEG_DEBUG=1`` in the environment) also
prints what lies behind a job-level error: its chain of causes and their tracebacks. What batchseg prints
and records of a URI never holds its credentials (:func:`redact`).
"""

from __future__ import annotations

import logging
import os
import re
import sys

DEBUG_ENV = "BATCHSEG_DEBUG"
logger = logging.getLogger("batchseg")
_LEVELS = {"WARNING": "warning: ", "ERROR": "error: ", "CRITICAL": "error: "}  # progress has no word


REDACTED = "REDACTED"
# A URI's secrets: its user info (``https://user:password@host``), and each query parameter whose name says
# it is one: pre-signed URLs' X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, X-Goog-Signature,
# Azure SAS's ``sig``, AWSAccessKeyId, ``token``, ``api_key``, ``password``... A rule on the name, not a list.
_USER_INFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@?#\"']+@")
_SECRET_PARAMETER = re.compile(
    # a value ends at the next parameter, a space or a quote, or a colon that ends a message's URI ("...: ")
    r"([?&;][^=&#\s\"']*(?:sig|credential|token|secret|passw|key|auth)[^=&#\s\"']*=)(?:[^&#\s\"':]|:(?=\S))*",
    re.I,
)


def redact(text: str) -> str:
    """``text`` (a URI, or a message naming URIs) with the user info and secret-named query parameters of
    every URI in it replaced by ``REDACTED``: what batchseg prints (:func:`to_stderr`'s lines) and records
    (the job file and the provenance in each Parquet footer) of the manifest's, weights' and output's URIs.
    The URI itself, with its secrets, is still what batchseg reads and writes."""
    return _SECRET_PARAMETER.sub(rf"\1{REDACTED}", _USER_INFO.sub(rf"\1{REDACTED}@", text))


class _Lines(logging.Formatter):
    """``batchseg: <progress>``, ``batchseg: warning: <...>``, ``batchseg: error: <...>``; a traceback
    attached to the record comes before its line, so the line is what a terminal shows last."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"batchseg: {_LEVELS.get(record.levelname, '')}{record.getMessage()}"
        if record.exc_info:
            line = f"{self.formatException(record.exc_info)}\n{line}"
        return redact(line)


class _Stderr(logging.Handler):
    """Writes to ``sys.stderr`` as it is when a line is written (pytest's capture, a redirection), as
    ``print(file=sys.stderr)`` does, not to the one there was when the handler was made."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"{self.format(record)}\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def to_stderr() -> None:
    """Print batchseg's messages, progress and up, on stderr as the CLI does; once per process, however
    often it is called. They no longer go on to the root logger: Ray's ``LoggingConfig`` puts a handler
    there in the driver and every worker, which would print each one a second time."""
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Lines())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def unless_configured() -> None:
    """:func:`to_stderr`, unless the program has configured logging (a handler on the root logger or on
    ``batchseg``'s, or a level on ``batchseg``'s): a notebook that runs a job sees its progress as the CLI
    shows it, and a program with its own logging keeps it."""
    if not (_configured() or logging.getLogger().handlers):
        to_stderr()


def in_ray_worker() -> None:
    """:func:`to_stderr` in a Ray worker that batchseg's code runs in (Ray Data's ``Segmenter``), unless the
    ``batchseg`` logger itself was configured there (a ``worker_process_setup_hook``): Ray's own root
    handler in a worker lets only errors through, so a retry's warning would be lost."""
    if not _configured():
        to_stderr()


def _configured() -> bool:
    """Whether the ``batchseg`` logger was given a handler or a level."""
    return bool(logger.handlers) or logger.level != logging.NOTSET


def verbose() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def set_verbose() -> None:
    os.environ[DEBUG_ENV] = "1"


def error(error: BaseException) -> None:
    """A job-level error as one line; when verbose, its traceback and causes before it."""
    logger.error(str(error), exc_info=error if verbose() else None)
