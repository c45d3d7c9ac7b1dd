"""Reading a segmentation output from Python: Arrow and pandas access, images with decoded masks, filters.

import batchseg
results = batchseg.open_results("s3://bucket/results/")
for image in results.images(category="person", min_score=0.8):
    masks = image.masks()          # N x H x W bool, one per kept instance
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchseg.errors import BatchsegError, job_errors
from batchseg.format.output import SHARD_NAMES, OutputDir
from batchseg.format.records import NEWER_COLUMNS, SCHEMA, output_schema, read_provenance
from batchseg.format.rle import decode_rle
from batchseg.io import retries


@dataclass(frozen=True)
class ImageResult:
    """One output row. ``instances`` are dicts with the fields of ``batchseg.format.records.INSTANCE``."""

    image_id: str
    uri: str
    width: int | None
    height: int | None
    status: str
    error: str | None
    instances: list[dict[str, Any]]
    kept: dict[str, Any] = field(default_factory=dict)  # the manifest columns kept with --keep-columns

    def mask(self, index: int) -> np.ndarray:
        """Instance ``index``'s mask: ``height x width`` bool (pixels of the image as displayed)."""
        rle = self.instances[index]["rle"]
        if rle is None or self.height is None or self.width is None:
            raise ValueError(f"instance {index} of {self.image_id} has no mask (a box-only model?)")
        return decode_rle(rle, self.height, self.width)

    def masks(self) -> np.ndarray:
        """All instance masks stacked: ``N x height x width`` bool (``0 x H x W`` when there are none)."""
        if not self.instances:
            return np.zeros((0, self.height or 0, self.width or 0), dtype=bool)
        return np.stack([self.mask(i) for i in range(len(self.instances))])


