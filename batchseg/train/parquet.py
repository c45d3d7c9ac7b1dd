"""Parquet training sets written once: a segment output's instances selected with SQL (``train
--from-results OUT --where ...``, into the run folder's ``data/``) or a COCO JSON (``batchseg
coco-to-parquet``), streamed into row groups of :data:`ROW_GROUP_IMAGES` images that
:class:`~batchseg.train.examples.ParquetTrainingSet` reads one at a time. No torch, no Ray."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pycocotools import mask as coco_mask

from batchseg import __version__
from batchseg.analysis.query import connect, stream
from batchseg.analysis.results import open_results
from batchseg.errors import BatchsegError, job_errors
from batchseg.format.coco import to_rle
from batchseg.format.records import INSTANCE, METADATA_KEY, NEWER_COLUMNS, SCHEMA, ok_row
from batchseg.io import atomic, storage
from batchseg.io.manifest import absolute_uri
from batchseg.train.examples import Example, open_training_set

log = logging.getLogger(__name__)

# A row group is a chunk: what a worker holds and shuffles within (its examples' order is drawn per chunk),
# and the grain of a worker's share; a file holds FILE_ROW_GROUPS of them (100,000 images).
ROW_GROUP_IMAGES = 1000
FILE_ROW_GROUPS = 100
DATA_FOLDER = "data"  # a run folder's training set, made from --from-results
RECORD_FILE = "_training_set.json"  # written last: what the training set was made from, and its counts
IMAGE_COLUMNS = ["image_id", "uri", "width", "height"]


class TrainingSetWriter:
    """Image rows of :data:`~batchseg.format.records.SCHEMA` streamed into ``folder/part-NNNNNN.parquet``,
    in row groups of ``row_group_images``; each file's metadata holds ``categories`` (names by label) and
    ``made_from`` (which marks it a training set: only trainable rows, so its row counts are its examples).
    Nothing is written before the first row group is full or :meth:`close` is called with rows held;
    :meth:`close` writes :data:`RECORD_FILE` last and returns it."""

    def __init__(
        self,
        folder: str,
        categories: tuple[str, ...],
        made_from: dict[str, Any],
        storage_options: dict[str, Any] | None = None,
        row_group_images: int = ROW_GROUP_IMAGES,
    ) -> None:
        self.folder, self.made_from, self.row_group_images = folder, made_from, row_group_images
        self.fs, self.path = storage.filesystem(folder, storage_options)
        provenance = {
            "batchseg_version": __version__,
            "categories": list(categories),
            "training_set": made_from,
        }
        self.schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(provenance, sort_keys=True).encode()})
        self.held: list[pa.Table] = []
        self.held_rows = self.images = self.instances = self.files = self.row_groups = 0
        self.file: Any = None
        self.writer: pq.ParquetWriter | None = None

    def add(self, rows: pa.Table) -> None:
        self.held.append(rows)
        self.held_rows += rows.num_rows
        while self.held_rows >= self.row_group_images:
            self._write(self.row_group_images)

    def _write(self, size: int) -> None:
        table = pa.concat_tables(self.held)
        self.held, self.held_rows = [table.slice(size)], table.num_rows - size
        group = table.slice(0, size).combine_chunks().cast(self.schema)
        with job_errors(f"cannot write training set {self.folder}"):
            if self.writer is None:
                # a folder on local disks (object stores have none to make)
                self.fs.makedirs(self.path, exist_ok=True)
                name = storage.join(self.path, f"part-{self.files:06d}.parquet")
                self.file = self.fs.open(name, "wb")
                self.writer = pq.ParquetWriter(self.file, self.schema, compression="zstd")
            self.writer.write_table(group, row_group_size=size)
            self.row_groups += 1
            if self.row_groups % FILE_ROW_GROUPS == 0:
                self._close_file()
        self.images += group.num_rows
        self.instances += int(pc.sum(pc.list_value_length(group.column("instances"))).as_py() or 0)

    def _close_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.file.close()
            self.writer, self.files = None, self.files + 1

    def close(self) -> dict[str, Any]:
        """Write the rows held and the record; returns it (``made_from``, ``images``, ``instances``, ``files``)."""
        if self.held_rows:
            self._write(self.held_rows)
        with job_errors(f"cannot write training set {self.folder}"):
            self._close_file()
            record = {"made_from": self.made_from, "images": self.images, "instances": self.instances,
                      "files": self.files}  # fmt: skip
            atomic.write(self.fs, storage.join(self.path, RECORD_FILE), json.dumps(record, indent=2).encode())
        return record


def read_record(folder: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The record of the training set at ``folder``: None when there is none (or it was never finished)."""
    fs, path = storage.filesystem(folder, storage_options)
    with job_errors(f"cannot read {folder}"):
        try:
            record: dict[str, Any] = json.loads(fs.cat_file(storage.join(path, RECORD_FILE)))
        except (FileNotFoundError, NotADirectoryError):
            return None
    return record


