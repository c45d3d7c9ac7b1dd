"""The crop-based mask path is byte-identical to torchvision's paste + pycocotools, on random cases."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as coco_mask
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from batchseg.inference.paste import paste_to_rle


def standard(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> list[tuple[str, int]]:
    pasted = (paste_masks_in_image(masks, boxes, (height, width))[:, 0] > 0.5).numpy()
    return [
        (coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode(), int(m.sum()))
        for m in pasted
    ]


def random_case(
    rng: np.random.Generator, height: int, width: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask probabilities and boxes as the model gives them: boxes clipped to the image, so after
    torchvision's expansion they often cross its border."""
    masks = torch.from_numpy(rng.random((n, 1, 28, 28), dtype=np.float32))
    corners = rng.uniform(-0.3, 1.3, size=(n, 2, 2)) * np.array([width, height])
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1).clip(
        0, [width, height, width, height]
    )
    kinds = rng.integers(0, 6, size=n)
    masks[kinds == 0] = 0.0  # empty
    masks[kinds == 1] = 1.0  # full
    boxes[kinds == 2] = [width, height, width, height] - rng.uniform(
        0, 1.5, size=(int((kinds == 2).sum()), 1)
    )
    boxes[kinds == 3, 2:] = boxes[kinds == 3, :2] + rng.uniform(
        0, 1, size=(int((kinds == 3).sum()), 2)
    )  # ~1 px
    boxes[kinds == 4] = [0, 0, width, height]  # the whole image: runs end on the last pixel
    return masks, torch.from_numpy(boxes.astype(np.float32))


@pytest.mark.parametrize("size", [(1, 1), (2, 9), (31, 17), (64, 48), (120, 200)])
def test_random_boxes_and_masks_encode_byte_identically(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(size))
    height, width = size
    for _ in range(60):
        masks, boxes = random_case(rng, height, width, n=8)
        assert paste_to_rle(masks, boxes, height, width) == standard(masks, boxes, height, width)


def test_other_thresholds_and_no_instances() -> None:
    rng = np.random.default_rng(3)
    masks, boxes = random_case(rng, 50, 70, n=10)
    expected = (paste_masks_in_image(masks, boxes, (50, 70))[:, 0] > 0.8).numpy()
    got = paste_to_rle(masks, boxes, 50, 70, threshold=0.8)
    assert [c for c, _ in got] == [
        coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode() for m in expected
    ]
    assert paste_to_rle(masks[:0], boxes[:0], 50, 70) == []


def test_runs_that_wrap_from_one_column_into_the_next() -> None:
    """A crop spanning the full height: its ones run from a column's bottom into the next one's top."""
    masks = torch.ones((1, 1, 28, 28))
    boxes = torch.tensor([[2.0, 0.0, 4.0, 4.0]])
    assert paste_to_rle(masks, boxes, 4, 6) == standard(masks, boxes, 4, 6)
    full = (paste_masks_in_image(masks, boxes, (4, 6))[0, 0] > 0.5).numpy()
    assert full[:, 1:5].all() and not full[:, [0, 5]].any()  # the expanded box covers columns 1 to 4
