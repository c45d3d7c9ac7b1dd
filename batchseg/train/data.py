"""COCO-format instance segmentation data for training: images and annotations from any fsspec URI."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as coco_mask

from batchseg.errors import BatchsegError, ImageError
from batchseg.format.coco import category_names, load_annotations
from batchseg.io import reader, storage
from batchseg.io.images import decode_image

log = logging.getLogger(__name__)

Target = dict[str, torch.Tensor]


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


class CocoInstances(torch.utils.data.Dataset):
    """Images with their instances, as torchvision's detection models take them in training.

    ``dataset[i]`` is ``(image, target)``: image a float32 ``3 x H x W`` tensor in [0, 1]; target has
    ``boxes`` (float32 ``N x 4``, x1 y1 x2 y2 pixels), ``labels`` (int64 ``N``, the COCO category ids),
    ``masks`` (uint8 ``N x H x W``) and ``image_id`` (int64 scalar: the image it came from, which is not
    always ``ids[i]``; see ``__getitem__``). Images without instances are left out (they teach nothing);
    evaluation reads every image of the annotations with :meth:`pixels`. An image that cannot be read or
    decoded is skipped and counted in :attr:`corrupt`. ``flip`` mirrors images at random (training).
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
        self.coco = load_annotations(annotations, storage_options)
        self.categories = category_names(self.coco)
        self.flip = flip
        self.storage_options = storage_options
        self.stats = DataStats()
        self.ids: list[int] = []
        self.annotations: dict[int, list[dict[str, Any]]] = {}
        for image_id in sorted(self.coco.getImgIds()):
            image = self.coco.imgs[image_id]
            kept = [a for a in self.coco.imgToAnns.get(image_id, []) if self._valid(a, image)]
            if kept:
                self.ids.append(image_id)
                self.annotations[image_id] = kept
            else:
                self.stats.images_without_instances += 1
        self.corrupt = 0
        if self.stats.invalid_annotations or self.stats.images_without_instances:
            log.warning(f"{annotations}: {self.stats.summary()}")

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

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        """The image at ``index``; an unreadable one is counted, logged, and the next readable one given
        instead, so every distributed worker keeps the same batch size (DDP needs equal steps)."""
        for offset in range(len(self.ids)):
            item = self._load((index + offset) % len(self.ids))
            if item is not None:
                return item
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

    def _load(self, index: int) -> tuple[torch.Tensor, Target] | None:
        image_id = self.ids[index]
        pixels = self.pixels(image_id)
        if pixels is None:
            return None
        height, width = pixels.shape[:2]
        anns = self.annotations[image_id]
        masks = np.stack([self._mask(a, height, width) for a in anns])
        keep = masks.reshape(len(anns), -1).any(axis=1)
        image = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)
        target = {
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "masks": torch.from_numpy(masks[keep]),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[
                torch.from_numpy(keep)
            ],
        }
        if self.flip and torch.rand(()) < 0.5:  # torch's RNG: DataLoader seeds each loader worker apart
            image = image.flip(-1)
            target["masks"] = target["masks"].flip(-1)
        target["boxes"] = boxes_of(target["masks"])
        return image, target

    def _mask(self, ann: dict[str, Any], height: int, width: int) -> np.ndarray:
        """The annotation's mask (polygons, RLE or uncompressed RLE), via pycocotools, at the image's size."""
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        return coco_mask.decode(rle).astype(np.uint8)


def boxes_of(masks: torch.Tensor) -> torch.Tensor:
    """Tight ``x1 y1 x2 y2`` boxes (float32, ``N x 4``) around ``N x H x W`` masks; x2, y2 exclusive."""
    boxes = torch.zeros((len(masks), 4), dtype=torch.float32)
    for i, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes[i] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
    return boxes


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Lists of images and targets: detection models take lists of differently sized images."""
    return [image for image, _ in batch], [target for _, target in batch]
