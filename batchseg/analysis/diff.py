"""Two segmentation outputs over the same images compared (``batchseg diff``, ``report --compare``).

Rows are joined by ``image_id`` (an image is compared only where both rows also have the same URI: one id
given to two images is not one image); in each image, instances of the same category are matched by mask IoU
(pycocotools; box IoU where an instance has no mask), greedily as COCOeval matches detections to ground
truth: NEW's instances, highest score first, each take the unmatched OLD instance they overlap most, if
that IoU is at least the threshold. Counted per category and overall: instances old and new, matched
pairs and their mean IoU, added (in NEW only) and removed (in OLD only). Each image gets a change score,
``added + removed + sum(1 - IoU)`` over its matched pairs: one for each instance that appeared or vanished,
and up to one for a matched instance whose mask moved.

Streaming: OLD's ``image_id`` column is read once into an index (17 bytes per row: a 64-bit hash of each
id, sorted, and where it sits); NEW's shards are then read one at a time, each with the OLD shards its ids
are in. Outputs made with the same manifest and shard size align shard to shard, so each OLD shard is read
once more; others are joined just as correctly, reading an OLD shard again for every NEW shard that needs it
(the last two read are kept). Memory: the index, one NEW shard, two OLD shards and the ``top`` images.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pycocotools.mask as coco_mask

from batchseg.analysis.query import format_of_name, format_table, write_whole
from batchseg.analysis.results import Results
from batchseg.errors import BatchsegError

log = logging.getLogger(__name__)
COLUMNS = ["image_id", "uri", "width", "height", "status", "instances"]
# Settings of the two runs shown side by side when they differ (the shards' provenance).
SETTINGS = ("model", "weights", "score_threshold", "mask_threshold", "min_size", "max_size", "max_instances")
OUT_FORMATS = ("csv", "json", "parquet")
OLD_SHARDS_KEPT = 2
IMAGE_COUNTS = ("old_rows", "new_rows", "in_both", "compared", "changed", "only_in_old", "only_in_new",
                "old_error_rows", "new_error_rows", "not_compared_error", "not_compared_size", "not_compared_uri",
                "duplicate_rows")  # fmt: skip

TABLE = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("uri", pa.string()),  # NEW's
        pa.field("old_status", pa.string()),
        pa.field("new_status", pa.string()),
        pa.field("old_instances", pa.int32()),  # null on an error row
        pa.field("new_instances", pa.int32()),
        pa.field("matched", pa.int32()),  # null, as are the three after it, when the image is not compared
        pa.field("added", pa.int32()),
        pa.field("removed", pa.int32()),
        pa.field("mean_iou", pa.float64()),  # also null when nothing matched
        pa.field("change_score", pa.float64()),
    ]
)
"""``--out``'s table: one row per image in both outputs, in NEW's order. An image is compared when both its
rows are ``ok``, of the same size and of the same URI."""


@dataclass
class CategoryDiff:
    """One category's instances in the compared images (or all categories': :meth:`Diff.total`)."""

    old: int = 0
    new: int = 0
    matched: int = 0
    iou_sum: float = 0.0

    @property
    def added(self) -> int:
        return self.new - self.matched

    @property
    def removed(self) -> int:
        return self.old - self.matched

    @property
    def mean_iou(self) -> float | None:
        return self.iou_sum / self.matched if self.matched else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "old": self.old,
            "new": self.new,
            "change": self.new - self.old,
            "matched": self.matched,
            "mean_iou": self.mean_iou,
            "added": self.added,
            "removed": self.removed,
        }


@dataclass(frozen=True)
class ImageDiff:
    """One compared image. ``old_row``/``new_row`` (output rows as dicts) and ``pairs`` (``match_instances``)
    are kept only for the report."""

    image_id: str
    uri: str
    old_instances: int
    new_instances: int
    matched: int
    iou_sum: float
    old_row: dict[str, Any] | None = None
    new_row: dict[str, Any] | None = None
    pairs: tuple[tuple[int, int, float], ...] = ()

    @property
    def added(self) -> int:
        return self.new_instances - self.matched

    @property
    def removed(self) -> int:
        return self.old_instances - self.matched

    @property
    def mean_iou(self) -> float | None:
        return self.iou_sum / self.matched if self.matched else None

    @property
    def change_score(self) -> float:
        """``added + removed + sum(1 - IoU)`` over the matched pairs."""
        return self.added + self.removed + (self.matched - self.iou_sum)

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "uri": self.uri,
            "old_instances": self.old_instances,
            "new_instances": self.new_instances,
            "matched": self.matched,
            "added": self.added,
            "removed": self.removed,
            "mean_iou": self.mean_iou,
            "change_score": self.change_score,
        }


@dataclass
class Diff:
    """What ``batchseg diff OLD NEW`` finds. Instance figures cover the compared images only: those both
    outputs hold as ``ok`` rows of the same size and URI."""

    old: str
    new: str
    iou_threshold: float
    settings: dict[str, tuple[Any, Any]]  # setting -> (old, new), only those that differ (see run_settings)
    images: dict[str, int] = field(default_factory=lambda: dict.fromkeys(IMAGE_COUNTS, 0))
    categories: dict[str, CategoryDiff] = field(default_factory=dict)
    top: list[ImageDiff] = field(default_factory=list)  # the most changed images, most first
    kept_columns: list[str] = field(default_factory=list)  # NEW's --keep-columns, after TABLE's in --out
    left_out_columns: list[str] = field(default_factory=list)  # NEW's kept columns named like TABLE's
    other_uri: tuple[str, str, str] | None = None  # the first image_id whose URIs differ: (id, old, new)

    def total(self) -> CategoryDiff:
        total = CategoryDiff()
        for c in self.categories.values():
            total.old, total.new = total.old + c.old, total.new + c.new
            total.matched, total.iou_sum = total.matched + c.matched, total.iou_sum + c.iou_sum
        return total

    def ordered_categories(self) -> list[tuple[str, CategoryDiff]]:
        """Categories by instances in either output, most first, then by name."""
        return sorted(self.categories.items(), key=lambda kv: (-max(kv[1].old, kv[1].new), kv[0]))

    def summary(self) -> dict[str, Any]:
        """Everything as JSON-ready values (``--json``)."""
        return {
            "old": self.old,
            "new": self.new,
            "iou_threshold": self.iou_threshold,
            "settings": {k: {"old": o, "new": n} for k, (o, n) in self.settings.items()},
            "images": dict(self.images),
            "categories": {name: c.as_dict() for name, c in self.ordered_categories()},
            "total": self.total().as_dict(),
            "top": [image.as_dict() for image in self.top],
        }

    def kept_note(self) -> str:
        """Which of NEW's kept manifest columns the per-image table carries ("" when NEW kept none)."""
        note = f" with NEW's kept columns {', '.join(self.kept_columns)}" if self.kept_columns else ""
        if self.left_out_columns:
            note += f" (left out: {', '.join(self.left_out_columns)}, named like the table's own columns)"
        return note

    def format(self) -> str:
        """The summary as text: the images, a per-category table and the most changed images."""
        n = self.images
        lines = [f"old: {self.old}", f"new: {self.new}"]
        if self.settings:
            changed = "; ".join(f"{k} {o!r} -> {v!r}" for k, (o, v) in self.settings.items())
            lines.append(f"settings that differ: {changed}")
        lines.append(
            f"images: {n['in_both']:,} in both, {n['compared']:,} compared, {n['changed']:,} changed; "
            f"only in old: {n['only_in_old']:,}, only in new: {n['only_in_new']:,}"
        )
        lines.append(
            f"error rows: old {n['old_error_rows']:,}, new {n['new_error_rows']:,}; "
            f"images in both not compared for one: {n['not_compared_error']:,}"
        )
        if n["not_compared_size"]:
            lines.append(f"not compared, their sizes differ: {n['not_compared_size']:,} images")
        if n["not_compared_uri"]:
            lines.append(f"not compared, their URIs differ: {n['not_compared_uri']:,} images")
        if n["duplicate_rows"]:
            lines.append(f"rows repeating an image_id, left out: {n['duplicate_rows']:,}")
        lines += [
            f"instances matched within a category at IoU >= {self.iou_threshold:g} (masks; boxes when "
            "an instance has none):",
            "",
        ]
        rows = [_category_cells(name, c) for name, c in self.ordered_categories()]
        lines.append(_text_table([*rows, _category_cells("(all)", self.total())]))
        lines.append("")
        if self.top:
            lines += [
                f"the {len(self.top)} images that changed most (change score: added + removed + "
                "sum of 1 - IoU over matched pairs):",
                "",
                _text_table([_image_cells(image) for image in self.top]),
            ]
        else:
            lines.append("no image changed")
        return "\n".join(lines)


