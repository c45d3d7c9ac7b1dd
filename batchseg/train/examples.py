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
import math
import posixpath
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow.parquet as pq

from batchseg.errors import BatchsegError, ImageError, job_errors
from batchseg.format.coco import category_names, load_annotations, names_by_label
from batchseg.format.records import read_provenance
from batchseg.io import reader, storage
from batchseg.io.images import decode_image

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


# Why an annotation is left out of training, as its count reads in the one warning ("3 crowd, ...").
CROWD = "crowd"
NO_IMAGE = "of an image id not in 'images'"
UNUSABLE_IMAGE = "of an image without a file name, width and height"
UNKNOWN_CATEGORY = "of a category id not in 'categories'"
BAD_BOX = "with a box of no size, NaN or outside the image"
NO_POLYGON = "without a polygon of 3 points or more"
RLE_SIZE = "with an RLE not of its image's height and width"
MALFORMED = "with a segmentation that is neither polygons nor RLE"


@dataclass
class DataStats:
    """What was dropped and why: summarised in one warning, never one line per problem."""

    annotations: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # annotations left out, by reason
    trimmed_polygons: int = 0  # pieces of fewer than 3 points taken out of annotations that are kept
    images_without_instances: int = 0

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common())
        dropped = f"{self.dropped.total()} of {self.annotations} annotations dropped"
        trimmed = (
            f"; polygons of fewer than 3 points taken out of kept annotations: {self.trimmed_polygons}"
            if self.trimmed_polygons
            else ""
        )
        return (
            f"{dropped}{f' ({reasons})' if reasons else ''}{trimmed}; "
            f"{self.images_without_instances} images without instances left out of training"
        )


@dataclass
class CocoTrainingSet:
    """A COCO instances JSON and the folder its file names are relative to, as one chunk: the images with at
    least one usable instance. Every annotation is checked here, once, in one pass (linear in the file, for
    files of millions): crowd ones and those pycocotools would misread or fail on (a polygon of 2 points it
    takes for a box, an RLE of another size, an unknown category, a box of no size) are dropped and counted
    by reason in :attr:`stats`, so that building a mask (:func:`~batchseg.train.data.to_sample`) never fails
    in a worker. An image id given twice is refused: pycocotools would keep the last silently."""

    images: str
    annotations: str
    storage_options: dict[str, Any] | None = None
    stats: DataStats = field(default_factory=DataStats)

    def __post_init__(self) -> None:
        self.coco = load_annotations(self.annotations, self.storage_options)
        self.categories = category_names(self.coco)
        images = self._images()
        kept: dict[Any, list[tuple[int, Any]]] = {}
        for ann in self.coco.dataset["annotations"]:
            self.stats.annotations += 1
            image = images.get(ann.get("image_id"), NO_IMAGE)
            usable = image if isinstance(image, str) else self._usable(ann, image)
            if isinstance(usable, str):
                self.stats.dropped[usable] += 1
            else:
                kept.setdefault(ann["image_id"], []).append(usable)
        self.examples: list[Example] = []
        for image_id in sorted(self.coco.imgs):
            image, instances = images[image_id], kept.get(image_id)
            if not instances or isinstance(image, str):
                self.stats.images_without_instances += 1
                continue
            self.examples.append(
                Example(
                    image_id=str(image_id),
                    uri=storage.join(self.images, image["file_name"]),
                    width=int(image["width"]),
                    height=int(image["height"]),
                    labels=tuple(label for label, _ in instances),
                    segmentations=tuple(segmentation for _, segmentation in instances),
                )
            )
        self.chunk_sizes: tuple[int, ...] = (len(self.examples),)

    def report(self) -> None:
        """What was dropped, in one warning (none when nothing was)."""
        if self.stats.dropped or self.stats.trimmed_polygons or self.stats.images_without_instances:
            log.warning(f"{self.annotations}: {self.stats.summary()}")

    def _images(self) -> dict[Any, dict[str, Any] | str]:
        """Each image by id, or why its annotations cannot be used; :class:`BatchsegError` for an id given
        twice (pycocotools' index keeps the last, so its first image would train on the other's masks)."""
        images: dict[Any, dict[str, Any] | str] = {}
        for image in self.coco.dataset["images"]:
            image_id = image["id"]
            if image_id in images:
                raise BatchsegError(
                    f"{self.annotations}: image id {image_id!r} is given to two images in 'images' "
                    f"(the second: {image.get('file_name')!r}); each image needs its own id"
                )
            usable = isinstance(image.get("file_name"), str) and all(
                _is_number(v := image.get(k)) and v > 0 and v == int(v) for k in ("width", "height")
            )  # some tools write 640.0
            images[image_id] = image if usable else UNUSABLE_IMAGE
        return images

    def _usable(self, ann: dict[str, Any], image: dict[str, Any]) -> tuple[int, Any] | str:
        """``(label, segmentation)`` of an annotation to train on, or why it is dropped."""
        if ann.get("iscrowd"):
            return CROWD
        if ann.get("category_id") not in self.coco.cats:
            return UNKNOWN_CATEGORY
        label = int(ann["category_id"])
        try:
            x, y, w, h = ann.get("bbox")  # type: ignore[misc]
            fits = w >= 1 and h >= 1 and x < image["width"] and y < image["height"]  # NaN fails each
        except (TypeError, ValueError):  # no box, not 4 numbers
            fits = False
        if not fits:
            return BAD_BOX
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            if all(_is_polygon(p) for p in segmentation):  # as nearly all are: kept as it is, not copied
                return (label, segmentation) if segmentation else NO_POLYGON
            polygons = [p for p in segmentation if _is_polygon(p)]
            if not polygons:
                return NO_POLYGON
            self.stats.trimmed_polygons += len(segmentation) - len(polygons)
            return label, polygons
        if isinstance(segmentation, dict):
            problem = _rle_problem(segmentation, image["height"], image["width"])
            return problem or (label, segmentation)
        return MALFORMED

    def read_chunk(self, index: int) -> list[Example]:
        return self.examples


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_polygon(points: Any) -> bool:
    """A polygon pycocotools reads as one: x, y pairs of at least 3 points (4 numbers it takes for a box).
    Its numbers are checked by their sum (a string or None in it fails it, a NaN makes it NaN): one call
    in C, where a check of each number made the pass over a million annotations 7 times as slow."""
    if not isinstance(points, list) or len(points) < 6 or len(points) % 2:
        return False
    try:
        return math.isfinite(sum(points))
    except TypeError:
        return False


