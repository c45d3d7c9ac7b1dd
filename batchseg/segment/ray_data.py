"""batchseg inside a Ray Data pipeline: a callable class for ``Dataset.map_batches``.

    import ray
    from batchseg.segment.ray_data import Segmenter

    ds = ray.data.read_parquet("s3://bucket/manifest.parquet")          # a ``uri`` column (and ``image_id``)
    rows = ds.map_batches(
        Segmenter,
        fn_constructor_kwargs={"weights": "DEFAULT", "score_threshold": 0.5},
        compute=ray.data.ActorPoolStrategy(size=4),
        num_gpus=1,
        batch_size=64,
    )
    rows.write_parquet("s3://bucket/rows/")                             # batchseg's row schema

Each actor holds one model; a batch gives one row per input row, in batchseg's schema (``SCHEMA``, then
the batch's columns named by ``keep_columns``), made by the same code as ``batchseg segment`` (its
:class:`~batchseg.segment.processor.ShardProcessor`). Ray Data gives no exactly-once output, resume or
completion records: for archives that must come out whole, ``batchseg segment`` is the tool. This module imports no Ray: Ray Data calls it.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa

from batchseg import log
from batchseg.errors import BatchsegError, ImageError
from batchseg.format.records import error_row, name_clashes, to_table
from batchseg.inference.models import resolve_weights
from batchseg.io.images import decode_image
from batchseg.io.loader import Loaded
from batchseg.io.manifest import ID_COLUMN, URI_COLUMN, Shard, default_image_id
from batchseg.options import check
from batchseg.segment.config import SegmentConfig
from batchseg.segment.processor import ShardProcessor

BYTES_COLUMN = "bytes"
# What Ray Data hands map_batches: a dict of numpy arrays (its default), a pandas DataFrame (a mapping of
# columns too) or, with batch_format="pyarrow", a table.
Batch: TypeAlias = dict[str, Any] | pa.Table


class Segmenter:
    """``Dataset.map_batches(Segmenter, fn_constructor_kwargs={...})``: batches with a ``uri`` column (read
    through fsspec, like a manifest's) or a ``bytes`` column of encoded images, and optionally
    ``image_id`` (default: the hash of the URI, or of the bytes), become batchseg rows. A batch is a dict
    of numpy arrays, a pandas DataFrame or a pyarrow Table. A null URI or bytes is that row's ``no_input``
    error (``uri`` ``""``; without an ``image_id``, a random one: there is nothing to hash).

    Keyword arguments are ``batchseg segment``'s options (see :class:`SegmentConfig`): ``model``,
    ``weights``, ``score_threshold``, ``mask_threshold``, ``min_size``, ``max_size``, ``max_instances``,
    ``tile``, ``tile_overlap``, ``max_pixels``, ``batch_size`` (images per forward pass), ``precision``, ``decode``, ``io_threads``,
    ``prefetch``, ``connect_timeout``, ``read_timeout``, ``storage_options``, ``keep_columns`` (the
    batch's columns to carry into the rows after batchseg's, with their types, as ``--keep-columns`` does;
    ``"all"``: every column but ``uri``, ``image_id`` and ``bytes``); plus ``device`` (default: ``cuda``
    when the actor has a GPU, else ``cpu``). They are checked when the actor starts.

    A failure that is no image's fault (a CUDA error: :class:`~batchseg.errors.DeviceError`; the model
    failing on most of a batch: :class:`~batchseg.errors.ModelFailed`; credentials the store refuses)
    raises, so Ray Data fails the batch's task rather than writing error rows for it.
    """

    def __init__(self, *, device: str | None = None, **options: Any) -> None:
        import torch

        log.in_ray_worker()  # its warnings reach the driver's terminal, as segment's actors' do
        if isinstance(options.get("keep_columns"), list):
            options["keep_columns"] = tuple(options["keep_columns"])
        config = SegmentConfig(manifest="", output="", **options)
        check(config)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        weights = resolve_weights(config.weights, config.model, config.io_options)
        self.processor = ShardProcessor(config, weights, device)

    def __call__(self, batch: Batch) -> pa.Table:
        # batch_format="pyarrow" hands a table: its columns, taken as a numpy or pandas batch's are
        columns = {n: batch.column(n) for n in batch.column_names} if isinstance(batch, pa.Table) else batch
        if URI_COLUMN not in columns and BYTES_COLUMN not in columns:
            raise BatchsegError(
                f"a batch for Segmenter needs a {URI_COLUMN!r} or {BYTES_COLUMN!r} column, not {list(columns)}"
            )
        kept = self._kept(columns)  # before any image is decoded or read: a batch without them is refused
        data = _values(columns[BYTES_COLUMN]) if BYTES_COLUMN in columns else None
        given_uris = _values(columns[URI_COLUMN]) if URI_COLUMN in columns else [None] * len(data or ())
        sources = given_uris if data is None else data  # what each image is read from
        given_ids = _values(columns[ID_COLUMN]) if ID_COLUMN in columns else [None] * len(sources)
        ids = [_image_id(i, source, data is not None) for i, source in zip(given_ids, sources, strict=True)]
        uris = ["" if _missing(uri) else str(uri) for uri in given_uris]
        # A null where the image should be fails its row alone, as a file that cannot be read does.
        null = ImageError(
            "no_input", f"{URI_COLUMN if data is None else BYTES_COLUMN!r} is null, nothing to read"
        )
        rows = {i: error_row(ids[i], uris[i], null) for i, source in enumerate(sources) if _missing(source)}
        present = [i for i in range(len(sources)) if i not in rows]
        if present:
            images = None if data is None else [self._decoded(bytes(data[i])) for i in present]
            shard = Shard(0, [ids[i] for i in present], [uris[i] for i in present])
            rows.update(zip(present, self.processor.rows(shard, images), strict=True))
        return to_table([rows[i] for i in range(len(sources))], kept)

    def _kept(self, batch: dict[str, Any]) -> pa.Table | None:
        """The batch's columns named by ``keep_columns``, as a table (None when none are kept)."""
        keep = self.processor.config.keep_columns
        names = list(batch)
        if keep == "all":
            keep = tuple(n for n in names if n not in (URI_COLUMN, ID_COLUMN, BYTES_COLUMN))
            clashes = name_clashes(keep)
            if clashes:
                raise BatchsegError(
                    f"keep_columns='all': the batch's column(s) {clashes}; rename them, or name the columns "
                    "to keep"
                )
        missing = [repr(name) for name in keep if name not in batch]
        if missing:
            raise BatchsegError(
                f"keep_columns: the batch has no column {', '.join(missing)} (it has: {', '.join(names)})"
            )
        return pa.table({name: _arrow(name, batch[name]) for name in keep}) if keep else None

    def _decoded(self, data: bytes) -> Loaded:
        try:
            return decode_image(data, self.processor.config.max_pixels)
        except ImageError as e:
            return e