# --- a segment output's instances selected with SQL --------------------------------------------------------


def check_selection(
    source: str, where: str | None, run: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Refuse a run folder whose training set was made from another output or ``--where``; returns its
    record when it can be reused (None: it is still to be made). Reads only."""
    record = read_record(storage.join(run, DATA_FOLDER), storage_options)
    made_from = {"from_results": source, "where": where}
    if record is not None and record["made_from"] != made_from:
        was = record["made_from"]
        raise BatchsegError(
            f"run folder {run} trains on --from-results {was.get('from_results')} --where {was.get('where')!r}, not "
            f"{source} --where {where!r}: give another --output to train on another selection"
        )
    return record


def select_training_set(
    source: str,
    where: str | None,
    run: str,
    storage_options: dict[str, Any] | None = None,
    row_group_images: int = ROW_GROUP_IMAGES,
) -> tuple[str, dict[str, Any]]:
    """``<run>/data``, the training set of the instances of output ``source`` (``ok`` rows, with a mask) for
    which the SQL condition ``where`` on the ``instances`` view holds, each image with at least one; made
    once and reused by a rerun of the same source and ``where``. Returns it and its record.

    Streamed: DuckDB gives the kept instances in output order (an image's together), which are grouped back
    into image rows batch by batch, so memory does not grow with the output. An output that cannot be read,
    a ``where`` DuckDB rejects and a selection of nothing are each one :class:`BatchsegError`, raised before
    anything is written."""
    folder = storage.join(run, DATA_FOLDER)
    record = check_selection(source, where, run, storage_options)
    if record is not None:
        log.info(f"training on {folder}, made from {source} before: {record['images']} images, "
                 f"{record['instances']} instances")  # fmt: skip
        return folder, record
    if where is not None and not where.strip():
        raise BatchsegError('--where is empty: give a condition on the instances view, e.g. "score >= 0.9"')
    results = open_results(source, storage_options)
    con = connect(source, storage_options)
    con.execute("SET preserve_insertion_order = true")  # the grouping below needs an image's rows together
    what = "--where cannot be evaluated on the instances view" if where else f"cannot read output {source}"

    def kept() -> Any:
        rows = con.table("instances").filter("rle IS NOT NULL AND category_id > 0")
        rows = rows.filter(where) if where else rows  # one expression: no text in it reaches past it
        return rows.select(", ".join(IMAGE_COLUMNS + [f.name for f in INSTANCE]))

    categories = results.provenance.get("categories") or _categories_of(con, f"cannot read output {source}")
    batches = stream(kept, what, 65_536)
    made_from = {"from_results": source, "where": where}
    writer = TrainingSetWriter(folder, tuple(categories), made_from, storage_options, row_group_images)
    started = False
    for images in image_rows(batches):
        if not started:  # a half-made training set (no record) of an earlier, interrupted run goes first
            _remove(writer.fs, writer.path, folder)
            started = True
        writer.add(images)
    if not started:
        raise BatchsegError(f"{'--where ' + repr(where) if where else 'it'} selects no instance with a mask "
                            f"in {source}: nothing to train on")  # fmt: skip
    record = writer.close()
    log.info(f"training set {folder}: {record['images']} images, {record['instances']} instances of {source}")
    return folder, record


def _categories_of(con: Any, what: str) -> list[str]:
    from batchseg.format.coco import names_by_label

    pairs = stream(lambda: con.sql("SELECT DISTINCT category_id, category FROM instances"), what, 65_536)
    return list(names_by_label({r["category_id"]: r["category"] for b in pairs for r in b.to_pylist()}))


def _remove(fs: Any, path: str, folder: str) -> None:
    with job_errors(f"cannot write training set {folder}"):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def image_rows(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.Table]:
    """Instance rows (the image's columns, then the instance's), an image's rows together, as image rows of
    :data:`~batchseg.format.records.SCHEMA` (``ok``, the instances a list); an image whose rows continue into
    the next batch is held until they end."""
    held: pa.Table | None = None
    for batch in batches:
        table = pa.Table.from_batches([batch])
        table = table if held is None else pa.concat_tables([held, table])
        starts = _image_starts(table)
        if len(starts) > 1:
            yield _as_images(table.slice(0, starts[-1]), starts[:-1])
        held = table.slice(int(starts[-1]))
    if held is not None and held.num_rows:
        yield _as_images(held, np.zeros(1, dtype=np.int64))


def _image_starts(table: pa.Table) -> np.ndarray:
    """The rows where an image's rows start (the first row and each change of ``image_id`` or ``uri``)."""
    n = table.num_rows
    changed = np.zeros(max(0, n - 1), dtype=bool)
    for name in ("image_id", "uri"):
        column = table.column(name).combine_chunks()
        changed |= pc.not_equal(column.slice(1), column.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(changed) + 1]).astype(np.int64)


def _as_images(table: pa.Table, starts: np.ndarray) -> pa.Table:
    table = table.combine_chunks()
    instances = pa.StructArray.from_arrays(
        [table.column(f.name).combine_chunks().cast(f.type) for f in INSTANCE], fields=list(INSTANCE)
    )
    offsets = pa.array(np.append(starts, table.num_rows), pa.int32())
    heads = table.select(IMAGE_COLUMNS).take(pa.array(starts))
    n = heads.num_rows
    return pa.table(
        {
            **{name: heads.column(name).cast(SCHEMA.field(name).type) for name in IMAGE_COLUMNS},
            "status": pa.array(["ok"] * n, pa.string()),
            "error": pa.nulls(n, pa.string()),
            "instances": pa.ListArray.from_arrays(offsets, instances),
            # a training set's images are not placed on a map (the output's GeoTIFF placement is dropped)
            **{name: pa.nulls(n, SCHEMA.field(name).type) for name in NEWER_COLUMNS},
        },
        schema=SCHEMA,
    )


# --- COCO JSON, converted once ----------------------------------------------------------------------------


def coco_to_parquet(
    images: str,
    annotations: str,
    output: str,
    storage_options: dict[str, Any] | None = None,
    row_group_images: int = ROW_GROUP_IMAGES,
) -> dict[str, Any]:
    """Write the COCO instances JSON ``annotations`` (file names relative to ``images``) as a Parquet training
    set at ``output``: the images :class:`~batchseg.train.examples.CocoTrainingSet` trains on (crowd and
    invalid annotations, and images left without instances, dropped alike), each instance with score 1.0,
    its mask as compressed COCO RLE, the box and area of that mask. The JSON is loaded whole (a one-off);
    the rows are written a row group at a time. Returns the record (images, instances, files)."""
    images, annotations = absolute_uri(images), absolute_uri(annotations)
    fs, path = storage.filesystem(output, storage_options)
    with job_errors(f"cannot write {output}"):
        if fs.exists(path):
            raise BatchsegError(f"--output {output} exists: give a new folder for the training set")
    data = open_training_set(images, annotations, storage_options)  # COCO JSON: one chunk
    made_from = {"coco": annotations, "images": images}
    writer = TrainingSetWriter(output, data.categories, made_from, storage_options, row_group_images)
    examples = data.read_chunk(0)
    for start in range(0, len(examples), row_group_images):
        rows = [coco_row(e, data.categories) for e in examples[start : start + row_group_images]]
        writer.add(pa.Table.from_pylist(rows, schema=SCHEMA))
    return writer.close()


def coco_row(example: Example, categories: tuple[str, ...]) -> dict[str, Any]:
    """An example as an output's ``ok`` row: each instance with score 1.0 and its mask as compressed RLE."""
    instances = []
    for label, segmentation in zip(example.labels, example.segmentations, strict=True):
        rle = to_rle(segmentation, example.height, example.width)
        counts = rle["counts"]
        instances.append(
            {
                "category_id": label,
                "category": categories[label],
                "score": 1.0,
                "bbox": [float(v) for v in coco_mask.toBbox(rle)],
                "area": int(coco_mask.area(rle)),
                "rle": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                "keypoints": None,
            }
        )
    return ok_row(example.image_id, example.uri, example.width, example.height, instances)
