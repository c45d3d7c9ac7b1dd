"""The output contract: one row per manifest row, its Arrow schema, and Parquet bytes with provenance."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchseg.errors import ImageError

INSTANCE = pa.struct(
    [
        pa.field("category_id", pa.int32()),
        pa.field("category", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("bbox", pa.list_(pa.float32())),  # [x, y, width, height] in pixels (COCO)
        pa.field("area", pa.int64()),  # mask pixels; box area for box-only models
        pa.field("rle", pa.string()),  # COCO compressed RLE counts; null for box-only models
        pa.field("keypoints", pa.list_(pa.float32())),  # x, y, v triplets; null unless keypoint model
    ]
)

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32()),  # as displayed, after EXIF orientation
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # "ok" or "error"
        pa.field("error", pa.string()),  # "<kind>: <message>", null when ok
        pa.field("instances", pa.list_(INSTANCE)),  # null on error rows, [] when nothing was found
        # Where a geo-referenced TIFF read with --tile lies on the map (io.windowed.Geo): pixel (col, row)
        # -> map (x, y) in GDAL's order x0, dx, rx, y0, ry, dy; and its CRS, e.g. "EPSG:32633". Else null.
        pa.field("geo_transform", pa.list_(pa.float64())),
        pa.field("crs", pa.string()),
    ]
)
# Columns that outputs of an older batchseg lack: readers take a shard without them as one whose rows
# have them null.
NEWER_COLUMNS = ("geo_transform", "crs")
METADATA_KEY = b"batchseg"
# Names a kept manifest column may not have: the row's own columns, and the instance fields the
# ``instances`` view puts beside it.
RESERVED_NAMES = frozenset(SCHEMA.names) | frozenset(f.name for f in INSTANCE)


def name_clashes(names: Sequence[str]) -> str:
    """What is wrong with these ``--keep-columns`` names ("" when nothing): those that are batchseg's own
    columns, or each other's, ignoring case, since DuckDB (``batchseg query``) and Spark read column names
    without it: a kept ``Category`` would be what ``instances.category`` returns."""
    reserved = {name.lower() for name in RESERVED_NAMES}
    own = [name for name in names if name.lower() in reserved]
    spellings: dict[str, list[str]] = {}
    for name in names:
        if name.lower() not in reserved:
            spellings.setdefault(name.lower(), []).append(name)
    twice = [name for same in spellings.values() if len(same) > 1 for name in same]
    problems = (
        [f"{', '.join(own)} clash with batchseg's own columns (the row's and the instances')"] if own else []
    )
    problems += [f"{', '.join(twice)} clash with each other"] if twice else []
    return f"{' and '.join(problems)}, ignoring case (as SQL reads column names)" if problems else ""


def output_schema(kept: pa.Schema | None = None) -> pa.Schema:
    """The rows' schema: :data:`SCHEMA`, then the manifest columns kept with ``--keep-columns``."""
    return pa.schema([*SCHEMA, *(kept or [])])


def ok_row(
    image_id: str, uri: str, width: int, height: int, instances: list[dict[str, Any]]
) -> dict[str, Any]:
    """An image's row, without a map placement (the segment processor adds one where it has it)."""
    return {
        "image_id": image_id,
        "uri": uri,
        "width": width,
        "height": height,
        "status": "ok",
        "error": None,
        "instances": instances,
        "geo_transform": None,
        "crs": None,
    }


def error_row(
    image_id: str, uri: str, error: ImageError, size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The single way a failed image becomes a row: status ``error`` and ``"<kind>: <message>"``."""
    width, height = size if size else (None, None)
    return {
        "image_id": image_id,
        "uri": uri,
        "width": width,
        "height": height,
        "status": "error",
        "error": str(error),
        "instances": None,
        "geo_transform": None,
        "crs": None,
    }


def error_kind(error: str) -> str:
    """The kind code at the start of an error row's message."""
    return error.split(":", 1)[0]


def to_table(rows: Sequence[dict[str, Any]], kept: pa.Table | None = None) -> pa.Table:
    """Rows as a table of :func:`output_schema`: ``kept`` holds the manifest columns kept for them (one
    row each, in order), which follow batchseg's own."""
    table = pa.Table.from_pylist(list(rows), schema=SCHEMA)
    if kept is not None:
        for field, column in zip(kept.schema, kept.columns, strict=True):
            table = table.append_column(field, column)
    return table


def to_parquet(
    rows: Sequence[dict[str, Any]], provenance: dict[str, Any], kept: pa.Table | None = None
) -> bytes:
    """One shard as Parquet bytes (:func:`to_table`), with ``provenance`` as JSON under the file's
    ``batchseg`` metadata key."""
    table = to_table(rows, kept).replace_schema_metadata(
        {METADATA_KEY: json.dumps(provenance, sort_keys=True).encode()}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_provenance(schema: pa.Schema) -> dict[str, Any]:
    return json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))