class Results:
    """A segmentation output (local or any fsspec URI): the one reader of its Parquet objects.

    Every tool that reads rows opens the output here: ``query`` and ``render`` (through :attr:`dataset`),
    ``export-coco``, ``eval``, ``report`` and the demo (through :meth:`batches` and :meth:`images`).
    ``uri`` is the output folder/prefix, or one Parquet file of rows. Raises :class:`BatchsegError` when
    it cannot be listed, or holds no rows' objects unless ``allow_empty``.
    """

    def __init__(
        self, uri: str, storage_options: dict[str, Any] | None = None, *, allow_empty: bool = False
    ) -> None:
        self.output = OutputDir(uri, storage_options)
        self.uri = self.output.uri
        self.fs = self.output.fs
        with job_errors(f"cannot read output {self.uri}"):
            self.files = self._list()
        if not self.files and not allow_empty:
            raise BatchsegError(
                f"output {self.uri} holds no {SHARD_NAMES} files: not a batchseg segment output"
            )

    @functools.cached_property
    def dataset(self) -> Any:
        """The rows as a ``pyarrow.dataset.Dataset`` over exactly the output's shard files."""
        # Imported here: pyarrow.dataset loads pandas (0.2 s), which a SQL query on local files never needs.
        import pyarrow.dataset as ds

        return ds.dataset(self.files, format="parquet", filesystem=self.fs, schema=self.schema)

    @functools.cached_property
    def schema(self) -> pa.Schema:
        """The rows' columns: batchseg's (:data:`~batchseg.format.records.SCHEMA`), then the manifest
        columns the run kept (``--keep-columns``), as its first shard has them."""
        kept = [f for f in self._first_schema if f.name not in SCHEMA.names]
        return output_schema(pa.schema(kept))

    @property
    def kept_columns(self) -> list[str]:
        """The names of the manifest columns the run kept (``--keep-columns``)."""
        return self.schema.names[len(SCHEMA) :]

    @functools.cached_property
    def _first_schema(self) -> pa.Schema:
        if not self.files:
            return SCHEMA
        with job_errors(f"cannot read shard {self.files[0]}"), self.fs.open(self.files[0], "rb") as f:
            return pq.read_schema(f)

    def _list(self) -> list[str]:
        """Exactly batchseg's shard objects (another tool's ``part-*.parquet`` beside them is not read)."""
        path = self.output.path
        if path.endswith(".parquet") and retries.retrying(lambda: self.fs.isfile(path), "listing"):
            return [path]
        return [o.path for o in self.output.shard_objects()]

    def __len__(self) -> int:
        with job_errors(f"cannot read output {self.uri}"):
            return int(self.dataset.count_rows())

    def batches(self, columns: list[str] | None = None, batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
        """Every row in output order, streamed file by file in record batches of ``columns`` (all when
        None): memory stays one batch, whatever the output's size."""
        for path in self.files:
            with job_errors(f"cannot read shard {path}"), self.fs.open(path, "rb") as f:
                shard = pq.ParquetFile(f)
                check_columns(shard.schema_arrow.names, f"shard {path}")
                yield from shard.iter_batches(batch_size=batch_size, columns=columns)

    def read_file(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """One of :attr:`files` whole, ``columns`` of it (all when None): the unit that a join of two
        outputs (``batchseg diff``) reads at a time, a shard's rows being few."""
        with job_errors(f"cannot read shard {path}"), self.fs.open(path, "rb") as f:
            shard = pq.ParquetFile(f)
            check_columns(shard.schema_arrow.names, f"shard {path}")
            return shard.read(columns=columns)

    @property
    def summary(self) -> dict[str, Any] | None:
        """``_summary.json`` of the run that wrote the output (None if the run never finished, or ``uri`` is
        one Parquet file)."""
        if self.files == [self.output.path]:
            return None
        return self.output.read_summary()

    @property
    def provenance(self) -> dict[str, Any]:
        """Model, weights, thresholds and sizes the output was made with (from its first file; ``{}``
        when it has none)."""
        return read_provenance(self._first_schema) if self.files else {}

    def to_table(self, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
        """The rows as an Arrow table (``filter``: a ``pyarrow.dataset`` expression, e.g.
        ``pc.field("status") == "error"``)."""
        with job_errors(f"cannot read output {self.uri}"):
            return self.dataset.to_table(columns=columns, filter=filter)

    def to_pandas(self, columns: list[str] | None = None, filter: Any = None) -> Any:
        return self.to_table(columns, filter).to_pandas()

    def images(
        self,
        *,
        status: str | None = None,
        category: str | list[str] | None = None,
        min_score: float = 0.0,
        batch_size: int = 1024,
    ) -> Iterator[ImageResult]:
        """Stream the images in output order. ``status`` keeps rows with that status; ``category`` and
        ``min_score`` keep the instances that match and drop images left with none of them."""
        import pyarrow.compute as pc  # here, not at the top: a SQL query's start does not need it

        wanted = {category} if isinstance(category, str) else set(category) if category else None
        kept = self.kept_columns
        for batch in self.batches(batch_size=batch_size):
            if status:
                batch = batch.filter(pc.equal(batch.column("status"), status))
            for row in batch.to_pylist():
                instances = row["instances"] or []
                if wanted is not None or min_score > 0:
                    instances = [
                        i
                        for i in instances
                        if i["score"] >= min_score and (wanted is None or i["category"] in wanted)
                    ]
                    if not instances:
                        continue
                yield ImageResult(
                    row["image_id"],
                    row["uri"],
                    row["width"],
                    row["height"],
                    row["status"],
                    row["error"],
                    instances,
                    {name: row.get(name) for name in kept},
                )


def check_columns(names: list[str], shard: str) -> None:
    """Refuse a ``part-NNNNNN.parquet`` another tool wrote (``shard`` names it in the message): it lacks
    columns of :data:`~batchseg.format.records.SCHEMA`."""
    missing = [name for name in SCHEMA.names if name not in names and name not in NEWER_COLUMNS]
    if missing:
        raise BatchsegError(f"{shard} is not a batchseg shard: it has no column {', '.join(missing)}")


def open_results(
    uri: str, storage_options: dict[str, Any] | None = None, *, allow_empty: bool = False
) -> Results:
    """Open the output of ``batchseg segment`` at ``uri`` (local path or any fsspec URI)."""
    return Results(uri, storage_options, allow_empty=allow_empty)
