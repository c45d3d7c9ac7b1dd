"""The synthetic shapes data set: deterministic, valid COCO, masks that match the pixels."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pycocotools.mask as coco_mask
from pycocotools.coco import COCO

from batchseg.io.images import decode_image
from batchseg.io.manifest import iter_manifest
from batchseg.train.synth import CATEGORIES, write_dataset


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        inner = mask.copy()
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        mask = inner
    return mask


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: pathlib.Path) -> None:
    first = write_dataset(str(tmp_path / "a"), 6, seed=3)
    again = write_dataset(str(tmp_path / "b"), 6, seed=3)
    other = write_dataset(str(tmp_path / "c"), 6, seed=4)
    read = lambda uris: [pathlib.Path(u).read_bytes() for u in uris]  # noqa: E731
    assert read(first.uris) == read(again.uris)
    assert read(first.uris) != read(other.uris)
    assert pathlib.Path(first.annotations).read_text() == pathlib.Path(again.annotations).read_text()


def test_annotations_are_valid_coco_and_match_the_images(tmp_path: pathlib.Path) -> None:
    data = write_dataset(str(tmp_path), 12, seed=0, size=96)
    coco = COCO(data.annotations)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES[1:])
    assert sorted(coco.getImgIds()) == list(range(1, 13))
    counts = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1
    for image in coco.loadImgs(coco.getImgIds()):
        pixels = decode_image((pathlib.Path(data.images) / image["file_name"]).read_bytes())
        assert pixels.shape == (image["height"], image["width"], 3)
        union = np.zeros(pixels.shape[:2], bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            mask = coco.annToMask(ann).astype(bool)
            assert ann["area"] == mask.sum() > 0
            assert (
                ann["bbox"]
                == coco_mask.toBbox(coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))).tolist()
            )
            assert not (union & mask).any(), "visible masks of one image do not overlap"
            union |= mask
            # A shape is drawn in one flat colour: away from its edges (JPEG rings there), it is uniform.
            inner = erode(mask, 2)
            if inner.sum() >= 20:
                assert pixels[inner].std(axis=0).mean() < 8


def test_manifest_names_each_image_with_its_coco_id(tmp_path: pathlib.Path) -> None:
    data = write_dataset(str(tmp_path), 3, seed=0)
    rows = [pair for ids, uris in iter_manifest(data.manifest) for pair in zip(ids, uris, strict=True)]
    images = json.loads(pathlib.Path(data.annotations).read_text())["images"]
    assert rows == [(str(i["id"]), str(pathlib.Path(data.images) / i["file_name"])) for i in images]