def match_instances(
    old: list[dict[str, Any]], new: list[dict[str, Any]], height: int, width: int, iou_threshold: float
) -> list[tuple[int, int, float]]:
    """Pairs ``(index in old, index in new, IoU)`` of one image's instances, matched within each category.

    ``old`` and ``new`` are a ``height x width`` image's instance structs (``records.INSTANCE``). A
    category is ``category``, else ``category_id``. IoU is ``pycocotools.mask.iou`` of the masks (``rle``)
    when every instance of the category in both lists has one, else of the boxes (``[x, y, w, h]``). As
    COCOeval matches: new instances, highest score first (ties: list order), each take the unmatched
    old instance with the highest IoU, if it is at least ``iou_threshold``.
    """
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for side, instances in enumerate((old, new)):
        for index, instance in enumerate(instances):
            groups.setdefault(category_name(instance), ([], []))[side].append(index)
    pairs: list[tuple[int, int, float]] = []
    for old_index, new_index in groups.values():
        if not old_index or not new_index:
            continue
        ious = instance_ious([old[i] for i in old_index], [new[j] for j in new_index], height, width)
        taken = np.zeros(len(old_index), dtype=bool)
        by_score = sorted(range(len(new_index)), key=lambda j: -_score(new[new_index[j]]))
        for j in by_score:
            candidates = np.where(taken, -1.0, ious[j])
            k = int(candidates.argmax())
            if candidates[k] >= iou_threshold:
                taken[k] = True
                pairs.append((old_index[k], new_index[j], float(ious[j, k])))
    return sorted(pairs)


