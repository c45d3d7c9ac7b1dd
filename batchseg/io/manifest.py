"""Read an image manifest as a stream of (image_id, uri) batches, validate it, and split it into shards.

A manifest is a Parquet, CSV or JSON Lines file with a ``uri`` column (and optionally ``image_id`` and
columns to carry into the output rows, ``--keep-columns``), a text file with one URI per line, or a
folder/prefix meaning every image file under it. Nothing here holds the whole manifest in memory: rows
stream through in pyarrow batches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from batchseg.errors import BatchsegError, job_errors
from batchseg.io import retries, storage
from batchseg.io.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

URI_COLUMN = "uri"
ID_COLUMN = "image_id"
TEXT_BATCH_ROWS = 65_536
TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv"}
TABLE_SUFFIXES |= {".jsonl": "json", ".ndjson": "json", ".json": "json"}
Keep = tuple[str, ...] | Literal["all"]
"""Manifest columns to carry into each output row: these names, or ``"all"`` but ``uri`` and ``image_id``."""


def default_image_id(uri: str) -> str:
    """The image_id of a row that has none: a stable 64-bit hash of its URI, as 16 hex digits."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]


def absolute_uri(uri: str) -> str:
    """A local path made absolute (Ray workers need not share the driver's working directory)."""
    return uri if "://" in uri else os.path.abspath(uri)


@dataclass(frozen=True)
class Shard:
    """One unit of work, retry and resume: consecutive manifest rows ``[start, start + len)``."""

    index: int
    image_ids: list[str]
    uris: list[str]
    columns: pa.Table | None = None  # the manifest columns kept for the output rows, a row per image

    @property
    def fingerprint(self) -> str:
        """What the shard's rows are (see :func:`shard_fingerprint`), kept in its completion record."""
        return shard_fingerprint(self.image_ids, self.uris, self.columns)

    def __len__(self) -> int:
        return len(self.uris)


