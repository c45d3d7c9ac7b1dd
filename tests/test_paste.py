"""The crop-based mask path is byte-identical to torchvision's paste + pycocotools, on random cases."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as coco_mask
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from batchseg.inference.paste import (
    crop_columns,
    encode_crops,
    mask_crops,
    paste_batch_to_rle,
    paste_to_rle,
    rle_strings,
    run_lengths,
)


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


def test_many_overlapping_instances_in_one_image() -> None:
    rng = np.random.default_rng(11)
    masks, boxes = random_case(rng, 90, 130, n=200)
    boxes[:50] = boxes[50:100] + torch.from_numpy(rng.uniform(-3, 3, size=(50, 4)).astype(np.float32))
    boxes[:50] = (
        boxes[:50].clamp(min=0).minimum(torch.tensor([130.0, 90.0, 130.0, 90.0]))
    )  # clipped as the model does
    assert paste_to_rle(masks, boxes, 90, 130) == standard(masks, boxes, 90, 130)


def test_boxes_touching_every_border_and_thin_masks() -> None:
    height, width = 37, 23
    rng = np.random.default_rng(12)
    boxes = torch.tensor(
        [
            [0.0, 0.0, 5.0, 5.0],  # top-left corner
            [18.0, 0.0, 23.0, 6.0],  # top-right
            [0.0, 30.0, 6.0, 37.0],  # bottom-left
            [17.0, 31.0, 23.0, 37.0],  # bottom-right: ends on the last pixel
            [0.0, 0.0, 23.0, 37.0],  # the whole image
            [0.0, 0.0, 23.0, 4.0],  # the top rows, every column
            [0.0, 33.0, 23.0, 37.0],  # the bottom rows, every column
            [0.0, 0.0, 3.0, 37.0],  # the first columns, every row
            [20.0, 0.0, 23.0, 37.0],  # the last columns, every row
            [10.0, 4.0, 10.0, 30.0],  # 1 pixel wide
            [2.0, 12.0, 20.0, 12.0],  # 1 pixel high
            [0.0, 0.0, 23.0, 0.0],  # 1 pixel high along the top border
            [22.0, 0.0, 22.0, 37.0],  # 1 pixel wide, the whole height, one column from the right
            [22.9, 36.9, 22.9, 36.9],  # the last pixel alone
            [0.0, 0.0, 0.0, 0.0],  # the first pixel alone
        ]
    )
    for fill in (1.0, None):  # masks that fill their box, then noisy ones
        n = len(boxes)
        masks = (
            torch.full((n, 1, 28, 28), fill)
            if fill
            else torch.from_numpy(rng.random((n, 1, 28, 28), np.float32))
        )
        assert paste_to_rle(masks, boxes, height, width) == standard(masks, boxes, height, width)
    full = paste_masks_in_image(torch.ones((n, 1, 28, 28)), boxes, (height, width))[:, 0] > 0.5
    assert full[9].sum(dim=0).count_nonzero() == 1 and full[10].sum(dim=1).count_nonzero() == 1
    assert full[13].sum() == 1 and full[13][-1, -1] and full[14].sum() == 1 and full[14][0, 0]


def test_a_batch_of_images_of_different_sizes_encodes_as_each_image_alone() -> None:
    rng = np.random.default_rng(13)
    sizes = [(40, 60), (1, 50), (50, 1), (1, 1), (7, 300), (64, 48), (30, 30)]
    cases = [random_case(rng, h, w, n) for (h, w), n in zip(sizes, [8, 6, 6, 3, 9, 12, 0], strict=True)]
    got = paste_batch_to_rle([m for m, _ in cases], [b for _, b in cases], sizes)
    assert [len(g) for g in got] == [len(m) for m, _ in cases]
    for (masks, boxes), (height, width), encoded in zip(cases, sizes, got, strict=True):
        assert encoded == standard(masks, boxes, height, width)
    assert paste_batch_to_rle([], [], []) == []


def test_tiles_encode_their_masks_at_the_full_images_size() -> None:
    """A tile's masks, cut to the tile, give the run lengths of the full image's masks (which are never
    made): equal to pycocotools on the tile's pasted masks placed into an empty full-size image."""
    rng = np.random.default_rng(11)
    for _ in range(80):
        height, width = (int(v) for v in rng.integers(1, 90, size=2))
        tile_h, tile_w = (int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1)))
        top, left = int(rng.integers(0, height - tile_h + 1)), int(rng.integers(0, width - tile_w + 1))
        masks, boxes = random_case(rng, tile_h, tile_w, n=6)
        pasted = (paste_masks_in_image(masks, boxes, (tile_h, tile_w))[:, 0] > 0.5).numpy()
        full = np.zeros((len(pasted), height, width), dtype=np.uint8)
        full[:, top : top + tile_h, left : left + tile_w] = pasted
        expected = [(coco_mask.encode(np.asfortranarray(m))["counts"].decode(), int(m.sum())) for m in full]
        crops = crop_columns([masks], [boxes], [(tile_h, tile_w)], windows=[(top, left, height, width)])
        assert rle_strings(run_lengths(crops))[0] == expected
        # The same masks brought to the host as crops, then encoded there.
        placed = [(t + top, le + left, m) for t, le, m in mask_crops(masks, boxes, (tile_h, tile_w))]
        assert encode_crops(placed, height, width) == expected


def test_crops_outside_their_image_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        encode_crops([(5, 0, np.ones((4, 4), dtype=bool))], 8, 8)
    assert encode_crops([], 8, 8) == []
