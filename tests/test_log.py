"""batchseg's messages go through ``logging``: a library user sees what Python shows by default or what they
configure, each message once; the CLI's processes print one ``batchseg:`` line each, once, even where Ray
has put a handler on the root logger."""

from __future__ import annotations

import subprocess
import sys

import pytest

from batchseg import log

# A real retry's warning (batchseg.io.retries) and a progress line of the scheduler (batchseg.segment...).
MESSAGES = """
import logging
from batchseg.io import retries
retries.Backoff("reading x.jpg", 60).after(TimeoutError("no answer"))
logging.getLogger("batchseg.segment.scheduling").info("10/20 images")
"""


def stderr_of(setup: str) -> str:
    """What a fresh interpreter prints on stderr for :data:`MESSAGES` after ``setup``."""
    code = f"{setup}\n{MESSAGES}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_unconfigured_python_shows_the_warning_once_and_no_progress() -> None:
    assert stderr_of("") == "reading x.jpg: TimeoutError: no answer; retrying in 0.5 s\n"


def test_a_library_user_configures_batchseg_as_any_logger() -> None:
    setup = "import logging; logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')"
    assert stderr_of(setup).splitlines() == [
        "WARNING batchseg.io.retries: reading x.jpg: TimeoutError: no answer; retrying in 0.5 s",
        "INFO batchseg.segment.scheduling: 10/20 images",
    ]


def test_the_cli_format_prints_each_message_once_beside_a_root_handler() -> None:
    """Ray's ``LoggingConfig`` gives the root logger a stderr handler in the driver and in each worker."""
    setup = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from batchseg import log; log.to_stderr(); log.to_stderr()"
    )
    assert stderr_of(setup).splitlines() == [
        "batchseg: warning: reading x.jpg: TimeoutError: no answer; retrying in 0.5 s",
        "batchseg: 10/20 images",
    ]


def test_a_job_run_from_python_shows_its_progress_unless_logging_is_configured() -> None:
    """``run_segment`` and ``run_training`` call ``log.unless_configured()`` first: long work shows progress
    in a notebook, and a program with its own logging keeps it."""
    job = "from batchseg import log; log.unless_configured()"
    assert stderr_of(job).splitlines() == [
        "batchseg: warning: reading x.jpg: TimeoutError: no answer; retrying in 0.5 s",
        "batchseg: 10/20 images",
    ]
    configured = "import logging; logging.basicConfig(level=logging.WARNING, format='%(name)s %(message)s')\n"
    assert stderr_of(configured + job).splitlines() == [
        "batchseg.io.retries reading x.jpg: TimeoutError: no answer; retrying in 0.5 s"
    ]


def test_segmenter_in_a_ray_worker_shows_warnings_beside_rays_root_handler() -> None:
    """Ray's root handler in a worker lets only errors through: ``Segmenter`` calls ``log.in_ray_worker()``,
    so a retry's warning still reaches the driver, unless ``batchseg``'s own logger was configured there."""
    ray_like = "import logging; logging.basicConfig(level=logging.ERROR)\n"
    worker = "from batchseg import log; log.in_ray_worker()"
    assert stderr_of(ray_like + worker).splitlines() == [
        "batchseg: warning: reading x.jpg: TimeoutError: no answer; retrying in 0.5 s",
        "batchseg: 10/20 images",
    ]
    own = ray_like + "logging.getLogger('batchseg').setLevel(logging.ERROR)\n"
    assert stderr_of(own + worker) == ""


@pytest.mark.parametrize(
    ("uri", "redacted"),
    [
        ("https://u:p@host/m.csv", "https://REDACTED@host/m.csv"),
        ("s3://bucket/a@b.jpg", "s3://bucket/a@b.jpg"),  # an @ in a path is no user info
        (  # AWS SigV4 (and SigV2's AWSAccessKeyId/Signature), GCS, Azure SAS, tokens and keys; the rest kept
            "https://h/k?X-Amz-Date=1&X-Amz-Credential=AK%2F1&X-Amz-Security-Token=t&X-Amz-Signature=s",
            "https://h/k?X-Amz-Date=1&X-Amz-Credential=REDACTED&X-Amz-Security-Token=REDACTED"
            "&X-Amz-Signature=REDACTED",
        ),
        (
            "https://h/k?AWSAccessKeyId=A&Signature=s&Expires=9",
            "https://h/k?AWSAccessKeyId=REDACTED&Signature=REDACTED&Expires=9",
        ),
        (
            "gs://b/k?X-Goog-Credential=c&X-Goog-Signature=s",
            "gs://b/k?X-Goog-Credential=REDACTED&X-Goog-Signature=REDACTED",
        ),
        (
            "https://a.blob.core.windows.net/c/k?sv=2022&sig=s%2B&se=2",
            "https://a.blob.core.windows.net/c/k?sv=2022&sig=REDACTED&se=2",
        ),
        (
            "cannot open manifest http://h/m?token=t&api_key=k: 403",
            "cannot open manifest http://h/m?token=REDACTED&api_key=REDACTED: 403",
        ),
    ],
)
def test_redact_hides_user_info_and_secret_query_parameters(uri: str, redacted: str) -> None:
    assert log.redact(uri) == redacted