def _rle_problem(rle: dict[str, Any], height: int, width: int) -> str | None:
    """Why an RLE cannot be this image's mask: another ``size``, or counts that are neither a compressed
    string nor run lengths adding up to its pixels; None when it can."""
    size, counts = rle.get("size"), rle.get("counts")
    if not isinstance(size, list) or len(size) != 2 or not all(_is_number(v) for v in size):
        return MALFORMED
    if [int(size[0]), int(size[1])] != [height, width]:
        return RLE_SIZE
    if isinstance(counts, str | bytes):
        return None
    if isinstance(counts, list) and all(isinstance(v, int) and v >= 0 for v in counts):
        return None if sum(counts) == height * width else RLE_SIZE
    return MALFORMED


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
    images: str | None,
    annotations: str,
    storage_options: dict[str, Any] | None = None,
    *,
    report: bool = True,
) -> TrainingSet:
    """The training set at ``annotations``: a Parquet training set (:class:`ParquetTrainingSet`), or a COCO
    instances JSON whose file names are relative to ``images`` (:func:`check_images_for`), what it dropped
    in one warning unless not to ``report`` it (the workers: the driver did). Raises
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
    if report and isinstance(data, CocoTrainingSet):
        data.report()
    return data


READ_TRIES = 8  # images read on the driver before training, at most, to find one that decodes


def check_readable(
    data: TrainingSet, images: str | None, annotations: str, storage_options: dict[str, Any] | None = None
) -> None:
    """:class:`BatchsegError` unless an image to train on can be read and decoded, checked before training
    starts (a worker would find it only after its reads, and Ray Train retry it). A COCO JSON's images are
    looked for under ``images`` in one listing: none there is refused, some missing are counted in one
    warning (the workers skip them). Then the first :data:`READ_TRIES` of the first chunk (those there) are
    read one after another until one decodes: decoding them all would be an epoch's work."""
    index = next(i for i, size in enumerate(data.chunk_sizes) if size)
    examples = data.read_chunk(index)
    if images is not None:
        present, missing = _present(examples, images, storage_options)
        if not present:
            raise BatchsegError(
                f"none of the {len(examples)} images with instances of {annotations} is under --images "
                f"{images} (the first: {examples[0].uri})"
            )
        if missing:
            log.warning(
                f"{len(missing)} of the {len(examples)} images with instances of {annotations} are not "
                f"under --images {images} (e.g. {missing[0].uri}): training skips them"
            )
        examples = present
    errors = []
    for example in examples[:READ_TRIES]:
        try:
            decode_image(reader.read_image_bytes(example.uri, storage_options))
            return
        except ImageError as e:
            errors.append(e)
    raise BatchsegError(
        f"none of the first {len(errors)} images with instances of {annotations} can be read "
        f"(the first: {errors[0]})"
    )


def _present(
    examples: list[Example], images: str, storage_options: dict[str, Any] | None
) -> tuple[list[Example], list[Example]]:
    """The examples whose image is a file under ``images`` (one recursive listing), and the others. An
    example whose file name leads out of ``images`` (an absolute one) counts as there: the reads check it."""
    fs, root = storage.filesystem(images, storage_options)
    root, prefix = root.rstrip("/"), images.rstrip("/") + "/"
    with job_errors(f"cannot list --images {images}"):
        listed = {p[len(root) :].lstrip("/") for p in fs.find(root)}
    present: list[Example] = []
    missing: list[Example] = []
    for e in examples:
        there = not e.uri.startswith(prefix) or posixpath.normpath(e.uri[len(prefix) :]) in listed
        (present if there else missing).append(e)
    return present, missing