def instance_ious(
    old: list[dict[str, Any]], new: list[dict[str, Any]], height: int, width: int
) -> np.ndarray:
    """``len(new) x len(old)`` IoU (float64) by ``pycocotools.mask.iou``: of the masks when all have one,
    else of the boxes."""
    gt: Any
    dt: Any
    if all(i.get("rle") is not None for i in (*old, *new)):
        size = [height, width]
        gt = [{"size": size, "counts": i["rle"]} for i in old]
        dt = [{"size": size, "counts": i["rle"]} for i in new]
    else:
        gt, dt = _boxes(old), _boxes(new)
    return np.asarray(coco_mask.iou(dt, gt, [0] * len(old)), dtype=np.float64).reshape(len(new), len(old))


def category_name(instance: dict[str, Any]) -> str:
    """What an instance is, as the report names it: its ``category``, else ``class <category_id>``."""
    return str(instance.get("category") or f"class {instance.get('category_id')}")


def _score(instance: dict[str, Any]) -> float:
    score = instance.get("score")
    return float(score) if score is not None and math.isfinite(score) else 0.0


def _boxes(instances: list[dict[str, Any]]) -> np.ndarray:
    boxes = [
        i.get("bbox") if i.get("bbox") is not None and len(i["bbox"]) == 4 else [0.0] * 4 for i in instances
    ]
    return np.asarray(boxes, dtype=np.float64).reshape(len(instances), 4)


