"""Shared fixtures: one local Ray instance and one real S3 server for the whole session, and image files."""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from batchseg import log
from tests.imagefiles import write_bad_files
from tests.s3server import S3Server, running_s3

# The suite's time budget guards itself: a test gets TIMEOUT seconds (pyproject.toml), one marked slow
# SLOW_TIMEOUT, and no test may ask for more than its budget with its own timeout marker.
TIMEOUT, SLOW_TIMEOUT = 120, 300
ROOT = pathlib.Path(__file__).resolve().parents[1]

# Ray Train's controller polls its workers every 2 s by default and takes one report from each per poll; a
# worker's second report waits for the first to be taken (a queue of one). A test run checkpoints every
# second or so: 15 checkpoints cost 30 s of waiting, and each end and each lost worker waits for the next
# poll. Ray Train passes this setting on to its controllers and workers; the multi-node cluster's process
# (tests/multinode.py) inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``pytest -n 2`` (README's test command) sends each module's tests to one worker, so its fixtures are
    made once, and the modules with tests on the session's Ray in two groups (:data:`RAY_GROUPS`), each to
    one worker, so that each worker starts one Ray for its group (and the S3 server once). With one Ray
    for them all, that worker ran Ray's tests one after another for minutes after the other had finished.
    pytest-xdist's ``--dist loadgroup`` would say this with marks, but it renames tests in a way pytest 9
    no longer reads."""
    from xdist.scheduler import LoadScopeScheduling

    class RayGroups(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return _ray_group(module) or module

    return RayGroups(config, log)


# About half of the Ray tests' time each: segmenting, and training (which the S3 tests, mostly
# segmenting on S3, even out). A module not named here that uses the session's Ray joins the first.
RAY_GROUPS = {
    "ray-train": ("tests/test_train.py", "tests/test_train_elastic.py", "tests/test_train_parquet.py", "tests/test_s3.py"),
}  # fmt: skip


@functools.cache
def _ray_group(module: str) -> str | None:
    """The group of a test module (path from the root) that uses the session's Ray, else None."""
    if "ray_address" not in (ROOT / module).read_text():
        return None
    return next((group for group, modules in RAY_GROUPS.items() if module in modules), "ray-segment")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _leave_out_gpu_tests(config, items)
    for item in items:
        slow = item.get_closest_marker("slow") is not None
        budget = SLOW_TIMEOUT if slow else TIMEOUT
        own = item.get_closest_marker("timeout")
        if own is None:
            if slow:
                item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
            continue
        seconds = own.args[0] if own.args else own.kwargs.get("timeout", 0)
        if not 0 < seconds <= budget:
            raise pytest.UsageError(
                f"{item.nodeid} asks for a {seconds} s timeout: over its budget of {budget} s"
                f"{'' if slow else ' (300 s if marked slow)'}"
            )


def _leave_out_gpu_tests(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run where CUDA is (``pytest -m gpu`` on a lent GPU machine); elsewhere they are
    deselected and counted as such, never reported as skipped or passed."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    config.hook.pytest_deselected(items=gpu)
    items[:] = [item for item in items if item.get_closest_marker("gpu") is None]


@pytest.fixture(scope="session", autouse=True)
def messages_on_stderr() -> None:
    """batchseg's messages printed as the CLI prints them (``batchseg: ...`` on stderr), also for the tests
    that call the library and read them; tests/test_log.py checks what an unconfigured library prints."""
    log.to_stderr()


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """Start one real local Ray instance (2 CPUs) for every test that needs it; its GCS address lets
    subprocesses (``batchseg segment --address``) join it instead of starting their own. Always a new one
    (``local``): without an address, ``ray.init`` joins the latest cluster ``ray start`` (or a multi-node
    test) started on this machine, and refuses ``num_cpus`` for it."""
    import ray

    context = ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def bad_files(tmp_path: pathlib.Path) -> dict[str, str | None]:
    return write_bad_files(tmp_path / "bad")


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running S3 server with buckets ``data`` and ``out``, stopped at the end of the session."""
    with running_s3(tmp_path_factory.mktemp("s3"), ("data", "out")) as server:
        yield server


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread, as each training worker runs it: on 2 busy cores two threads per process spin
    against each other (the overfit test took 204 s on two threads and 39 s on one, beside 4 other suites)."""
    import torch  # here: the read side's tests load no torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
