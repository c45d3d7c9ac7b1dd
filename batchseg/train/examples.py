"""Training data as examples in chunks: an :class:`Example` is one image with its instances; a
:class:`TrainingSet` holds them in chunks read one at a time (COCO JSON: one chunk; a Parquet training set:
one chunk per row group), so a worker holds one chunk, never the data set.

Parquet is read here, not through Ray Data's ``iter_torch_batches``: a chunk is a row group, whose size the
files' footers give before any row is read, so :mod:`~batchseg.train.sampling` can place every position of an
epoch (``EpochOrder`` over ``chunk_sizes``), each worker reads only the row groups of its own share, and a run
resumes at an exact position, with another worker count too, seeing the same images in the same order. A
Ray Data stream decides its own split and order, and cannot be started at a position."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow.parquet as pq

from batchseg.errors import BatchsegError, job_errors
from batchseg.format.coco import category_names, load_annotations, names_by_label
from batchseg.format.records import read_provenance
from batchseg.io import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training image: where it is, its displayed size, and its instances (``labels[i]`` is the label of
    ``segmentations[i]``, a COCO segmentation: polygons, RLE with string counts, or uncompressed RLE)."""

    image_id: str
    uri: str
    width: int
    height: int
    labels: tuple[int, ...]
    segmentations: tuple[Any, ...]


class TrainingSet(Protocol):
    """Examples in chunks. ``categories[label]`` names a label (0 is ``__background__``); ``chunk_sizes[i]``
    is how many examples :meth:`read_chunk` gives for chunk ``i``, known before any chunk is read."""

    categories: tuple[str, ...]
    chunk_sizes: tuple[int, ...]

    def read_chunk(self, index: int) -> list[Example]: ...


@dataclass
class DataStats:
    """What was dropped and why: summarised in one warning, never one line per problem."""

    images_without_instances: int = 0
    invalid_annotations: int = 0
    crowd_annotations: int = 0

    def summary(self) -> str:
        return (
            f"{self.invalid_annotations} invalid and {self.crowd_annotations} crowd annotations ignored; "
            f"{self.images_without_instances} images without instances left out of training"
        )


@dataclass
class CocoTrainingSet:
    """A COCO instances JSON and the folder its file names are relative to, as one chunk: the images with at
    least one valid instance (crowd and invalid annotations dropped, counted in :attr:`stats`)."""

    images: str
    annotations: str
    storage_options: dict[str, Any] | None = None
    stats: DataStats = field(default_factory=DataStats)

    def __post_init__(self) -> None:
        self.coco = load_annotations(self.annotations, self.storage_options)
        self.categories = category_names(self.coco)
        self.examples: list[Example] = []
        for image_id in sorted(self.coco.getImgIds()):
            image = self.coco.imgs[image_id]
            kept = [a for a in self.coco.imgToAnns.get(image_id, []) if self._valid(a, image)]
            if not kept:
                self.stats.images_without_instances += 1
                continue
            self.examples.append(
                Example(
                    image_id=str(image_id),
                    uri=storage.join(self.images, image["file_name"]),
                    width=int(image["width"]),
                    height=int(image["height"]),
                    labels=tuple(int(a["category_id"]) for a in kept),
                    segmentations=tuple(a["segmentation"] for a in kept),
                )
            )
        self.chunk_sizes: tuple[int, ...] = (len(self.examples),)
        if self.stats.invalid_annotations or self.stats.images_without_instances:
            log.warning(f"{self.annotations}: {self.stats.summary()}")

    def _valid(self, ann: dict[str, Any], image: dict[str, Any]) -> bool:
        if ann.get("iscrowd"):
            self.stats.crowd_annotations += 1
            return False
        x, y, w, h = ann.get("bbox") or (0, 0, 0, 0)
        ok = (
            w >= 1
            and h >= 1
            and ann.get("segmentation")
            and 0 < ann.get("category_id", 0) < len(self.categories)
        )
        ok = ok and x < image["width"] and y < image["height"]
        if not ok:
            self.stats.invalid_annotations += 1
        return bool(ok)

    def read_chunk(self, index: int) -> list[Example]:
        return self.examples


# The columns a chunk is read with: an instance's mask and label, none of its score, box or keypoints.
EXAMPLE_COLUMNS = [
    "image_id",
    "uri",
    "width",
    "height",
    "status",
    "instances.list.element.category_id",
    "instances.list.element.rle",
]
# What a foreign Parquet (a segment output, a query's --out) is read with once, to count its examples.
COUNT_COLUMNS = ["status", *(f"instances.list.element.{n}" for n in ("category_id", "category", "rle"))]
PARQUET_SUFFIXES = (".parquet", ".pq")