class _OldIndex:
    """Where each of OLD's rows is, by ``image_id``: the 64-bit hash of every id, sorted, the row it belongs
    to, and whether that row was compared yet (17 bytes a row). Hashes shared by several rows (an id written
    twice, or two ids that collide) are resolved by id, in a dict of those few rows; the first row of an id
    is the one compared."""

    def __init__(self, results: Results) -> None:
        self.results = results
        hashes, sizes, self.error_rows = [], [], 0
        for path in results.files:
            table = results.read_file(path, ["image_id", "status"])
            hashes.append(_hashes(table.column("image_id").to_pylist()))
            sizes.append(table.num_rows)
            self.error_rows += table.num_rows - int(
                pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
            )
        self.starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        every = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.int64)
        del hashes
        self.order = np.argsort(every, kind="stable")
        self.sorted = every[self.order]
        del every
        self.rows = len(self.sorted)
        self.seen = np.zeros(self.rows, dtype=bool)  # compared, or a repeated id (never compared)
        shared = self.sorted[1:] == self.sorted[:-1]
        self.clashing = np.unique(self.sorted[1:][shared])
        self.by_id: dict[str, int] = {}
        self.duplicates = 0
        if self.clashing.size:
            self._resolve_clashes()

    def _resolve_clashes(self) -> None:
        clashing = set(self.clashing.tolist())
        for shard, path in enumerate(self.results.files):
            ids = self.results.read_file(path, ["image_id"]).column("image_id").to_pylist()
            for row, image_id in enumerate(ids):
                if hash(image_id) not in clashing:
                    continue
                position = int(self.starts[shard]) + row
                if image_id in self.by_id:
                    self.duplicates += 1
                    self.seen[position] = True
                else:
                    self.by_id[image_id] = position

    def find(self, ids: list[str]) -> np.ndarray:
        """The position (row in the whole output) of each id's row in OLD, -1 where it has none. A hash
        that matches another id's is caught when the row is read (its id differs)."""
        wanted = _hashes(ids)
        at = np.minimum(np.searchsorted(self.sorted, wanted), max(self.rows - 1, 0))
        found = self.sorted[at] == wanted if self.rows else np.zeros(len(ids), dtype=bool)
        positions = np.where(found, self.order[at] if self.rows else -1, -1)
        if self.clashing.size:
            for k in np.flatnonzero(np.isin(wanted, self.clashing)):
                positions[k] = self.by_id.get(ids[k], -1)
        return positions

    def shard_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, positions, side="right") - 1


def _hashes(ids: list[str]) -> np.ndarray:
    return np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))


def check_diff_options(iou_threshold: float, top: int, out: str | None) -> str | None:
    """Refuse impossible values before anything is read or written; returns ``out``'s format."""
    if not 0 < iou_threshold <= 1:  # NaN fails this too
        raise BatchsegError(f"--iou must be more than 0 and at most 1, not {iou_threshold}")
    if top < 0:
        raise BatchsegError(f"--top must be at least 0, not {top}")
    if out is None:
        return None
    fmt = format_of_name(out)
    if fmt not in OUT_FORMATS:
        raise BatchsegError(f"--out {out}: name it .csv, .parquet or .jsonl (the format comes from the name)")
    return fmt


def diff_outputs(
    old: str,
    new: str,
    *,
    iou_threshold: float = 0.5,
    top: int = 10,
    out: str | None = None,
    storage_options: dict[str, Any] | None = None,
    keep_rows: bool = False,
) -> Diff:
    """Compare the segmentation outputs ``old`` and ``new`` (any fsspec URIs) image by image.

    Returns a :class:`Diff` with the ``top`` most changed images (highest change score first; ties in
    NEW's order; images with a score of 0 are never listed), their rows too when ``keep_rows``. With
    ``out``, also writes :data:`TABLE` (then NEW's kept manifest columns) there as CSV, JSON Lines or
    Parquet (from its suffix), whole or not at all. Raises :class:`BatchsegError` for impossible options, an output that is missing or not a
    segment output, or one that cannot be read, before ``out`` is written.
    """
    fmt = check_diff_options(iou_threshold, top, out)
    old_results = Results(old, storage_options)
    new_results = Results(new, storage_options)
    settings = run_settings(old_results.provenance, new_results.provenance)
    index = _OldIndex(old_results)
    kept = [f for f in new_results.schema if f.name in new_results.kept_columns]
    schema = pa.schema([*TABLE, *(f for f in kept if f.name not in TABLE.names)])
    diff = Diff(old_results.uri, new_results.uri, iou_threshold, settings)
    diff.kept_columns = schema.names[len(TABLE) :]
    diff.left_out_columns = [f.name for f in kept if f.name in TABLE.names]
    join = _Join(diff, index, new_results, top, keep_rows, schema)
    if out is None or fmt is None:
        for _ in join.batches():
            pass
    else:
        write_whole(out, fmt, pa.RecordBatchReader.from_batches(schema, join.batches()), storage_options)
    diff.images["old_rows"] = index.rows
    diff.images["old_error_rows"] = index.error_rows
    diff.images["duplicate_rows"] += index.duplicates
    diff.images["only_in_old"] = int(index.rows - index.seen.sum())
    diff.top = [entry[2] for entry in sorted(join.heap, reverse=True)]
    if diff.other_uri:
        image_id, old_uri, new_uri = diff.other_uri
        log.warning(
            f"diff: {diff.images['not_compared_uri']:,} image ids stand for another URI in each output (other "
            f"images under one id): not compared, e.g. {image_id!r}: old {old_uri}, new {new_uri}"
        )
    return diff