def shard_fingerprint(image_ids: list[str], uris: list[str], columns: pa.Table | None = None) -> str:
    """A digest of a shard's rows, its image ids and URIs (and kept columns) in order: a rerun keeps a
    finished shard whose rows still have this fingerprint and redoes one whose rows changed."""
    digest = hashlib.sha256("\n".join(image_ids).encode())
    digest.update(b"\0")
    digest.update("\n".join(uris).encode())
    if columns is not None and columns.num_columns:
        digest.update(repr((columns.schema, columns.to_pydict())).encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Plan:
    """What a pass over the manifest found: its row count and the fingerprint of each shard's rows
    (:func:`shard_fingerprint`)."""

    manifest: str
    num_rows: int
    shard_size: int
    shard_fingerprints: tuple[str, ...] = ()
    columns: pa.Schema = field(default_factory=lambda: pa.schema([]))  # kept manifest columns, typed

    @property
    def keep(self) -> tuple[str, ...]:
        return tuple(self.columns.names)

    @property
    def fingerprint(self) -> str:
        """A digest of every (image_id, uri) row, in order."""
        return hashlib.sha256("".join(self.shard_fingerprints).encode()).hexdigest()

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def rows_in(self, shards: frozenset[int]) -> int:
        """How many manifest rows the shards with these indices hold (the last shard may be short)."""
        last = self.num_shards - 1
        return sum(self.num_rows - last * self.shard_size if i == last else self.shard_size for i in shards)


def iter_manifest(
    manifest: str, storage_options: dict[str, Any] | None = None
) -> Iterator[tuple[list[str], list[str]]]:
    """Stream ``(image_ids, uris)`` in manifest order; relative URIs resolve against the manifest's folder."""
    for ids, uris, _ in iter_rows(manifest, storage_options):
        yield ids, uris


def iter_rows(
    manifest: str, storage_options: dict[str, Any] | None = None, keep: Keep = (), say_skipped: bool = False
) -> Iterator[tuple[list[str], list[str], pa.Table | None]]:
    """Stream ``(image_ids, uris, kept columns)`` in manifest order: the kept columns (``keep``) as a table
    of the batch's rows (None when none are kept) with the manifest's types, strings from CSV files. A
    folder's files that systems leave beside images are skipped (said in one line with ``say_skipped``)."""
    manifest = absolute_uri(manifest)
    fs, path = storage.filesystem(manifest, storage_options)
    with job_errors(f"cannot open manifest {manifest}"):
        is_dir = manifest.endswith("/") or retries.retrying(lambda: fs.isdir(path), f"opening {manifest}")
        if not is_dir and not retries.retrying(lambda: fs.exists(path), f"opening {manifest}"):
            raise BatchsegError(f"manifest {manifest} does not exist")
    if is_dir:
        if keep and keep != "all":
            raise BatchsegError(
                f"--keep-columns {','.join(keep)}: manifest {manifest} is a folder; it has no columns to keep"
            )
        for ids, uris in _iter_folder(fs, path, manifest, say_skipped):
            yield ids, uris, None
        return
    base = storage.parent(manifest)
    kind = TABLE_SUFFIXES.get(_suffix(path))
    row = 0
    what = kind.upper() if kind else "a text file of URIs"
    with job_errors(f"cannot read manifest {manifest} as {what}"):
        batches = _iter_table(fs, path, kind, keep, manifest) if kind else _iter_lines(fs, path)
        for batch in batches:
            ids, uris = _validate(batch, manifest, row)
            resolved = [u if "://" in u or u.startswith("/") else storage.join(base, u) for u in uris]
            yield ids or [default_image_id(u) for u in uris], resolved, _kept(batch, keep, manifest)
            row += len(uris)


def _kept(batch: pa.RecordBatch, keep: Keep, manifest: str) -> pa.Table | None:
    """The batch's columns named by ``keep``, as a table; None when nothing is kept."""
    names = batch.schema.names
    if keep == "all":
        keep = tuple(n for n in names if n not in (URI_COLUMN, ID_COLUMN))
    if not keep:
        return None
    _refuse_missing(keep, names, manifest)
    return pa.Table.from_batches([batch.select(list(keep))])


def _refuse_missing(keep: tuple[str, ...], names: list[str], manifest: str) -> None:
    missing = [name for name in keep if name not in names]
    if missing:
        raise BatchsegError(
            f"--keep-columns: manifest {manifest} has no column {', '.join(map(repr, missing))} "
            f"(it has: {', '.join(names)})"
        )


def _suffix(path: str) -> str:
    if path.startswith(("http://", "https://")):  # a URL's query (a pre-signed URL's signature) is no name
        path = urllib.parse.urlsplit(path).path
    name = path.lower().removesuffix(".gz")
    return os.path.splitext(name)[1]


def _iter_table(fs: Any, path: str, kind: str, keep: Keep, manifest: str) -> Iterator[pa.RecordBatch]:
    with fs.open(path, "rb", compression="infer") as f:
        if kind == "parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if keep != "all":
                _refuse_missing(keep, names, manifest)
            wanted = names if keep == "all" else (URI_COLUMN, ID_COLUMN, *keep)
            columns = [c for c in wanted if c in names] or names
            yield from parquet.iter_batches(columns=columns)
        elif kind == "csv":
            import pyarrow.csv as pcsv

            delimiter = "\t" if _suffix(path) == ".tsv" else ","
            # Every column as text: ids and URIs are text, and kept columns reach the rows as written.
            types = dict.fromkeys([*_csv_header(fs, path, delimiter), URI_COLUMN, ID_COLUMN], pa.string())
            yield from pcsv.open_csv(
                f,
                parse_options=pcsv.ParseOptions(delimiter=delimiter),
                convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=True),
            )
        else:
            import pyarrow.json as pjson

            yield from pjson.open_json(f)


def _csv_header(fs: Any, path: str, delimiter: str) -> list[str]:
    import csv

    with fs.open(path, "rt", compression="infer", encoding="utf-8-sig", newline="") as f:
        return next(csv.reader(f, delimiter=delimiter), [])


def _iter_lines(fs: Any, path: str) -> Iterator[pa.RecordBatch]:
    with fs.open(path, "rt", compression="infer", encoding="utf-8") as f:
        lines: list[str] = []
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
            if len(lines) == TEXT_BATCH_ROWS:
                yield pa.record_batch({URI_COLUMN: lines})
                lines = []
        if lines:
            yield pa.record_batch({URI_COLUMN: lines})


# Files that operating systems leave beside images, never images themselves: macOS's AppleDouble
# ``._photo.jpg`` (the resource fork of ``photo.jpg``, written on disks that are not a Mac's) and
# ``.DS_Store``, Windows' ``Thumbs.db`` and ``desktop.ini``.
SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})


