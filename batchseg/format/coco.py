"""COCO formats: reading a COCO instances JSON, naming its categories, and an instance of an output row
as the result dict ``pycocotools.COCO.loadRes`` takes (the one place that conversion is written:
export, evaluation and training's validation use it)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping
from typing import Any

from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from batchseg.errors import BatchsegError, job_errors
from batchseg.io import storage


def coco_result(
    instance: Mapping[str, Any], image_id: Any, height: int | None, width: int | None
) -> dict[str, Any]:
    """One instance (the fields of ``records.INSTANCE``) of a ``height x width`` image as a COCO result.

    Returns ``image_id``, ``category_id`` (int), ``score`` (float), ``bbox`` ``[x, y, w, h]`` floats (from
    the mask when the instance has no box), ``segmentation`` ``{"size": [height, width], "counts": rle}``
    when it has a mask and ``keypoints`` (flat ``x, y, v`` floats) when it has keypoints. Raises
    ``ValueError`` for an instance with neither a box nor a mask, or a mask of an image of unknown size.
    """
    result: dict[str, Any] = {
        "image_id": image_id,
        "category_id": int(instance["category_id"]),
        "score": float(instance["score"]),
    }
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


def load_annotations(annotations: str, storage_options: dict[str, Any] | None = None) -> COCO:
    """A pycocotools ``COCO`` ground truth from the COCO instances JSON at ``annotations`` (any fsspec URI).

    Raises :class:`BatchsegError` when it is missing, unreadable, not JSON, or not COCO instances
    (an object with ``images`` and ``categories`` lists, and ``annotations`` if any).
    """
    with job_errors(f"cannot read annotations {annotations}"):
        try:
            data = storage.read_bytes(annotations, storage_options)
        except FileNotFoundError as e:
            raise BatchsegError(f"annotations not found: {annotations}") from e
        except IsADirectoryError as e:
            raise BatchsegError(f"annotations {annotations} is a folder, not a COCO JSON file") from e
    try:
        dataset = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BatchsegError(f"annotations {annotations} is not JSON: {e}") from e
    missing = [k for k in ("images", "categories") if not isinstance(dataset, dict) or k not in dataset]
    if missing or not all(
        isinstance(dataset.get(k, []), list) for k in ("images", "categories", "annotations")
    ):
        raise BatchsegError(
            f"annotations {annotations} is not a COCO instances JSON (it needs 'images', 'categories' and "
            f"'annotations' lists{'; missing ' + ', '.join(repr(k) for k in missing) if missing else ''})"
        )
    dataset.setdefault("annotations", [])
    gt = COCO()
    gt.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()  # reads every image's, annotation's and category's id
    except KeyError as e:
        raise BatchsegError(
            f"annotations {annotations} is not a COCO instances JSON: an entry lacks {e}"
        ) from e
    except TypeError as e:
        raise BatchsegError(f"annotations {annotations} is not a COCO instances JSON: {e}") from e
    return gt


def category_names(coco: COCO) -> tuple[str, ...]:
    """Names indexed by label: the data set's own category ids are the model's labels, 0 is background and
    gaps are ``N/A`` (as in torchvision's COCO list), so predictions carry the data set's ids."""
    return names_by_label({c["id"]: c["name"] for c in coco.dataset["categories"]})


def names_by_label(categories: Mapping[int, str]) -> tuple[str, ...]:
    """``categories`` (id -> name) indexed by label: 0 is ``__background__``, gaps are ``N/A``."""
    if not categories or min(categories) < 1:
        raise BatchsegError("COCO category ids must be positive integers (0 is the background)")
    return ("__background__", *(categories.get(i, "N/A") for i in range(1, max(categories) + 1)))


def to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO segmentation (polygons, RLE or uncompressed RLE) of a ``height x width`` image as the
    compressed RLE dict pycocotools decodes (``counts`` bytes or str), via pycocotools."""
    if isinstance(segmentation, list):
        rle: dict[str, Any] = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        return rle
    if isinstance(segmentation.get("counts"), list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
        return rle
    return dict(segmentation)