def run_settings(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings (from two outputs' provenance) that differ, as ``(old, new)``: :data:`SETTINGS`, and
    ``categories`` where both record theirs: the names each model has that the other lacks, or the whole
    lists where the same names come in another order (so with other category ids)."""
    settings = {k: (before.get(k), after.get(k)) for k in SETTINGS if before.get(k) != after.get(k)}
    old, new = before.get("categories"), after.get("categories")
    if old is not None and new is not None and old != new:
        lacking = ([c for c in old if c not in new], [c for c in new if c not in old])
        settings["categories"] = lacking if lacking != ([], []) else (old, new)
    return settings


@dataclass
class _Join:
    """NEW's shards, each joined with its OLD rows and compared, one table batch (:data:`TABLE`) each."""

    diff: Diff
    index: _OldIndex
    new: Results
    top: int
    keep_rows: bool
    schema: pa.Schema  # TABLE, then the NEW kept columns it carries
    heap: list[tuple[float, int, ImageDiff]] = field(default_factory=list)  # (score, -order, image)
    cache: dict[int, pa.Table] = field(default_factory=dict)  # OLD shards read last

    def batches(self) -> Iterator[pa.RecordBatch]:
        for path in self.new.files:
            table = self.new.read_file(path, COLUMNS + self.diff.kept_columns)
            yield pa.RecordBatch.from_pylist(self._compare(table), schema=self.schema)

    def _old_shard(self, shard: int) -> pa.Table:
        if shard not in self.cache:
            while len(self.cache) >= OLD_SHARDS_KEPT:
                del self.cache[next(iter(self.cache))]
            self.cache[shard] = self.index.results.read_file(self.index.results.files[shard], COLUMNS)
        return self.cache[shard]

    def _old_rows(self, positions: np.ndarray) -> list[dict[str, Any] | None]:
        """The OLD row at each position (None for -1), each OLD shard read once for the lot."""
        rows: list[dict[str, Any] | None] = [None] * len(positions)
        shards = self.index.shard_of(positions)
        for shard in np.unique(shards[positions >= 0]):
            wanted = np.flatnonzero((shards == shard) & (positions >= 0))
            at = positions[wanted] - self.index.starts[shard]
            taken = self._old_shard(int(shard)).take(pa.array(at, type=pa.int64())).to_pylist()
            for k, row in zip(wanted.tolist(), taken, strict=True):
                rows[k] = row
        return rows

    def _compare(self, table: pa.Table) -> list[dict[str, Any]]:
        counts = self.diff.images
        new_rows = table.to_pylist()
        positions = self.index.find([row["image_id"] for row in new_rows])
        out: list[dict[str, Any]] = []
        for position, new_row, old_row in zip(
            positions.tolist(), new_rows, self._old_rows(positions), strict=True
        ):
            counts["new_rows"] += 1
            counts["new_error_rows"] += new_row["status"] != "ok"
            if old_row is None or old_row["image_id"] != new_row["image_id"]:  # the latter: hashes collided
                counts["only_in_new"] += 1
                continue
            if self.index.seen[position]:  # NEW repeats an id it already had
                counts["duplicate_rows"] += 1
                continue
            self.index.seen[position] = True
            counts["in_both"] += 1
            row = {
                "image_id": new_row["image_id"],
                "uri": new_row["uri"],
                "old_status": old_row["status"],
                "new_status": new_row["status"],
                "old_instances": _count(old_row),
                "new_instances": _count(new_row),
                **{name: new_row[name] for name in self.diff.kept_columns},
            }
            out.append(row)
            if old_row["uri"] != new_row["uri"]:  # one id, two images: nothing to compare
                counts["not_compared_uri"] += 1
                self.diff.other_uri = self.diff.other_uri or (
                    new_row["image_id"],
                    old_row["uri"],
                    new_row["uri"],
                )
                continue
            if old_row["status"] != "ok" or new_row["status"] != "ok":
                counts["not_compared_error"] += 1
                continue
            if (old_row["width"], old_row["height"]) != (new_row["width"], new_row["height"]):
                counts["not_compared_size"] += 1
                continue
            image = self._image(old_row, new_row)
            counts["compared"] += 1
            counts["changed"] += image.change_score > 0
            row.update(
                matched=image.matched,
                added=image.added,
                removed=image.removed,
                mean_iou=image.mean_iou,
                change_score=image.change_score,
            )
        return out

    def _image(self, old_row: dict[str, Any], new_row: dict[str, Any]) -> ImageDiff:
        old, new = old_row["instances"] or [], new_row["instances"] or []
        pairs = match_instances(old, new, new_row["height"], new_row["width"], self.diff.iou_threshold)
        categories = self.diff.categories
        for instance in old:
            categories.setdefault(category_name(instance), CategoryDiff()).old += 1
        for instance in new:
            categories.setdefault(category_name(instance), CategoryDiff()).new += 1
        for _, j, iou in pairs:
            category = categories[category_name(new[j])]
            category.matched += 1
            category.iou_sum += iou
        image = ImageDiff(
            new_row["image_id"], new_row["uri"], len(old), len(new), len(pairs), sum(p[2] for p in pairs)
        )
        score = image.change_score
        if self.top and score > 0 and (len(self.heap) < self.top or score > self.heap[0][0]):
            if self.keep_rows:
                image = dataclasses.replace(image, old_row=old_row, new_row=new_row, pairs=tuple(pairs))
            entry = (score, -self.diff.images["in_both"], image)
            if len(self.heap) < self.top:
                heapq.heappush(self.heap, entry)
            else:
                heapq.heapreplace(self.heap, entry)
        return image


def _count(row: dict[str, Any]) -> int | None:
    return None if row["status"] != "ok" else len(row["instances"] or [])


def _category_cells(name: str, c: CategoryDiff) -> dict[str, str]:
    return {
        "category": name,
        "old": f"{c.old:,}",
        "new": f"{c.new:,}",
        "change": f"{c.new - c.old:+,}" if c.new != c.old else "0",
        "matched": f"{c.matched:,}",
        "mean IoU": _iou(c.mean_iou),
        "added": f"{c.added:,}",
        "removed": f"{c.removed:,}",
    }


def _image_cells(image: ImageDiff) -> dict[str, str]:
    return {
        "image_id": image.image_id,
        "old": str(image.old_instances),
        "new": str(image.new_instances),
        "matched": str(image.matched),
        "added": str(image.added),
        "removed": str(image.removed),
        "mean IoU": _iou(image.mean_iou),
        "score": f"{image.change_score:.2f}",
        "uri": image.uri,
    }


def _iou(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _text_table(rows: list[dict[str, str]]) -> str:
    """Rows as query's aligned text table, without its row count."""
    table = pa.Table.from_pylist(rows)
    text = format_table(
        pa.RecordBatchReader.from_batches(table.schema, table.to_batches()), limit=len(rows) + 1
    )
    return text.rsplit("\n", 1)[0]
