"""COCO export of a segmentation output: the results format that ``pycocotools.COCO.loadRes`` takes,
written as a stream, plus the matching COCO ``images`` and ``categories`` for review tools."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pyarrow.compute as pc

from batchseg.analysis.results import open_results
from batchseg.errors import BatchsegError, job_errors
from batchseg.format.coco import coco_result
from batchseg.io import atomic, storage
from batchseg.io.manifest import absolute_uri

SKIPPED_NAMES = ("__background__", "N/A")


def export_coco(
    output: str, out: str, images_out: str | None = None, storage_options: dict[str, Any] | None = None
) -> dict[str, int]:
    """Write every instance of the ``ok`` rows at ``output`` to ``out`` as a COCO results list
    (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``, ``segmentation`` {size, counts}),
    and, with ``images_out``, ``{"images", "categories", "annotations": []}`` (a data set without ground
    truth, whose ids the results use). Image ids are the rows' ids when all are integers (as in a COCO
    manifest), else 1, 2, ... in output order, with the original id kept as ``batchseg_image_id``."""
    if images_out and absolute_uri(images_out) == absolute_uri(out):
        raise BatchsegError(f"--images {images_out} is also --out: each needs its own file")
    results = open_results(output, storage_options)
    ids = results.to_table(columns=["image_id"]).column("image_id")
    numeric = bool(pc.all(pc.match_substring_regex(ids, r"^[0-9]+$")).as_py()) if len(ids) else True
    counts = {"images": 0, "instances": 0, "skipped_rows": 0}
    with job_errors(f"cannot write the COCO export {out}"), contextlib.ExitStack() as stack:
        fs, path = storage.filesystem(out, storage_options)
        with job_errors(f"cannot write {out}"):  # each file appears whole, or not at all
            detections = stack.enter_context(atomic.open_whole(fs, path))
        listing = None
        if images_out:
            fs_images, images_path = storage.filesystem(images_out, storage_options)
            with job_errors(f"cannot write {images_out}"):
                listing = stack.enter_context(atomic.open_whole(fs_images, images_path))
            listing.write(b'{"images": [')
        detections.write(b"[")
        for image in results.images():
            if image.status != "ok":
                counts["skipped_rows"] += 1
                continue
            coco_id = int(image.image_id) if numeric else counts["images"] + 1
            if listing is not None:
                entry = {
                    "id": coco_id,
                    "file_name": image.uri,
                    "width": image.width,
                    "height": image.height,
                    "batchseg_image_id": image.image_id,
                }
                listing.write((b"," if counts["images"] else b"") + json.dumps(entry).encode())
            counts["images"] += 1
            for instance in image.instances:
                result = coco_result(instance, coco_id, image.height, image.width)
                detections.write((b"," if counts["instances"] else b"") + json.dumps(result).encode())
                counts["instances"] += 1
        detections.write(b"]")
        if listing is not None:
            names = results.provenance.get("categories") or []
            categories = [{"id": i, "name": n} for i, n in enumerate(names) if i and n not in SKIPPED_NAMES]
            listing.write(b'], "categories": ' + json.dumps(categories).encode() + b', "annotations": []}')
    return counts
