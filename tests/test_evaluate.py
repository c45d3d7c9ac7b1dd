"""COCO evaluation of segmentation outputs: known AP values, pycocotools parity, row matching, errors."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pathlib
from typing import Any

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from batchseg.analysis.evaluate import METRICS, coco_metrics, evaluate_output, format_table
from batchseg.errors import BatchsegError, ImageError
from batchseg.format.coco import load_annotations
from batchseg.format.output import shard_object
from batchseg.format.records import error_row, ok_row, to_parquet
from batchseg.format.rle import decode_rle, encode_rle
from batchseg.train.synth import write_dataset

# Two 50 (wide) x 40 (high) images, one square per (image, category); every object is "small" (< 32²
# pixels), so the medium and large ranges have no ground truth and pycocotools reports -1 there.
WIDTH, HEIGHT = 50, 40
SQUARES = {  # name: (image id, category id, x, y, side)
    "A": (1, 1, 2, 2, 10),
    "B": (1, 2, 20, 20, 10),
    "C": (2, 1, 5, 25, 8),
    "D": (2, 2, 30, 5, 12),
}
CATEGORY_NAMES = {1: "circle", 2: "square", 3: "triangle"}


def square_mask(x: int, y: int, side: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[y : y + side, x : x + side] = True
    return mask


def instance(category: int, bbox: list[float], mask: np.ndarray | None, score: float = 0.9) -> dict[str, Any]:
    return {
        "category_id": category,
        "category": CATEGORY_NAMES[category],
        "score": score,
        "bbox": bbox,
        "area": int(mask.sum()) if mask is not None else int(bbox[2] * bbox[3]),
        "rle": encode_rle(mask) if mask is not None else None,
        "keypoints": None,
    }


def found(name: str, score: float = 0.9, category: int | None = None) -> dict[str, Any]:
    """A prediction that is exactly square ``name`` (optionally with another category)."""
    _, cat, x, y, side = SQUARES[name]
    return instance(category or cat, [x, y, side, side], square_mask(x, y, side), score)


def write_gt(
    path: pathlib.Path, image_ids: tuple[int, ...] = (1, 2), squares: dict[str, Any] = SQUARES
) -> str:
    """A COCO instances JSON of ``squares`` on the images ``image_ids``."""
    images = [{"id": i, "file_name": f"img-{i:06d}.jpg", "width": WIDTH, "height": HEIGHT} for i in image_ids]
    annotations: list[dict[str, Any]] = []
    for image_id, category, x, y, side in squares.values():
        if image_id in image_ids:
            mask = square_mask(x, y, side)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, side, side],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": [HEIGHT, WIDTH], "counts": encode_rle(mask)},
                }
            )
    categories = [{"id": i, "name": n, "supercategory": "shape"} for i, n in CATEGORY_NAMES.items()]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path)


def write_output(folder: pathlib.Path, *parts: list[dict[str, Any]]) -> str:
    """A segmentation output as the job writes it: one ``part-NNNNNN.parquet`` per list of rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, rows in enumerate(parts):
        (folder / shard_object(index)).write_bytes(to_parquet(rows, provenance={}))
    return str(folder)


def row(image_id: int | str, *instances: dict[str, Any], uri: str | None = None) -> dict[str, Any]:
    return ok_row(str(image_id), uri or f"/data/images/img-{image_id}.jpg", WIDTH, HEIGHT, list(instances))


