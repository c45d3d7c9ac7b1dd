"""Read an image manifest as a stream of (image_id, uri) batches, validate it, and split it into shards.

A manifest is a Parquet, CSV or JSON Lines file with a ``uri`` column (and optionally ``image_id``),
a text file with one URI per line, or a folder/prefix meaning every image file under it. Nothing
here holds the whole manifest in memory: rows stream through in pyarrow batches.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from batchseg.errors import BatchsegError, job_errors
from batchseg.io import storage
from batchseg.io.images import IMAGE_EXTENSIONS

URI_COLUMN = "uri"
ID_COLUMN = "image_id"
TEXT_BATCH_ROWS = 65_536
TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv"}
TABLE_SUFFIXES |= {".jsonl": "json", ".ndjson": "json", ".json": "json"}


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

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def fingerprint(self) -> str:
        """What the shard's rows are (see :func:`shard_fingerprint`), kept in its completion record."""
        return shard_fingerprint(self.image_ids, self.uris)

    def __len__(self) -> int:
        return len(self.uris)


def shard_name(index: int) -> str:
    return f"part-{index:06d}"


def shard_fingerprint(image_ids: list[str], uris: list[str]) -> str:
    """A digest of a shard's rows, its image ids and URIs in order: a rerun keeps a finished shard whose
    rows still have this fingerprint and redoes one whose rows changed."""
    digest = hashlib.sha256("\n".join(image_ids).encode())
    digest.update(b"\0")
    digest.update("\n".join(uris).encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Plan:
    """What a pass over the manifest found: its row count and the fingerprint of each shard's rows
    (:func:`shard_fingerprint`)."""

    manifest: str
    num_rows: int
    shard_size: int
    shard_fingerprints: tuple[str, ...] = ()

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
    manifest = absolute_uri(manifest)
    fs, path = storage.filesystem(manifest, storage_options)
    with job_errors(f"cannot open manifest {manifest}"):
        is_dir = manifest.endswith("/") or storage.retrying(lambda: fs.isdir(path), f"opening {manifest}")
        if not is_dir and not storage.retrying(lambda: fs.exists(path), f"opening {manifest}"):
            raise BatchsegError(f"manifest {manifest} does not exist")
    if is_dir:
        yield from _iter_folder(fs, path, manifest)
        return
    base = storage.parent(manifest)
    kind = TABLE_SUFFIXES.get(_suffix(path))
    row = 0
    what = kind.upper() if kind else "a text file of URIs"
    with job_errors(f"cannot read manifest {manifest} as {what}"):
        batches = _iter_table(fs, path, kind) if kind else _iter_lines(fs, path)
        for batch in batches:
            ids, uris = _validate(batch, manifest, row)
            resolved = [u if "://" in u or u.startswith("/") else storage.join(base, u) for u in uris]
            yield ids or [default_image_id(u) for u in uris], resolved
            row += len(uris)


def _suffix(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    return os.path.splitext(name)[1]


def _iter_table(fs: Any, path: str, kind: str) -> Iterator[pa.RecordBatch]:
    with fs.open(path, "rb", compression="infer") as f:
        if kind == "parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            columns = [c for c in (URI_COLUMN, ID_COLUMN) if c in names] or names
            yield from parquet.iter_batches(columns=columns)
        elif kind == "csv":
            import pyarrow.csv as pcsv

            delimiter = "\t" if _suffix(path) == ".tsv" else ","
            types = {URI_COLUMN: pa.string(), ID_COLUMN: pa.string()}
            yield from pcsv.open_csv(
                f,
                parse_options=pcsv.ParseOptions(delimiter=delimiter),
                convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=True),
            )
        else:
            import pyarrow.json as pjson

            yield from pjson.open_json(f)


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


def _iter_folder(fs: Any, path: str, manifest: str) -> Iterator[tuple[list[str], list[str]]]:
    files = sorted(p for p in fs.find(path) if _suffix(p) in IMAGE_EXTENSIONS)
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


def plan_shards(manifest: str, shard_size: int, storage_options: dict[str, Any] | None = None) -> Plan:
    """One streaming pass: count rows, refuse duplicate image_ids, and fingerprint the manifest and each
    shard.

    Memory: 8 bytes per row (a hash of each image_id) and 32 per shard, on top of one shard's rows.
    """
    if shard_size < 1:
        raise BatchsegError(f"--shard-size must be at least 1, not {shard_size}")
    hashes = []
    fingerprints = []
    num_rows = 0
    for shard in _split(iter_manifest(manifest, storage_options), shard_size):
        hashes.append(np.fromiter(map(hash, shard.image_ids), dtype=np.int64, count=len(shard)))
        fingerprints.append(shard.fingerprint)
        num_rows += len(shard)
    if num_rows == 0:
        raise BatchsegError(f"manifest {manifest} has no rows")
    ordered = np.concatenate(hashes)
    del hashes
    ordered.sort()
    clashing = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if clashing.size:
        _refuse_duplicates(manifest, set(clashing.tolist()), storage_options)
    return Plan(absolute_uri(manifest), num_rows, shard_size, tuple(fingerprints))


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
    for shard in _split(iter_manifest(plan.manifest, storage_options), plan.shard_size):
        if shard.index not in skip:
            yield shard


def _split(batches: Iterator[tuple[list[str], list[str]]], size: int) -> Iterator[Shard]:
    """Manifest batches regrouped into shards of ``size`` consecutive rows (the last may be short)."""
    ids: list[str] = []
    uris: list[str] = []
    index = 0
    for batch_ids, batch_uris in batches:
        ids.extend(batch_ids)
        uris.extend(batch_uris)
        while len(uris) >= size:
            yield Shard(index, ids[:size], uris[:size])
            del ids[:size], uris[:size]
            index += 1
    if uris:
        yield Shard(index, ids, uris)