def _is_system_file(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith("._") or name.lower() in SYSTEM_FILES


def _iter_folder(
    fs: Any, path: str, manifest: str, say_skipped: bool
) -> Iterator[tuple[list[str], list[str]]]:
    files, skipped = [], 0
    for p in fs.find(path):  # each name looked at once: a folder may hold millions
        if _is_system_file(p):
            skipped += 1
        elif _suffix(p) in IMAGE_EXTENSIONS:
            files.append(p)
    files.sort()
    if say_skipped and skipped:
        log.info(
            f"manifest {manifest}: skipped {skipped} file(s) that macOS and Windows leave beside images "
            "(._* AppleDouble files, .DS_Store, Thumbs.db, desktop.ini)"
        )
    for start in range(0, len(files), TEXT_BATCH_ROWS):
        uris = [storage.unstrip(fs, p) for p in files[start : start + TEXT_BATCH_ROWS]]
        yield [default_image_id(u) for u in uris], uris


def _validate(batch: pa.RecordBatch, manifest: str, first_row: int) -> tuple[list[str], list[str]]:
    names = batch.schema.names
    if URI_COLUMN not in names:
        raise BatchsegError(f"manifest {manifest} has no '{URI_COLUMN}' column (it has: {', '.join(names)})")
    columns = [URI_COLUMN] + ([ID_COLUMN] if ID_COLUMN in names else [])
    out = []
    for name in columns:
        column = batch.column(name)
        if column.null_count:
            rows = [first_row + i + 1 for i, v in enumerate(column.is_null().to_pylist()) if v][:5]
            raise BatchsegError(f"manifest {manifest} has rows with no {name} (rows {rows})")
        out.append(column.cast(pa.string()).to_pylist())
    uris = out[0]
    return (out[1] if len(out) > 1 else []), uris


def plan_shards(
    manifest: str, shard_size: int, storage_options: dict[str, Any] | None = None, keep: Keep = ()
) -> Plan:
    """One streaming pass: count rows, refuse duplicate image_ids, and fingerprint the manifest and each
    shard.

    Memory: 8 bytes per row (a hash of each image_id) and 32 per shard, on top of one shard's rows.
    """
    if shard_size < 1:
        raise BatchsegError(f"--shard-size must be at least 1, not {shard_size}")
    hashes = []
    fingerprints = []
    columns = pa.schema([])
    num_rows = 0
    for shard in _split(iter_rows(manifest, storage_options, keep, say_skipped=True), shard_size):
        hashes.append(np.fromiter(map(hash, shard.image_ids), dtype=np.int64, count=len(shard)))
        fingerprints.append(shard.fingerprint)
        columns = shard.columns.schema if shard.columns is not None else columns
        num_rows += len(shard)
    if num_rows == 0:
        raise BatchsegError(f"manifest {manifest} has no rows")
    ordered = np.concatenate(hashes)
    del hashes
    ordered.sort()
    clashing = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if clashing.size:
        _refuse_duplicates(manifest, set(clashing.tolist()), storage_options)
    return Plan(absolute_uri(manifest), num_rows, shard_size, tuple(fingerprints), columns)


def _refuse_duplicates(manifest: str, clashing: set[int], storage_options: dict[str, Any] | None) -> None:
    seen: set[str] = set()
    duplicates: list[str] = []
    for ids, _ in iter_manifest(manifest, storage_options):
        for image_id in ids:
            if hash(image_id) in clashing:
                if image_id in seen:
                    duplicates.append(image_id)
                seen.add(image_id)
    if duplicates:  # else only the 64-bit hashes collided
        unique = sorted(set(duplicates))
        examples = ", ".join(repr(d) for d in unique[:5])
        raise BatchsegError(
            f"manifest {manifest} has {len(unique)} duplicate image_id value(s), e.g. {examples}: "
            "every row needs a unique image_id"
        )


def iter_shards(
    plan: Plan, skip: frozenset[int] = frozenset(), storage_options: dict[str, Any] | None = None
) -> Iterator[Shard]:
    """The plan's shards in order, streamed from the manifest, leaving out the indices in ``skip``."""
    rows = iter_rows(plan.manifest, storage_options, plan.keep)
    for shard in _split(rows, plan.shard_size):
        if shard.index not in skip:
            yield shard


def _split(batches: Iterator[tuple[list[str], list[str], pa.Table | None]], size: int) -> Iterator[Shard]:
    """Manifest batches regrouped into shards of ``size`` consecutive rows (the last may be short)."""
    ids: list[str] = []
    uris: list[str] = []
    kept: list[pa.Table] = []
    index = 0
    for batch_ids, batch_uris, batch_kept in batches:
        ids.extend(batch_ids)
        uris.extend(batch_uris)
        if batch_kept is not None:
            kept.append(batch_kept)
        while len(uris) >= size:
            yield Shard(index, ids[:size], uris[:size], _first(kept, size))
            del ids[:size], uris[:size]
            index += 1
    if uris:
        yield Shard(index, ids, uris, _first(kept, len(uris)))


def _first(tables: list[pa.Table], rows: int) -> pa.Table | None:
    """The first ``rows`` rows of ``tables`` as a compact table of their own (an Arrow slice would carry
    its whole batch to the actor), leaving the rest in ``tables``."""
    if not tables:
        return None
    table = pa.concat_tables(tables)
    tables[:] = [table.slice(rows)] if table.num_rows > rows else []
    return table.take(np.arange(rows))
