"""Training data as examples in chunks: an :class:`Example` is one image with its instances; a
:class:`TrainingSet` holds them in chunks read one at a time (COCO JSON: one chunk; a Parquet training set:
one chunk per row group), so a worker holds one chunk, never the data set."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from batchseg.errors import BatchsegError
from batchseg.format.coco import category_names, load_annotations
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


def open_training_set(
    images: str, annotations: str, storage_options: dict[str, Any] | None = None
) -> TrainingSet:
    """The training set at ``annotations``: a COCO instances JSON whose file names are relative to
    ``images``. Raises :class:`BatchsegError` when it holds no image with an instance to learn from."""
    data = CocoTrainingSet(images, annotations, storage_options)
    if not sum(data.chunk_sizes):
        raise BatchsegError(f"{annotations}: no image has an instance to train on ({data.stats.summary()})")
    return data
