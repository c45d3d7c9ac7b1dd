"""An example's pixels and instances as torchvision's detection models take them in training
(:func:`to_sample`), and :class:`CocoInstances`, a COCO JSON as a map-style dataset (validation, tests)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from pycocotools import mask as coco_mask

from batchseg.errors import BatchsegError, ImageError
from batchseg.format.coco import to_rle
from batchseg.io import reader, storage
from batchseg.io.images import decode_image
from batchseg.train.examples import CocoTrainingSet, Example

log = logging.getLogger(__name__)

Target = dict[str, torch.Tensor]


def to_sample(example: Example, pixels: np.ndarray, flip: bool = False) -> tuple[torch.Tensor, Target]:
    """``(image, target)``: image the ``H x W x 3`` uint8 ``pixels`` as a uint8 ``3 x H x W`` tensor (made
    float on the device); target has ``boxes`` (float32 ``N x 4``, x1 y1 x2 y2 pixels), ``labels`` (int64
    ``N``), ``masks`` (uint8 ``N x H x W``) and ``image_id`` (int64 scalar when the id is a number, else
    -1). Instances whose mask is empty at this size are dropped; ``flip`` mirrors image and masks."""
    height, width = pixels.shape[:2]
    masks = np.stack([instance_mask(s, height, width) for s in example.segmentations])
    keep = masks.any(axis=(1, 2))
    masks = masks[keep]
    if flip:  # views: the copies below make them contiguous, one pass each
        pixels, masks = pixels[:, ::-1], masks[:, :, ::-1]
    target = {
        "image_id": torch.tensor(int(example.image_id) if example.image_id.isdigit() else -1),
        "masks": torch.from_numpy(np.ascontiguousarray(masks)),
        "labels": torch.tensor(example.labels, dtype=torch.int64)[torch.from_numpy(keep)],
    }
    target["boxes"] = boxes_of(target["masks"])
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), target


def instance_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE or uncompressed RLE), via pycocotools, at ``height x width``."""
    return coco_mask.decode(to_rle(segmentation, height, width)).astype(np.uint8)


class CocoInstances(torch.utils.data.Dataset):
    """A COCO JSON's images with their instances, as a map-style dataset (validation, tests, benchmarks).

    ``dataset[i]`` is ``(image, target)`` as :func:`to_sample` gives it, with the image a float32 tensor in
    [0, 1] (what the models take). Images without instances are left out (they teach nothing); evaluation
    reads every image of the annotations with :meth:`pixels`. An image that cannot be read or decoded is
    skipped and counted in :attr:`corrupt`. ``flip`` mirrors images at random (training).
    """

    def __init__(
        self,
        images: str,
        annotations: str,
        *,
        flip: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.images = images
        self.data = CocoTrainingSet(images, annotations, storage_options)
        self.data.report()
        self.coco = self.data.coco
        self.categories = self.data.categories
        self.stats = self.data.stats
        self.ids = [int(e.image_id) for e in self.data.examples]
        self.flip = flip
        self.storage_options = storage_options
        self.corrupt = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        """The image at ``index``; an unreadable one is counted, logged, and the next readable one given
        instead."""
        for offset in range(len(self.ids)):
            example = self.data.examples[(index + offset) % len(self.ids)]
            pixels = self.pixels(int(example.image_id))
            if pixels is not None:
                image, target = to_sample(example, pixels, self.flip and bool(torch.rand(()) < 0.5))
                return image.float().div_(255), target
        raise BatchsegError(f"none of the {len(self.ids)} images under {self.images} can be read")

    def pixels(self, image_id: int) -> np.ndarray | None:
        """Image ``image_id`` of the annotations (any image, with instances or not) as ``H x W x 3`` uint8
        RGB as displayed; None when it cannot be read or decoded (counted in :attr:`corrupt`, logged)."""
        uri = storage.join(self.images, self.coco.imgs[image_id]["file_name"])
        try:
            return decode_image(reader.read_image_bytes(uri, self.storage_options))
        except ImageError as e:
            self.corrupt += 1
            log.warning(f"skipping {uri}: {e}")
            return None


def boxes_of(masks: torch.Tensor) -> torch.Tensor:
    """Tight ``x1 y1 x2 y2`` boxes (float32, ``N x 4``) around non-empty ``N x H x W`` masks; x2, y2
    exclusive. From the rows and the columns each mask has a pixel in: two passes over all the masks (the
    loader's threads build a sample's target with them), not a search for every pixel of every mask."""

    def span(lines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first line with a pixel, and one past the last."""
        found = lines.to(torch.uint8)
        return found.argmax(dim=1), lines.shape[1] - found.flip(1).argmax(dim=1)

    (y1, y2), (x1, x2) = span(masks.any(dim=2)), span(masks.any(dim=1))
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Lists of images and targets: detection models take lists of differently sized images."""
    return [image for image, _ in batch], [target for _, target in batch]
