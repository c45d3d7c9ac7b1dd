"""Load a detection model once, then turn batches of RGB images into instances (no Ray in here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.models.detection.transform import resize_boxes, resize_keypoints

from batchseg.inference.models import WeightsInfo, build_model, load_state_dict
from batchseg.inference.paste import Runs, crop_columns, mask_crops, rle_strings, run_lengths
from batchseg.inference.precision import AUTOCAST_DTYPES, keep_boxes_float32, resolve_precision
from batchseg.inference.tiling import KEEP, PIECE, Piece, Tile, TileGrid

Detections = tuple[dict[str, torch.Tensor], int, int]  # one image's raw outputs, height, width


@dataclass(frozen=True)
class HostDetections:
    """A batch's detections on the host (:meth:`Predictor.to_host`). ``table`` has one float32 row per
    instance, images in order: ``x1 y1 x2 y2`` in the image's pixels, score, label, then for a keypoint
    model the keypoints' ``x y v`` triplets; ``per_image`` counts each image's rows; ``runs`` holds the
    masks' run lengths for a mask model, else None."""

    table: np.ndarray
    per_image: list[int]
    runs: Runs | None
    keypoints: bool


class Predictor:
    """A detection model held in memory, called on batches of images (detectron2's predictor shape:
    the model is loaded once, each call takes a batch).

    Args:
        model: a torchvision detection model (``GeneralizedRCNN``), already on its device; it is put in
            eval mode, and its own settings (score threshold, detections per image, resize) apply. Its
            boxes are kept float32 under autocast (:func:`~batchseg.inference.precision.keep_boxes_float32`).
        categories: ``categories[label]`` names each label; index 0 is the background.
        mask_threshold: a mask pixel is foreground where the pasted mask probability exceeds this.
        precision: ``fp32``, ``bf16``, ``fp16`` or ``auto``
            (:func:`~batchseg.inference.precision.resolve_precision`).

    :meth:`from_weights` builds one from ``--weights`` and the options of ``batchseg segment``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        categories: Sequence[str],
        *,
        mask_threshold: float = 0.5,
        precision: str = "auto",
    ) -> None:
        self.model = keep_boxes_float32(model.eval())
        self.categories = tuple(categories)
        self.mask_threshold = mask_threshold
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(precision, self.device)

    @classmethod
    def from_weights(
        cls,
        weights: WeightsInfo,
        *,
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        min_size: int | None = None,
        max_size: int | None = None,
        max_instances: int = 100,
        device: str = "cpu",
        precision: str = "auto",
        storage_options: dict[str, Any] | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Predictor:
        """The model ``weights`` name, with them loaded, on ``device``: ``state_dict`` when given (loaded
        once for a job, on its driver), else read here (through ``storage_options``).

        ``score_threshold`` drops instances inside the model; ``max_instances`` keeps the best ones;
        ``min_size``/``max_size`` set the model's own resize: when None, the size a checkpoint was trained
        for, else the model's default (torchvision's 800 and 1333).
        """
        options: dict[str, Any] = {
            "box_score_thresh": score_threshold,
            "box_detections_per_img": max_instances,
        }
        min_size = min_size or weights.min_size
        max_size = max_size or weights.max_size
        if min_size:
            options["min_size"] = min_size
        if max_size:
            options["max_size"] = max_size
        if state_dict is None:
            state_dict = load_state_dict(weights, storage_options)
        model = build_model(weights, state_dict, **options)
        return cls(model.to(device), weights.categories, mask_threshold=mask_threshold, precision=precision)

    def __call__(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[list[dict[str, Any]]]:
        """Instances for each image: ``images[i]`` is H x W x 3 uint8 RGB (numpy) or 3 x H x W uint8 (torch,
        on any device); the result's ``[i]`` is a list of dicts with the fields of
        :data:`batchseg.format.records.INSTANCE`, boxes in that image's pixels."""
        return self.describe(self.detect(images))

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[Detections]:
        """The model's raw detections (tensors still on the device), with each image's size."""
        if not images:
            return []
        tensors = [self._to_device(im) for im in images]
        dtype = AUTOCAST_DTYPES[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            outputs = self.forward(tensors)
        return [(out, int(t.shape[-2]), int(t.shape[-1])) for out, t in zip(outputs, tensors, strict=True)]

    @torch.inference_mode()
    def describe(self, detections: list[Detections]) -> list[list[dict[str, Any]]]:
        """Raw detections as instance dicts, masks encoded: :meth:`to_host` (device work and the copies)
        then :meth:`instances` (host work only)."""
        return self.instances(self.to_host(detections))

    @torch.inference_mode()
    def to_host(self, detections: list[Detections]) -> HostDetections:
        """A batch's detections on the host, in two device-to-host copies whatever the number of images:
        one of boxes, scores, labels (and keypoints), then one of the masks' run lengths, computed on the
        device from those boxes (:mod:`batchseg.inference.paste`). Each copy waits for the work queued
        before it on the current CUDA stream."""
        if not detections:
            return HostDetections(np.zeros((0, 6), dtype=np.float32), [], None, keypoints=False)
        outputs = [out for out, _, _ in detections]
        table, per_image, keypoints = _table(outputs)
        runs = None
        if "masks" in outputs[0]:
            boxes = torch.from_numpy(table[:, :4]).split(per_image)
            sizes = [(height, width) for _, height, width in detections]
            masks = [out["masks"].float() for out in outputs]
            runs = run_lengths(crop_columns(masks, boxes, sizes, self.mask_threshold))
        return HostDetections(table, per_image, runs, keypoints)

    @torch.inference_mode()
    def describe_tiles(
        self, detections: list[Detections], tiles: Sequence[tuple[TileGrid, Tile]]
    ) -> list[tuple[list[dict[str, Any]], list[Piece]]]:
        """Raw detections of tiles (``tiles[i]``: the grid and tile of ``detections[i]``), in their images'
        pixels: for each tile, the instances it keeps whole, their masks encoded at the image's full size,
        and its pieces of larger objects, their masks on the host (:meth:`TileGrid.fates`). The same two
        device-to-host copies as :meth:`to_host`, and one per tile with pieces."""
        if not detections:
            return []
        outputs = [out for out, _, _ in detections]
        table, per_image, keypoints = _table(outputs)
        at_tile = table[:, :4].copy()  # boxes in the tile's pixels, for the masks' paste
        bounds = np.cumsum([0, *per_image])
        fates = []
        for (grid, tile), start, end in zip(tiles, bounds[:-1], bounds[1:], strict=True):
            placed = table[start:end]  # a view: the table moves to the image's pixels
            placed[:, [0, 2]] += tile.left
            placed[:, [1, 3]] += tile.top
            if keypoints:
                placed[:, 6::3] += tile.left
                placed[:, 7::3] += tile.top
            fates.append(grid.fates(tile, placed))
        kept = [np.flatnonzero(f == KEEP) for f in fates]
        cut = [np.flatnonzero(f == PIECE) for f in fates]
        runs = None
        masked = "masks" in outputs[0]
        if masked:
            runs = run_lengths(
                crop_columns(
                    [
                        out["masks"][torch.from_numpy(k).to(out["masks"].device)].float()
                        for out, k in zip(outputs, kept, strict=True)
                    ],
                    [torch.from_numpy(at_tile[start + k]) for start, k in zip(bounds, kept, strict=False)],
                    [(height, width) for _, height, width in detections],
                    self.mask_threshold,
                    [(tile.top, tile.left, grid.height, grid.width) for grid, tile in tiles],
                )
            )
        rows = [table[start + k] for start, k in zip(bounds, kept, strict=False)]
        whole = self.instances(HostDetections(np.concatenate(rows), [len(k) for k in kept], runs, keypoints))
        results = []
        for i, ((_, tile), k) in enumerate(zip(tiles, cut, strict=True)):
            start = int(bounds[i])
            dicts = self.instances(HostDetections(table[start + k], [len(k)], None, keypoints))[0]
            crops: list[tuple[int, int, np.ndarray] | None] = [None] * len(k)
            if masked and len(k):
                out, height, width = detections[i]
                index = torch.from_numpy(k).to(out["masks"].device)
                crops = [
                    (top + tile.top, left + tile.left, mask)
                    for top, left, mask in mask_crops(
                        out["masks"][index].float(),
                        torch.from_numpy(at_tile[start + k]),
                        (height, width),
                        self.mask_threshold,
                    )
                ]
            pieces = []
            for instance, j, crop in zip(dicts, k.tolist(), crops, strict=True):
                x1, y1, x2, y2 = table[start + j, :4].tolist()
                pieces.append(Piece(tile.index, instance, (x1, y1, x2, y2), crop))
            results.append((whole[i], pieces))
        return results

    def instances(self, detections: HostDetections) -> list[list[dict[str, Any]]]:
        """Each image's instances, dicts with the fields of :data:`batchseg.format.records.INSTANCE`, boxes
        in that image's pixels: host work only (the masks' COCO strings, then the dicts)."""
        masks = rle_strings(detections.runs) if detections.runs is not None else None
        categories = self.categories
        rows = iter(detections.table.tolist())
        result: list[list[dict[str, Any]]] = []
        for image, count in enumerate(detections.per_image):
            instances = []
            for i in range(count):
                x1, y1, x2, y2, score, label, *keypoints = next(rows)
                label = int(label)
                rle, area = masks[image][i] if masks is not None else (None, round((x2 - x1) * (y2 - y1)))
                instances.append(
                    {
                        "category_id": label,
                        "category": categories[label] if label < len(categories) else str(label),
                        "score": score,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": area,
                        "rle": rle,
                        "keypoints": keypoints if detections.keypoints else None,
                    }
                )
            result.append(instances)
        return result

    def _to_device(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``3 x H x W`` float32 in [0, 1] on the model's device, from H x W x 3 uint8 numpy pixels or a
        3 x H x W uint8 tensor already there (decoded on the device). Host pixels go through pinned
        memory so the copy overlaps with work already queued on the GPU."""
        if isinstance(image, np.ndarray):
            tensor = torch.from_numpy(image).permute(2, 0, 1)
            if self.device.type == "cuda":
                tensor = tensor.pin_memory()
            image = tensor.to(self.device, non_blocking=True)
        return image.float().div_(255)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The model's own eval forward (``GeneralizedRCNN.forward``) except the mask paste, on ``3 x H x W``
        float images in [0, 1] already on the device (no autocast here: the caller chooses). Boxes
        (``x1 y1 x2 y2``, float32 under any autocast) and keypoints come back in each image's pixels; masks stay the mask head's
        ``N x 1 x 28 x 28`` probabilities for :func:`batchseg.inference.paste.paste_to_rle`."""
        model: Any = self.model
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
        for detection, resized, original in zip(detections, batch.image_sizes, sizes, strict=True):
            detection["boxes"] = resize_boxes(detection["boxes"], resized, original)
            if "keypoints" in detection:
                detection["keypoints"] = resize_keypoints(detection["keypoints"], resized, original)
        return detections


def _table(outputs: list[dict[str, torch.Tensor]]) -> tuple[np.ndarray, list[int], bool]:
    """A batch's boxes, scores, labels (and keypoints) on the host in one copy (see :class:`HostDetections`),
    each image's count of rows, and whether there are keypoints."""
    per_image = [len(out["boxes"]) for out in outputs]
    keypoints = "keypoints" in outputs[0]
    # Labels travel as float32 beside the boxes and scores: exact for any label below 2**24.
    fields = [
        [out["boxes"].float(), out["scores"].float()[:, None], out["labels"].float()[:, None]]
        + ([out["keypoints"].float().flatten(1)] if keypoints else [])
        for out in outputs
    ]
    return torch.cat([torch.cat(f, dim=1) for f in fields]).cpu().numpy(), per_image, keypoints
