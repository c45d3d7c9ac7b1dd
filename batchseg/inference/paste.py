"""Masks straight from the model's 28 x 28 outputs to COCO RLE, touching only each instance's box.

torchvision's postprocess pastes every mask into a full-size float image (``paste_masks_in_image``),
which a caller then thresholds and encodes column by column: for 100 instances at 800 x 1333 that is
about 100 M pixels of work and 400 MB at once. Here each mask is resized exactly as torchvision does
(the same padding, box expansion, integer box and bilinear ``interpolate``), thresholded inside its box
only, and the COCO run lengths of the full-size mask are computed from that crop: the output is
byte-identical, the work and memory are the box's. On a GPU, only the thresholded crops come to the host.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

from batchseg.format.rle import compress_groups


def paste_to_rle(
    masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5
) -> list[tuple[str, int]]:
    """COCO compressed RLE counts and pixel area of each instance's full-size thresholded mask.

    Args:
        masks: ``N x 1 x M x M`` mask probabilities as the mask head gives them (any float dtype/device).
        boxes: ``N x 4`` boxes ``x1, y1, x2, y2`` in the original image's pixels (as after postprocess).
        height, width: the original image's size.
        threshold: a pixel is foreground where the pasted probability is above it.

    Returns ``[(counts, area), ...]``; ``counts`` equals pycocotools' encoding of
    ``paste_masks_in_image(masks, boxes, (height, width))[i, 0] > threshold``. The three steps
    (:func:`crop_columns` on the device, :func:`run_starts`, then :func:`encode_crops` on the host) are
    public so that ``bench/gpu_masks.py`` can time each.
    """
    if len(masks) == 0:
        return []
    flat, places = crop_columns(masks, boxes, height, width, threshold)
    return encode_crops(run_starts(flat), places, height, width)


def crop_columns(
    masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5
) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """Each mask resized into its box exactly as torchvision pastes it, thresholded, and cut to the image.

    Returns the crops laid end to end on the masks' device as one uint8 sequence (each crop column by
    column, COCO's order, each column between two background pixels), and each crop's place
    ``(y0, x0, h, w)`` in the image (``h * w == 0`` for a box outside the image), as
    :func:`encode_crops` takes them.
    """
    padded, scale = expand_masks(masks, padding=1)
    int_boxes = expand_boxes(boxes.float(), scale).to(torch.int64).tolist()
    columns, places = [], []
    for mask, (bx0, by0, bx1, by1) in zip(padded, int_boxes, strict=True):
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        x0, x1, y0, y1 = max(bx0, 0), min(bx1 + 1, width), max(by0, 0), min(by1 + 1, height)
        if x1 <= x0 or y1 <= y0:  # the box lies outside the image
            x1, y1 = x0, y0
        else:
            resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            crop = resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] > threshold
            columns.append(F.pad(crop.T.to(torch.uint8), (1, 1)).reshape(-1))
        places.append((y0, x0, y1 - y0, x1 - x0))
    flat = torch.cat(columns) if columns else torch.zeros(0, dtype=torch.uint8, device=masks.device)
    return flat, places


def run_starts(flat: torch.Tensor) -> np.ndarray:
    """Where the sequence changes value, found on its device and copied to the host in one go (on a GPU, a
    copy per instance would wait on each)."""
    return (torch.nonzero(flat[1:] != flat[:-1]).squeeze(1) + 1).cpu().numpy()


def encode_crops(
    change: np.ndarray, places: list[tuple[int, int, int, int]], height: int, width: int
) -> list[tuple[str, int]]:
    """COCO RLE counts and areas of several ``height x width`` masks, each zero outside its crop, in one
    vectorised pass (a few numpy calls per image, not per instance).

    ``places[k]`` is ``(y0, x0, h, w)``: crop ``k`` covers rows ``y0:y0+h`` and columns ``x0:x0+w``.
    The crops that are not empty (``h * w > 0``) laid end to end, in order, each as its ``w`` columns
    of ``h + 2`` values (0, the column's pixels as 0/1, 0), make one sequence; ``change`` holds the
    positions where it differs from the value before. A run starts at each such change; a start at the same pixel twice cancels (ones running from a column's bottom into the next
    column's top), and one at ``height * width`` is the end of the mask.
    """
    n = len(places)
    total = height * width
    y0, x0, h, w = (np.array([p[i] for p in places], dtype=np.int64).reshape(n) for i in range(4))
    w = np.where(h > 0, w, 0)
    h = np.where(w > 0, h, 0)
    # Per column of every crop: its instance, image column, top row and offset in ``flat``.
    owner = np.repeat(np.arange(n), w)
    column = x0[owner] + np.arange(len(owner)) - np.repeat(np.cumsum(w) - w, w)
    offsets = np.concatenate(([0], np.cumsum(h[owner] + 2)))[:-1]
    c = np.searchsorted(offsets, change, side="right") - 1
    start = column[c] * height + y0[owner[c]] + (change - offsets[c]) - 1
    instance = owner[c]
    # Already sorted (flat is in instance, column, row order): a start found twice is an adjacent pair.
    pair = (start[1:] == start[:-1]) & (instance[1:] == instance[:-1])
    keep = start < total
    keep[1:] &= ~pair
    keep[:-1] &= ~pair
    instance, start = instance[keep], start[keep]
    # counts = differences of (0, starts..., total) within each instance
    first = np.ones(len(start), dtype=bool)
    first[1:] = instance[1:] != instance[:-1]
    previous = np.concatenate(([0], start[:-1]))
    previous[first] = 0
    body = start - previous
    last = np.flatnonzero(np.append(first[1:], True)) if len(start) else np.zeros(0, dtype=np.int64)
    counts = np.insert(body, last + 1, total - start[last])
    owners = np.insert(instance, last + 1, instance[last])
    empty = np.setdiff1d(np.arange(n), instance)  # no run starts: all background
    counts = np.concatenate((counts, np.full(len(empty), total)))
    owners = np.concatenate((owners, empty))
    order = np.argsort(owners, kind="stable")
    counts, owners = counts[order], owners[order]
    group_start = np.searchsorted(owners, np.arange(n))
    position = np.arange(len(counts)) - group_start[owners]
    areas = np.bincount(owners, weights=counts * (position % 2 == 1), minlength=n).astype(np.int64)
    return [
        (text, int(area))
        for text, area in zip(compress_groups(counts, position, owners, n), areas, strict=True)
    ]
