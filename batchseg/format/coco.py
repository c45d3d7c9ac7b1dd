"""COCO results format: an instance of an output row as the dict ``pycocotools.COCO.loadRes`` takes.

This is the one place that conversion is written; export, evaluation and training's validation use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pycocotools import mask as coco_mask


def coco_result(
    instance: Mapping[str, Any], image_id: Any, height: int | None, width: int | None
) -> dict[str, Any]:
    """One instance (the fields of ``records.INSTANCE``) of a ``height x width`` image as a COCO result.

    Returns ``image_id``, ``category_id`` (int), ``score`` (float), ``bbox`` ``[x, y, w, h]`` floats (from
    the mask when the instance has no box), ``segmentation`` ``{"size": [height, width], "counts": rle}``
    when it has a mask and ``keypoints`` (flat ``x, y, v`` floats) when it has keypoints. Raises
    ``ValueError`` for an instance with neither a box nor a mask, or a mask of an image of unknown size.
    """
    result: dict[str, Any] = {"image_id": image_id, "category_id": int(instance["category_id"]),
                              "score": float(instance["score"])}  # fmt: skip
    rle = instance.get("rle")
    if rle is not None:
        if height is None or width is None:
            raise ValueError(f"a mask of image {image_id!r}, whose size is not known")
        result["segmentation"] = {"size": [int(height), int(width)], "counts": rle}
    bbox = instance.get("bbox")
    if (bbox is None or len(bbox) != 4) and rle is not None:
        bbox = coco_mask.toBbox(result["segmentation"]).tolist()
    if bbox is None or len(bbox) != 4:
        raise ValueError(f"an instance of image {image_id!r} without a box")
    result["bbox"] = [float(v) for v in bbox]
    if instance.get("keypoints") is not None:
        result["keypoints"] = [float(v) for v in instance["keypoints"]]
    return result
