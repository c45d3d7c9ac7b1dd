"""COCO box and mask AP/AR (pycocotools) of a segmentation output against a COCO instances JSON."""

from __future__ import annotations

import contextlib
import io
import posixpath
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from batchseg.analysis.results import Results
from batchseg.errors import BatchsegError
from batchseg.format.coco import coco_result, load_annotations

METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")  # fmt: skip
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
COLUMNS = ["image_id", "uri", "width", "height", "status", "instances"]
BATCH_ROWS = 4096


def evaluate_output(
    predictions: str,
    annotations: str,
    storage_options: dict[str, Any] | None = None,
    iou_types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """COCO metrics of the segmentation output ``predictions`` against the ground truth ``annotations``.

    ``predictions`` is a segmentation output (the folder/prefix holding ``part-*.parquet``, or one
    Parquet file); ``annotations`` is a COCO instances JSON. Both may be any fsspec URI.

    Each ``ok`` row is matched to a ground-truth image by ``image_id`` (equal to ``str`` of the COCO
    image id) or, failing that, by file name (basename of the row's ``uri`` equal to the basename of
    the image's ``file_name``; a basename shared by several COCO images matches none of them). Rows
    that match no image are ignored and counted (``unmatched_rows``), as are error rows
    (``error_rows``) and further rows for an image already matched (``duplicate_rows``: the first
    row wins). Every ground-truth image stays in the evaluation: one without a row has no detections.
    Category ids of the predictions are used as they are.

    ``iou_types`` defaults to ``("bbox", "segm")`` when every instance has a mask (``rle``), else
    ``("bbox",)``. Box results carry the box; mask results carry only the mask, so mask AP sizes
    objects by mask area (as detectron2 does), not box area.

    Returns ``{"bbox": {metric: float}, "segm": {...}, "images": {"evaluated", "matched",
    "unmatched_rows", "error_rows", "duplicate_rows"}, "detections": int}`` with one entry per
    evaluated IoU type, metrics named and ordered as :data:`METRICS` (``COCOeval.stats``). A metric
    of -1 means the ground truth has no object in that area range; with no detections at all every
    metric is 0.0. Raises :class:`BatchsegError` (one line) for unreadable or non-COCO annotations,
    predictions without part files, without rows, with only error rows or without any row matching
    a ground-truth image, a mask whose size differs from its annotated image's, and an unknown or
    impossible ``iou_types``.
    """
    if isinstance(iou_types, str):
        iou_types = (iou_types,)
    gt = load_annotations(annotations, storage_options)
    results = Results(predictions, storage_options)
    by_id = {str(image["id"]): image["id"] for image in gt.dataset["images"]}
    by_name = _names(gt.dataset["images"])
    seen: set[Any] = set()
    counts = {"rows": 0, "ok": 0, "unmatched_rows": 0, "error_rows": 0, "duplicate_rows": 0}
    detections: list[dict[str, Any]] = []  # COCO results: image_id, category_id, score, bbox, segmentation
    first_row: dict[str, Any] | None = None
    rows = (row for batch in results.batches(COLUMNS, BATCH_ROWS) for row in batch.to_pylist())
    for row in rows:
        counts["rows"] += 1
        if row["status"] != "ok":
            counts["error_rows"] += 1
            continue
        counts["ok"] += 1
        first_row = first_row or row
        image_id = by_id.get(str(row["image_id"]), by_name.get(_basename(str(row["uri"]))))
        if image_id is None:
            counts["unmatched_rows"] += 1
            continue
        if image_id in seen:
            counts["duplicate_rows"] += 1
            continue
        seen.add(image_id)
        image = gt.imgs[image_id]
        size = (row["height"] or image.get("height"), row["width"] or image.get("width"))
        detections.extend(_coco_result(image, size, i, predictions) for i in row["instances"] or [])
    _check_matched(counts, len(seen), first_row, predictions, gt)
    has_masks = all("segmentation" in d for d in detections)
    if iou_types is not None and "segm" in iou_types and not has_masks:
        raise BatchsegError(
            f"cannot evaluate masks (segm): predictions {predictions} have instances without rle"
        )
    metrics: dict[str, Any] = coco_metrics(gt, detections, iou_types)
    metrics["images"] = {
        "evaluated": len(gt.getImgIds()),
        "matched": len(seen),
        "unmatched_rows": counts["unmatched_rows"],
        "error_rows": counts["error_rows"],
        "duplicate_rows": counts["duplicate_rows"],
    }
    metrics["detections"] = len(detections)
    return metrics


def format_table(results: dict[str, Any]) -> str:
    """``results`` of :func:`evaluate_output` as a plain-text table: one line per metric, one column per IoU
    type (4 decimals), then a line of image and detection counts."""
    types = [t for t in IOU_TYPES if t in results]
    width = max(len(m) for m in METRICS) + 2
    lines = ["metric".ljust(width) + "".join(t.rjust(9) for t in types)]
    for metric in METRICS:
        lines.append(metric.ljust(width) + "".join(f"{results[t][metric]:9.4f}" for t in types))
    if any(results[t][m] == -1 for t in types for m in METRICS):
        lines.append("(-1: the ground truth has no object in that area range)")
    images = results.get("images")
    if images:
        lines.append(
            f"images: {images['evaluated']} evaluated, {images['matched']} with predictions; "
            f"rows ignored: {images['unmatched_rows']} unmatched, {images['error_rows']} errors, "
            f"{images.get('duplicate_rows', 0)} duplicates; detections: {results.get('detections', 0)}"
        )
    return "\n".join(lines)


def _basename(name: str) -> str:
    if name.startswith(("http://", "https://")):
        name = urlsplit(name).path
    return posixpath.basename(name.replace("\\", "/"))


def _names(images: list[dict[str, Any]]) -> dict[str, Any]:
    """Basename of ``file_name`` -> image id, leaving out basenames that several images share."""
    names: dict[str, Any] = {}
    shared: set[str] = set()
    for image in images:
        name = _basename(str(image.get("file_name") or ""))
        if not name:
            continue
        if name in names:
            shared.add(name)
        names[name] = image["id"]
    return {k: v for k, v in names.items() if k not in shared}


def _check_matched(
    counts: dict[str, int], matched: int, first_row: dict[str, Any] | None, predictions: str, gt: COCO
) -> None:
    if counts["rows"] == 0:
        raise BatchsegError(f"predictions {predictions} hold no rows")
    if counts["ok"] == 0:
        raise BatchsegError(f"all {counts['rows']} prediction rows of {predictions} are error rows")
    if matched == 0:
        assert first_row is not None
        examples = gt.dataset["images"][:1]
        hint = (
            f" (first row: image_id {first_row['image_id']!r}, uri {first_row['uri']!r}; annotations: "
            f"id {examples[0]['id']!r}, file_name {examples[0].get('file_name')!r})"
            if examples
            else " (the annotations list no images)"
        )
        raise BatchsegError(
            f"none of the {counts['ok']} prediction rows match an image of the annotations "
            f"by image_id or file name{hint}"
        )


def coco_metrics(
    gt: COCO, results: list[dict[str, Any]], iou_types: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """pycocotools' 12 summary metrics of COCO-format ``results`` against the ground truth ``gt``.

    ``results`` are COCO result dicts (``image_id`` of ``gt``, ``category_id``, ``score``, ``bbox``
    ``[x, y, w, h]`` and, for masks, ``segmentation`` as compressed RLE); they are not modified.
    ``iou_types`` defaults to ``("bbox", "segm")`` when every result has a ``segmentation``, else
    ``("bbox",)``. Box evaluation sees only the boxes, mask evaluation only the masks, so mask AP sizes
    objects by mask area (as detectron2 does) rather than box area.

    Returns ``{iou_type: {metric: value}}``, metrics named and ordered as :data:`METRICS`. A value of
    -1 means the ground truth has no object in that area range (pycocotools' convention); with no
    results at all every value is 0.0. Raises :class:`BatchsegError` for an unknown IoU type, ``segm``
    with results that lack masks, or results pycocotools rejects (e.g. an image id not in ``gt``).
    """
    has_masks = all("segmentation" in r for r in results)
    if isinstance(iou_types, str):
        iou_types = (iou_types,)
    if iou_types is None:
        types = list(IOU_TYPES) if has_masks else ["bbox"]
    else:
        types = list(dict.fromkeys(iou_types))
        unknown = [t for t in types if t not in IOU_TYPES]
        if unknown or not types:
            raise BatchsegError(f"unknown IoU type(s) {unknown or types}: choose from {', '.join(IOU_TYPES)}")
        if "segm" in types and not has_masks:
            raise BatchsegError("cannot evaluate masks (segm): some results have no segmentation")
    drop = {"bbox": "segmentation", "segm": "bbox"}
    return {
        t: _run_cocoeval(gt, [{k: v for k, v in r.items() if k != drop[t]} for r in results], t)
        for t in types
    }


def _coco_result(
    image: dict[str, Any], size: tuple[int | None, int | None], instance: dict[str, Any], predictions: str
) -> dict[str, Any]:
    """One instance of a row matched to the ground-truth ``image`` as a COCO result dict."""
    height, width = size
    if instance.get("rle") is not None:
        expected = (image.get("height", height), image.get("width", width))
        if height is None or width is None or expected != (height, width):
            raise BatchsegError(
                f"predictions {predictions} hold a {width}x{height} mask for image {image['id']!r}, "
                f"which the annotations say is {image.get('width')}x{image.get('height')}"
            )
    try:
        return coco_result(instance, image["id"], height, width)
    except ValueError as e:
        raise BatchsegError(f"predictions {predictions} hold {e}") from e


def _run_cocoeval(gt: COCO, results: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    if not results:  # loadRes fails on an empty list; nothing detected scores 0 everywhere
        return dict.fromkeys(METRICS, 0.0)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(results)
            coco_eval = COCOeval(gt, dt, iou_type)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
    except Exception as e:
        raise BatchsegError(f"COCO {iou_type} evaluation failed: {type(e).__name__}: {e}") from e
    stats = np.asarray(coco_eval.stats, dtype=float)
    return {name: float(value) for name, value in zip(METRICS, stats, strict=True)}
