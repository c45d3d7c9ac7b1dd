"""batchseg's messages to people: one line each on stderr, starting ``batchseg:``.

Progress, warnings and the one-line job-level error all go through here. ``--verbose`` (or
``BATCHSEG_DEBUG=1`` in the environment) also prints what lies behind a job-level error: its chain
of causes and their tracebacks.
"""

from __future__ import annotations

import os
import sys
import traceback

DEBUG_ENV = "BATCHSEG_DEBUG"


def info(message: str) -> None:
    print(f"batchseg: {message}", file=sys.stderr, flush=True)


def warning(message: str) -> None:
    info(f"warning: {message}")


def verbose() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def set_verbose() -> None:
    os.environ[DEBUG_ENV] = "1"


def error(error: BaseException) -> None:
    """A job-level error as one line; when verbose, its traceback and causes before it."""
    if verbose():
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    info(f"error: {error}")
