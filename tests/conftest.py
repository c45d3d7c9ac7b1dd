"""Shared fixtures: one local Ray instance for the whole session, and small image archives."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tests.imagefiles import write_bad_files


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """Start one real local Ray instance (2 CPUs) for every test that needs it; its GCS address lets
    subprocesses (``batchseg segment --address``) join it instead of starting their own."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def bad_files(tmp_path: pathlib.Path) -> dict[str, str | None]:
    return write_bad_files(tmp_path / "bad")
