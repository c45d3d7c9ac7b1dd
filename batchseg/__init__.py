"""batchseg: Mask R-CNN instance segmentation over very large image archives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchseg.analysis.results import Results

__version__ = "0.1.0"


def open_results(uri: str, storage_options: dict[str, Any] | None = None) -> Results:
    """Open a segmentation output for reading (see :mod:`batchseg.analysis.results`); imported lazily so that
    ``import batchseg`` stays light."""
    from batchseg.analysis.results import open_results as _open

    return _open(uri, storage_options)