def reference(annotations: str, results: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    """pycocotools run directly: ground truth from the file, detections via ``loadRes``."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(annotations)
        coco_eval = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return dict(zip(METRICS, (float(v) for v in coco_eval.stats), strict=True))


def coco_results(rows: list[tuple[int, dict[str, Any]]], iou_type: str) -> list[dict[str, Any]]:
    """The COCO result list for (gt image id, instance) pairs. Mask results carry no box, so that
    pycocotools sizes them by mask area (as batchseg.analysis.evaluate does)."""
    out = []
    for image_id, inst in rows:
        result = {"image_id": image_id, "category_id": inst["category_id"], "score": inst["score"]}
        if iou_type == "bbox":
            result["bbox"] = inst["bbox"]
        else:
            result["segmentation"] = {"size": [HEIGHT, WIDTH], "counts": inst["rle"]}
        out.append(result)
    return out


def test_perfect_predictions_score_one(tmp_path: pathlib.Path) -> None:
    gt = write_gt(tmp_path / "gt.json")
    out = write_output(tmp_path / "out", [row(1, found("A"), found("B")), row(2, found("C"), found("D"))])
    results = evaluate_output(out, gt)
    assert set(results) == {"bbox", "segm", "images", "detections"}
    for iou_type in ("bbox", "segm"):
        metrics = results[iou_type]
        assert list(metrics) == list(METRICS)
        assert all(type(v) is float for v in metrics.values())
        for name in ("AP", "AP50", "AP75", "APs", "AR1", "AR10", "AR100", "ARs"):
            assert metrics[name] == pytest.approx(1.0), (iou_type, name)
        for name in ("APm", "APl", "ARm", "ARl"):  # no ground truth of that size: pycocotools' -1
            assert metrics[name] == -1.0, (iou_type, name)
    assert results["images"] == {
        "evaluated": 2,
        "matched": 2,
        "unmatched_rows": 0,
        "error_rows": 0,
        "duplicate_rows": 0,
    }
    assert results["detections"] == 4


def test_half_found_with_a_false_positive(tmp_path: pathlib.Path) -> None:
    # A and D found exactly (0.9), B and C missed, one false positive of category 1 (0.5) on image 2.
    # Per category: 2 ground truths, the top-scored detection is a hit (precision 1 at recall 0.5), the
    # false positive adds no recall. Interpolated precision is 1 at the 51 recall thresholds 0.00..0.50
    # and 0 at the 50 above, at every IoU threshold (hits are exact): AP = 51/101 for both categories.
    gt = write_gt(tmp_path / "gt.json")
    fp = instance(1, [40, 30, 6, 6], square_mask(40, 30, 6), score=0.5)
    out = write_output(tmp_path / "out", [row(1, found("A"))], [row(2, found("D"), fp)])
    results = evaluate_output(out, gt)
    pairs = [(1, found("A")), (2, found("D")), (2, fp)]
    for iou_type in ("bbox", "segm"):
        assert results[iou_type] == reference(gt, coco_results(pairs, iou_type), iou_type)
        assert results[iou_type]["AP"] == pytest.approx(51 / 101)
        assert results[iou_type]["AP50"] == pytest.approx(51 / 101)
        assert results[iou_type]["AR100"] == pytest.approx(0.5)
    assert results["detections"] == 3


def test_wrong_category_scores_zero(tmp_path: pathlib.Path) -> None:
    gt = write_gt(tmp_path / "gt.json")
    swapped = [
        row(1, found("A", category=2), found("B", category=1)),
        row(2, found("C", category=2), found("D", category=1)),
    ]
    results = evaluate_output(write_output(tmp_path / "out", swapped), gt)
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "AR100"):
            assert results[iou_type][name] == 0.0
        assert results[iou_type]["APm"] == -1.0


def test_box_only_predictions_give_bbox_only_and_iou_thresholds_apply(tmp_path: pathlib.Path) -> None:
    # One ground-truth box [2, 2, 10, 10]; the predicted box [2, 2, 10, 6.2] covers 62 of its 100 pixels
    # (IoU 0.62): a hit at the IoU thresholds 0.50, 0.55 and 0.60, a miss at 0.65 .. 0.95.
    gt = write_gt(tmp_path / "gt.json", image_ids=(1,), squares={"A": SQUARES["A"]})
    out = write_output(tmp_path / "out", [row(1, instance(1, [2, 2, 10, 6.2], None))])
    results = evaluate_output(out, gt)
    assert set(results) == {"bbox", "images", "detections"}
    assert results["bbox"]["AP50"] == pytest.approx(1.0)  # pycocotools' precision is tp / (tp + fp + eps)
    assert results["bbox"]["AP75"] == 0.0
    assert results["bbox"]["AP"] == pytest.approx(0.3)
    with pytest.raises(BatchsegError, match="cannot evaluate masks"):
        evaluate_output(out, gt, iou_types=["segm"])
    with pytest.raises(BatchsegError, match="unknown IoU type"):
        evaluate_output(out, gt, iou_types=["keypoints"])


def test_rows_match_by_image_id_then_file_name(tmp_path: pathlib.Path) -> None:
    # Image 3 (one square, category 1) has no row: it stays in the evaluation and lowers recall.
    gt = write_gt(tmp_path / "gt.json", image_ids=(1, 2, 3), squares=SQUARES | {"E": (3, 1, 10, 10, 9)})
    by_name = ok_row(
        "5f1d7a0c9e3b2a11", "s3://bucket/photos/img-000002.jpg", WIDTH, HEIGHT, [found("C"), found("D")]
    )
    unknown = ok_row("zzz", "s3://bucket/photos/other.jpg", WIDTH, HEIGHT, [found("A")])
    failed = error_row("2", "s3://bucket/photos/img-000002.jpg", ImageError("not_found", "gone"))
    duplicate = row(1, found("B", score=0.3))
    out = write_output(
        tmp_path / "out", [row(1, found("A"), found("B")), unknown], [failed, by_name, duplicate]
    )
    results = evaluate_output(out, gt)
    assert results["images"] == {
        "evaluated": 3,
        "matched": 2,
        "unmatched_rows": 1,
        "error_rows": 1,
        "duplicate_rows": 1,
    }
    assert results["detections"] == 4
    pairs = [(1, found("A")), (1, found("B")), (2, found("C")), (2, found("D"))]
    for iou_type in ("bbox", "segm"):
        assert results[iou_type] == reference(gt, coco_results(pairs, iou_type), iou_type)
        # category 1 finds 2 of its 3 objects, category 2 both of its 2: mean recall (2/3 + 1) / 2
        assert results[iou_type]["AR100"] == pytest.approx((2 / 3 + 1) / 2)


def test_no_detections_scores_zero(tmp_path: pathlib.Path) -> None:
    gt = write_gt(tmp_path / "gt.json")
    results = evaluate_output(write_output(tmp_path / "out", [row(1), row(2)]), gt)
    assert results["bbox"] == dict.fromkeys(METRICS, 0.0)
    assert results["segm"] == dict.fromkeys(METRICS, 0.0)
    assert results["detections"] == 0


def test_coco_metrics_on_results_with_boxes_and_masks(tmp_path: pathlib.Path) -> None:
    # The form training's validation gives: every result has both a box and a mask.
    gt_path = write_gt(tmp_path / "gt.json")
    fp = instance(1, [40, 30, 6, 6], square_mask(40, 30, 6), score=0.5)
    pairs = [(1, found("A")), (2, found("D")), (2, fp)]
    both = [
        r | {"segmentation": s["segmentation"]}
        for r, s in zip(coco_results(pairs, "bbox"), coco_results(pairs, "segm"), strict=True)
    ]
    before = copy.deepcopy(both)
    metrics = coco_metrics(load_annotations(gt_path), both)
    assert both == before
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type] == reference(gt_path, coco_results(pairs, iou_type), iou_type)
    assert set(coco_metrics(load_annotations(gt_path), both, "bbox")) == {"bbox"}
    assert coco_metrics(load_annotations(gt_path), []) == {
        "bbox": dict.fromkeys(METRICS, 0.0),
        "segm": dict.fromkeys(METRICS, 0.0),
    }


def test_mask_of_another_size_than_the_annotated_image_is_refused(tmp_path: pathlib.Path) -> None:
    gt = write_gt(tmp_path / "gt.json")
    small = np.zeros((HEIGHT, HEIGHT), dtype=bool)
    small[2:12, 2:12] = True
    wrong = ok_row("1", "/x/img-1.jpg", HEIGHT, HEIGHT, [instance(1, [2, 2, 10, 10], small)])
    with pytest.raises(
        BatchsegError, match=f"hold a {HEIGHT}x{HEIGHT} mask for image 1, .* is {WIDTH}x{HEIGHT}"
    ):
        evaluate_output(write_output(tmp_path / "out", [wrong]), gt)


def test_job_level_problems_are_one_line_errors(tmp_path: pathlib.Path) -> None:
    gt = write_gt(tmp_path / "gt.json")
    out = write_output(tmp_path / "out", [row(1, found("A"))])
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    cases = [
        ((out, str(tmp_path / "missing.json")), r"annotations not found: .*missing\.json"),
        ((out, str(tmp_path / "bad.json")), "is not JSON"),
        ((out, str(tmp_path / "list.json")), "not a COCO instances JSON"),
        ((str(tmp_path / "empty"), gt), r"holds no part-NNNNNN\.parquet files: not a batchseg"),
        ((str(tmp_path / "nowhere"), gt), r"holds no part-NNNNNN\.parquet files: not a batchseg"),
    ]
    for args, message in cases:
        with pytest.raises(BatchsegError, match=message) as raised:
            evaluate_output(*args)
        assert "\n" not in str(raised.value)
    strangers = write_output(tmp_path / "strangers", [row("x1", uri="/a/b.jpg"), row("x2", uri="/a/c.jpg")])
    with pytest.raises(
        BatchsegError, match="none of the 2 prediction rows match an image of the annotations"
    ):
        evaluate_output(strangers, gt)
    failed = write_output(tmp_path / "failed", [error_row("1", "/a/img.jpg", ImageError("not_found", "x"))])
    with pytest.raises(BatchsegError, match=r"all 1 prediction rows .* are error rows"):
        evaluate_output(failed, gt)


def test_format_table(tmp_path: pathlib.Path) -> None:
    gt = write_gt(tmp_path / "gt.json")
    fp = instance(1, [40, 30, 6, 6], square_mask(40, 30, 6), score=0.5)
    results = evaluate_output(
        write_output(tmp_path / "out", [row(1, found("A"))], [row(2, found("D"), fp)]), gt
    )
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "bbox", "segm"]
    for metric in METRICS:
        assert any(line.split()[:1] == [metric] for line in lines)
    ap_line = next(line for line in lines if line.split()[0] == "AP")
    assert ap_line.split()[1:] == [f"{51 / 101:.4f}"] * 2
    assert "-1.0000" in table and "no object in that area range" in table
    assert "2 evaluated" in table and "detections: 3" in table


def test_synth_dataset_ground_truth_as_predictions_scores_one(tmp_path: pathlib.Path) -> None:
    dataset = write_dataset(str(tmp_path / "shapes"), 4, seed=0, size=96)
    coco = json.loads(pathlib.Path(dataset.annotations).read_text())
    rows = []
    for image in coco["images"]:
        instances = []
        for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            mask = decode_rle(ann["segmentation"]["counts"], image["height"], image["width"])
            instances.append(
                {
                    "category_id": ann["category_id"],
                    "category": "shape",
                    "score": 1.0,
                    "bbox": ann["bbox"],
                    "area": int(mask.sum()),
                    "rle": encode_rle(mask),
                    "keypoints": None,
                }
            )
        uri = f"{dataset.images}/{image['file_name']}"
        # even images as the job names the rows of a manifest without image_id: matched by file name
        image_id = str(image["id"]) if image["id"] % 2 else f"{image['id']:016x}"
        rows.append(ok_row(image_id, uri, image["width"], image["height"], instances))
    results = evaluate_output(write_output(tmp_path / "out", rows[:2], rows[2:]), dataset.annotations)
    assert results["images"]["matched"] == 4
    assert results["detections"] == len(coco["annotations"])
    for iou_type in ("bbox", "segm"):
        assert results[iou_type]["AP"] == pytest.approx(1.0)
        assert results[iou_type]["AR100"] == pytest.approx(1.0)