def _values(column: Any) -> list[Any]:
    """A batch's column (numpy array, pandas Series or Arrow array) as Python values, nulls as None."""
    return column.to_pylist() if isinstance(column, pa.Array | pa.ChunkedArray) else list(column)


def _missing(value: Any) -> bool:
    """A null in a batch: None, or the NaN that pandas puts in a column of text."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _image_id(given: Any, source: Any, is_bytes: bool) -> str:
    """A row's image_id: the batch's, else a hash of its URI (:func:`default_image_id`) or of its bytes. A
    row with neither has no image to name: a random id of the same form, so that it shares none with
    another row."""
    if not _missing(given):
        return str(given)
    if _missing(source):
        return uuid.uuid4().hex[:16]
    return hashlib.sha1(bytes(source)).hexdigest()[:16] if is_bytes else default_image_id(str(source))


def _arrow(name: str, values: Any) -> pa.Array | pa.ChunkedArray:
    """A batch's column as Arrow: Ray Data hands a column of equal-length lists as one n-d array."""
    if isinstance(values, pa.Array | pa.ChunkedArray):  # a pyarrow batch's, with its type
        return values
    try:
        if isinstance(values, np.ndarray) and values.ndim > 1:
            return pa.array(list(values))
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise BatchsegError(f"keep_columns: column {name!r} has no Arrow type ({e})") from None