class ParquetTrainingSet:
    """Parquet with a segment output's columns (:data:`~batchseg.format.records.SCHEMA`) at ``uri`` (one
    file, or a folder of ``*.parquet`` files read in name order), one chunk per row group. An example is an
    ``ok`` row with at least one instance with a mask (``rle``); its other instances are left out.

    A training set batchseg wrote (``batchseg coco-to-parquet``, a run's ``data/`` made by ``train
    --from-results``) holds only such rows and says so in its metadata: chunk sizes are the footers' row
    counts and its categories its metadata's, so nothing but footers is read before the first step. Any other
    Parquet of these columns is read once here, the labels and masks of each row group, to count its
    examples exactly (a chunk size must be what :meth:`read_chunk` gives); its categories are its
    provenance's, else named by its ``category_id``/``category`` pairs."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.fs, path = storage.filesystem(uri, storage_options)
        with job_errors(f"cannot read training set {uri}"):
            self.files = parquet_files(self.fs, path)
        if not self.files:
            raise BatchsegError(f"training set {uri} holds no Parquet ({', '.join(PARQUET_SUFFIXES)}) files")
        schema = self._read(self.files[0], lambda file: file.schema_arrow)
        missing = [
            n for n in ("image_id", "uri", "width", "height", "status", "instances") if n not in schema.names
        ]
        if missing:
            raise BatchsegError(
                f"{self.files[0]} is not a batchseg training set: no column {', '.join(missing)}"
            )
        provenance = read_provenance(schema)
        # Each footer is parsed, its row counts kept and the rest let go (a parsed footer of 100 row groups
        # is a megabyte or so), so what a worker holds grows by a number per row group, not by a footer.
        rows = [self._read(f, row_counts) for f in self.files]
        self.chunks = [
            (f, group) for f, counts in zip(self.files, rows, strict=True) for group in range(len(counts))
        ]
        if "training_set" in provenance:
            self.chunk_sizes = tuple(n for counts in rows for n in counts)
            self.categories = tuple(provenance["categories"])
        else:
            log.info(
                f"{uri} is not a training set batchseg wrote: reading its labels and masks once to count its examples"
            )
            self.chunk_sizes, pairs = self._count()
            self.categories = tuple(provenance.get("categories") or names_by_label(pairs))

    def _read(self, path: str, what: Callable[[pq.ParquetFile], Any]) -> Any:
        with job_errors(f"cannot read training set {path}"), self.fs.open(path, "rb") as f:
            return what(pq.ParquetFile(f))

    def _rows(self, index: int, columns: list[str]) -> list[dict[str, Any]]:
        path, group = self.chunks[index]
        rows: list[dict[str, Any]] = self._read(
            path, lambda f: f.read_row_group(group, columns=columns).to_pylist()
        )
        return rows

    def _count(self) -> tuple[tuple[int, ...], dict[int, str]]:
        sizes: list[int] = []
        pairs: dict[int, str] = {}
        for index in range(len(self.chunks)):
            rows = self._rows(index, COUNT_COLUMNS)
            sizes.append(sum(1 for row in rows if kept_instances(row)))
            pairs |= {i["category_id"]: i["category"] for row in rows for i in kept_instances(row)}
        return tuple(sizes), pairs

    def read_chunk(self, index: int) -> list[Example]:
        """Row group ``index`` (of the files in name order) as examples, reading only their columns."""
        examples = []
        for row in self._rows(index, EXAMPLE_COLUMNS):
            instances = kept_instances(row)
            if instances:
                size = [int(row["height"]), int(row["width"])]
                examples.append(
                    Example(
                        image_id=row["image_id"],
                        uri=row["uri"],
                        width=int(row["width"]),
                        height=int(row["height"]),
                        labels=tuple(int(i["category_id"]) for i in instances),
                        segmentations=tuple({"size": size, "counts": i["rle"]} for i in instances),
                    )
                )
        return examples


def row_counts(file: pq.ParquetFile) -> list[int]:
    """The rows of each row group of a Parquet file, from its footer."""
    footer = file.metadata
    return [footer.row_group(group).num_rows for group in range(footer.num_row_groups)]


def kept_instances(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The instances of a row that an example learns from: those with a mask and a label, of an ``ok`` row."""
    if row["status"] != "ok":
        return []
    return [i for i in row["instances"] or () if i["rle"] is not None and (i["category_id"] or 0) > 0]


def parquet_files(fs: Any, path: str) -> list[str]:
    """``path`` itself when it is a file, else the ``*.parquet`` files under it, in name order."""
    if not fs.isdir(path):
        return [path] if fs.exists(path) else []
    return sorted(p for p in fs.find(path) if p.endswith(PARQUET_SUFFIXES))


def is_parquet(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether training data at ``uri`` is Parquet (a folder, or a ``.parquet`` file) rather than COCO JSON."""
    fs, path = storage.filesystem(uri, storage_options)
    return path.endswith(PARQUET_SUFFIXES) or fs.isdir(path)


def check_images_for(
    images: str | None, annotations: str, storage_options: dict[str, Any] | None = None
) -> bool:
    """Whether ``annotations`` is Parquet; :class:`BatchsegError` unless ``images`` is given exactly when
    it is COCO JSON (a Parquet training set's rows hold their images' URIs)."""
    parquet = is_parquet(annotations, storage_options)
    if parquet and images:
        raise BatchsegError(
            f"--images is for a COCO JSON --annotations; the Parquet training set {annotations} has URIs"
        )
    if not parquet and not images:
        raise BatchsegError(
            f"--annotations {annotations} is COCO JSON: give --images, the folder of its file names"
        )
    return parquet


def open_training_set(
    images: str | None, annotations: str, storage_options: dict[str, Any] | None = None
) -> TrainingSet:
    """The training set at ``annotations``: a Parquet training set (:class:`ParquetTrainingSet`), or a COCO
    instances JSON whose file names are relative to ``images`` (:func:`check_images_for`). Raises
    :class:`BatchsegError` when it holds no image with an instance to learn from."""
    data: TrainingSet
    if check_images_for(images, annotations, storage_options):
        data = ParquetTrainingSet(annotations, storage_options)
        problem = "no ok row has an instance with a mask"
    else:
        assert images is not None
        data = coco = CocoTrainingSet(images, annotations, storage_options)
        problem = coco.stats.summary()
    if not sum(data.chunk_sizes):
        raise BatchsegError(f"{annotations}: no image has an instance to train on ({problem})")
    return data
