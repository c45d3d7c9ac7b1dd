"""SQL over a segmentation output with DuckDB: an ``images`` view (rows as written) and an ``instances``
view (one row per instance), over exactly the output's shard files (``Results`` lists them). Local
files go through DuckDB's own Parquet reader; object stores through a pyarrow dataset opened with
fsspec (so s3:// and S3-compatible endpoints work offline, without DuckDB's httpfs extension)."""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from batchseg.analysis.results import check_columns, open_results
from batchseg.errors import BatchsegError, first_line, job_errors
from batchseg.io import atomic, storage

FORMATS = ("table", "csv", "json", "parquet")
# --out's format when --format is left at "table", which prints and writes nothing.
FORMAT_OF_SUFFIX = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet",
                    ".pq": "parquet"}  # fmt: skip
BATCH_ROWS = 65_536
SHOWN_ROWS = 50


def connect(output: str, storage_options: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``images`` and ``instances`` over the output at ``output``."""
    results = open_results(output, storage_options)
    con = duckdb.connect()
    with job_errors(f"cannot read output {results.uri}"):
        if storage.is_local(results.fs):
            # DuckDB's own Parquet reader on exactly the output's shard files: parallel, and it skips files
            # and row groups by their statistics (a lookup by image_id reads one shard).
            rows = con.read_parquet([os.path.abspath(f) for f in results.files])
            check_columns(rows.columns, f"a shard of output {results.uri}")
            rows.create_view("batchseg_rows")
        else:  # object stores: through fsspec, as pyarrow scans it (lazily, with projection pushdown)
            con.register("batchseg_rows", results.dataset)
        con.execute("CREATE VIEW images AS SELECT * FROM batchseg_rows")
        # Each instance beside its image's columns (and the manifest's, kept with --keep-columns).
        image = ", ".join(
            [
                '"' + n.replace('"', '""') + '"'
                for n in ["image_id", "uri", "width", "height", *results.kept_columns]
            ]
        )
        con.execute(
            f"CREATE VIEW instances AS SELECT {image}, instance.* FROM "
            f"(SELECT {image}, UNNEST(instances) AS instance FROM batchseg_rows)"
        )
    return con


def ok_images(
    output: str,
    where: str | None = None,
    limit: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """The ``ok`` rows of ``output`` (as dicts, in output order) for which the SQL condition ``where`` on the
    ``images`` view holds, at most ``limit`` of them; streamed. A condition DuckDB rejects is a
    :class:`BatchsegError`, raised here, before the caller writes anything; one it cannot evaluate on some
    row is one too, raised while the rows stream."""
    if where is not None and not where.strip():
        raise BatchsegError(
            "--where is empty: give a condition on the images view, e.g. \"uri LIKE '%cat%'\""
        )
    if limit is not None and limit < 1:
        raise BatchsegError(f"--limit must be at least 1, not {limit}")
    con = connect(output, storage_options)

    def selected() -> duckdb.DuckDBPyRelation:
        # The relation's filter parses the condition as one expression: no text in it reaches past it, as
        # "true) OR (true" did inside "status = 'ok' AND (...)".
        ok = con.table("images").filter("status = 'ok'")
        return ok.filter(where) if where else ok

    what = "--where cannot be evaluated on the images view" if where else f"cannot read output {output}"
    rows = (row for batch in stream(selected, what, 256) for row in batch.to_pylist())
    # Not SQL's LIMIT, which refuses a number past 2**63: any whole number is a limit.
    return rows if limit is None else itertools.islice(rows, min(limit, sys.maxsize))


def run_query(
    output: str,
    sql: str,
    fmt: str = "table",
    out: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Run ``sql``; return a readable table (``fmt="table"``, the first rows) or write every row to ``out``
    as CSV, JSON Lines or Parquet, streaming (the result is never held whole). Returns what to print."""
    if fmt not in FORMATS:
        raise BatchsegError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if out is not None and fmt == "table":
        fmt = format_of_name(out) or ""
        if not fmt:
            raise BatchsegError(
                f"--out {out}: give --format csv, json or parquet (or a .csv, .jsonl or .parquet name)"
            )
    con = connect(output, storage_options)
    reader = stream(lambda: con.sql(sql), "query failed", BATCH_ROWS)
    if out is None and fmt == "table":
        return format_table(reader)
    if out is None:
        raise BatchsegError(f"--format {fmt} needs --out FILE")
    rows = write_whole(out, fmt, reader, storage_options)
    return f"{rows} rows written to {out} ({fmt})"


def format_of_name(out: str) -> str | None:
    """The format a file's name says (``.csv``, ``.jsonl``, ``.parquet``...: :data:`FORMAT_OF_SUFFIX`), or None."""
    return FORMAT_OF_SUFFIX.get(os.path.splitext(out.rstrip("/"))[1].lower())


def write_whole(
    out: str, fmt: str, reader: pa.RecordBatchReader, storage_options: dict[str, Any] | None = None
) -> int:
    """:func:`write_rows` into a file beside ``out``, renamed to ``out`` once complete: rows that fail
    halfway (a query's, a diff's) leave no half table, and no file, behind. Returns the rows written."""
    fs, path = storage.filesystem(out, storage_options)
    # the rows' own errors (BatchsegError) pass through as they are
    with job_errors(f"cannot write {out}"), atomic.open_whole(fs, path) as f:
        rows = write_rows(reader, fmt, f)
    return rows


def write_rows(reader: pa.RecordBatchReader, fmt: str, f: Any) -> int:
    """Write every batch of ``reader`` to the open binary file ``f`` as ``fmt`` (``csv``, ``json``: one
    object per line, or ``parquet``), streaming; returns the rows written. A CSV cell of a nested column
    (lists, structs: the instances) holds its value's JSON text."""
    rows = 0
    if fmt == "parquet":
        with pq.ParquetWriter(f, reader.schema, compression="zstd") as writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
    elif fmt == "csv":
        import pyarrow.csv as pcsv  # here: only CSV output needs it

        nested = [i for i, t in enumerate(reader.schema.types) if pa.types.is_nested(t)]
        schema = reader.schema
        for i in nested:
            schema = schema.set(i, pa.field(schema.field(i).name, pa.string()))
        with pcsv.CSVWriter(f, schema) as writer:
            for batch in reader:
                for i in nested:
                    batch = batch.set_column(i, schema.field(i), _json_text(batch.column(i)))
                writer.write_batch(batch)
                rows += batch.num_rows
    else:
        for batch in reader:
            f.write("".join(json.dumps(r, default=str) + "\n" for r in batch.to_pylist()).encode())
            rows += batch.num_rows
    return rows


def _json_text(column: pa.Array) -> pa.Array:
    return pa.array(
        [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()], pa.string()
    )


def stream(
    relation: Callable[[], duckdb.DuckDBPyRelation | None], what: str, batch_rows: int
) -> pa.RecordBatchReader:
    """The rows of the DuckDB relation ``relation()`` builds, streamed in batches of ``batch_rows``. Any error
    DuckDB meets is a :class:`BatchsegError` reading ``"<what>: <DuckDB's first line>"``, whether it meets it
    before the rows stream or while they do (it then comes through Arrow's stream as an ``OSError``); SQL
    with no statement that returns rows (empty, only comments) is one too."""
    try:
        built = relation()
        if built is None:
            raise BatchsegError(f"{what}: no statement that returns rows (e.g. SELECT ... FROM images)")
        reader = built.to_arrow_reader(batch_rows)
    except duckdb.Error as e:
        raise BatchsegError(f"{what}: {first_line(e)}") from e

    def batches() -> Iterator[pa.RecordBatch]:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (duckdb.Error, OSError) as e:
                raise BatchsegError(f"{what}: {first_line(e)}") from e
            yield batch

    return pa.RecordBatchReader.from_batches(reader.schema, batches())


def format_table(reader: pa.RecordBatchReader, limit: int = SHOWN_ROWS, width: int = 48) -> str:
    """The first ``limit`` rows as an aligned text table; long values are cut at ``width`` characters."""
    rows: list[dict[str, Any]] = []
    more = False
    for batch in reader:
        room = limit - len(rows)
        rows.extend(batch.slice(0, room).to_pylist())
        if batch.num_rows > room:
            more = True
            break
    names = reader.schema.names
    cells = [[_cell(r[n], width) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.append(f"({len(rows)} rows{'; more not shown: use --out FILE' if more else ''})")
    return "\n".join(lines)


def _cell(value: Any, width: int) -> str:
    if value is None:
        return "NULL"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"
