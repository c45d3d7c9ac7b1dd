"""Masks straight from the model's 28 x 28 outputs to COCO RLE, touching only each instance's box.

torchvision's postprocess pastes every mask into a full-size float image (``paste_masks_in_image``),
which a caller then thresholds and encodes column by column: for 100 instances at 800 x 1333 that is
about 100 M pixels of work and 400 MB at once. Here each mask is resized exactly as torchvision does
(the same padding, box expansion, integer box and bilinear ``interpolate``), thresholded inside its box
only, and the COCO run lengths of the full-size mask are computed from those crops on the masks' device,
a whole batch of images at once: the output is byte-identical, the work and memory are the boxes'. Only
the run lengths and areas come to the host, in one copy per batch; the host writes the COCO strings.

The three steps are public so that ``bench/gpu_masks.py`` can time each: :func:`crop_columns` and
:func:`run_lengths` on the device, then :func:`rle_strings` on the host.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

from batchseg.format.rle import compress_groups

Encoded = tuple[str, int]  # COCO compressed RLE counts, mask area in pixels


def paste_to_rle(
    masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5
) -> list[Encoded]:
    """COCO compressed RLE counts and pixel area of each instance's full-size thresholded mask, for one
    image (:func:`paste_batch_to_rle` with a batch of one).

    Args:
        masks: ``N x 1 x M x M`` mask probabilities as the mask head gives them (any float dtype/device).
        boxes: ``N x 4`` boxes ``x1, y1, x2, y2`` in the original image's pixels (as after postprocess).
        height, width: the original image's size.
        threshold: a pixel is foreground where the pasted probability is above it.

    Returns ``[(counts, area), ...]``; ``counts`` equals pycocotools' encoding of
    ``paste_masks_in_image(masks, boxes, (height, width))[i, 0] > threshold``.
    """
    return paste_batch_to_rle([masks], [boxes], [(height, width)], threshold)[0]


def paste_batch_to_rle(
    masks: Sequence[torch.Tensor],
    boxes: Sequence[torch.Tensor],
    sizes: Sequence[tuple[int, int]],
    threshold: float = 0.5,
) -> list[list[Encoded]]:
    """:func:`paste_to_rle` of each image of a batch (``masks[i]``, ``boxes[i]``, ``sizes[i] = (height,
    width)``), with one device-to-host copy for the whole batch."""
    return rle_strings(run_lengths(crop_columns(masks, boxes, sizes, threshold)))


@dataclass(frozen=True)
class Crops:
    """A batch's thresholded masks, each cut to its image, laid end to end on the device.

    ``flat`` (bool, on the masks' device) holds instance after instance, each as a block of segments;
    a segment is a run of pixels that follow each other in COCO's column-major order, between two
    background pads: one per column of the crop, or the whole crop when it spans the image's height.
    ``layout`` (host, ``6 x n`` int64) gives for each instance: ``offset`` and ``end`` of its block in
    ``flat``, ``segment`` (the length of each of its segments, pads included), ``base`` (the COCO
    pixel index of the crop's top-left pixel), its image's ``height`` and ``total`` pixels.
    ``hidden`` lists positions of ``flat`` where a change is not a run start: the pad after a crop
    that ends on its image's last pixel. ``per_image`` counts the instances of each image.
    """

    flat: torch.Tensor
    layout: np.ndarray
    hidden: np.ndarray
    per_image: list[int]


@dataclass(frozen=True)
class Runs:
    """COCO run lengths of a batch's full-size masks, on the host: ``counts`` of every instance end to
    end (the first counts background, so it is 0 for a mask that starts with foreground), ``lengths[k]``
    of them for instance ``k``, ``areas[k]`` its foreground pixels; ``per_image`` as in :class:`Crops`."""

    counts: np.ndarray
    lengths: np.ndarray
    areas: np.ndarray
    per_image: list[int]


Window = tuple[int, int, int, int]  # top, left of an image within its canvas; the canvas's height, width


def crop_columns(
    masks: Sequence[torch.Tensor],
    boxes: Sequence[torch.Tensor],
    sizes: Sequence[tuple[int, int]],
    threshold: float = 0.5,
    windows: Sequence[Window | None] | None = None,
) -> Crops:
    """Each mask resized into its box exactly as torchvision pastes it, thresholded, and cut to its image,
    written into one sequence on the masks' device (see :class:`Crops`).

    ``masks[i]``, ``boxes[i]`` and ``sizes[i]`` are those of image ``i``, as :func:`paste_to_rle` takes
    them. Boxes may be on the host: the integer boxes, which size every crop, are needed there (one copy
    if they are on the device). One ``interpolate`` and one comparison per instance, as many as
    torchvision's own paste launches. ``windows[i] = (top, left, height, width)`` says that image ``i`` is
    a tile at ``(top, left)`` of a larger ``height x width`` image: its masks are cut to the tile, and their
    run lengths are those of that image's full-size masks (which never exist); None: the image is its own.
    """
    per_image = [len(m) for m in masks]
    device = masks[0].device if masks else torch.device("cpu")
    if sum(per_image) == 0:
        nothing = np.zeros((6, 0), dtype=np.int64)
        return Crops(torch.zeros(0, dtype=torch.bool, device=device), nothing, nothing[0], per_image)
    padded, scale = expand_masks(torch.cat(list(masks)), padding=1)
    int_boxes = expand_boxes(torch.cat([b.float().cpu() for b in boxes]), scale).to(torch.int64).numpy()
    placed = [
        window or (0, 0, *size) for window, size in zip(windows or [None] * len(sizes), sizes, strict=True)
    ]
    top, left, canvas_height, canvas_width = (
        np.repeat(np.array(values, dtype=np.int64), per_image) for values in zip(*placed, strict=True)
    )
    height = np.repeat(np.array([h for h, _ in sizes], dtype=np.int64), per_image)
    width = np.repeat(np.array([w for _, w in sizes], dtype=np.int64), per_image)
    bx0, by0, bx1, by1 = int_boxes.T
    x0, y0 = np.maximum(bx0, 0), np.maximum(by0, 0)
    x1, y1 = np.minimum(bx1 + 1, width), np.minimum(by1 + 1, height)
    inside = (x1 > x0) & (y1 > y0)  # else the box lies outside the image: nothing to crop
    w, h = np.where(inside, x1 - x0, 0), np.where(inside, y1 - y0, 0)
    column, offset, layout, hidden = _layout(x0 + left, y0 + top, w, h, canvas_height, canvas_width)
    flat = torch.zeros(int(layout[1, -1]), dtype=torch.bool, device=device)
    box_size = np.maximum(bx1 - bx0 + 1, 1), np.maximum(by1 - by0 + 1, 1)
    cuts = np.stack([bx0, by0, *box_size, x0, y0, w, h, column, offset + 1])[:, inside].T.tolist()
    for i, (box_left, box_top, box_w, box_h, x, y, crop_w, crop_h, step, first) in zip(
        np.flatnonzero(inside).tolist(), cuts, strict=True
    ):
        crop = _resized(padded[i], box_w, box_h)[
            y - box_top : y - box_top + crop_h, x - box_left : x - box_left + crop_w
        ]
        torch.gt(crop.T, threshold, out=flat.as_strided((crop_w, crop_h), (step, 1), first))
    return Crops(flat, layout, hidden, per_image)


def _resized(padded: torch.Tensor, box_w: int, box_h: int) -> torch.Tensor:
    """One padded mask resized to its integer box's size, as torchvision's paste does (bilinear)."""
    return F.interpolate(padded[None], size=(box_h, box_w), mode="bilinear", align_corners=False)[0, 0]


def _layout(
    x0: np.ndarray, y0: np.ndarray, w: np.ndarray, h: np.ndarray, height: np.ndarray, width: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each crop's columns go in :class:`Crops`' ``flat``: crops ``w x h`` (0 x 0: nothing) at
    ``(x0, y0)`` of images ``height x width``. Returns each crop's column step and block offset, the
    ``layout`` and ``hidden`` of :class:`Crops`."""
    # A crop as tall as its image is contiguous in COCO order: one segment, so that ones running from a
    # column's bottom into the next column's top stay one run.
    tall = (h > 0) & (h == height)
    column = np.where(tall, h, h + 2)  # from one column's first pixel to the next one's in ``flat``
    segment = np.where(tall, w * h + 2, h + 2)
    block = np.where(tall, w * h + 2, w * (h + 2))
    end = np.cumsum(block)
    offset = end - block
    hidden = end[(h > 0) & (y0 + h == height) & (x0 + w == width)] - 1
    layout = np.stack([offset, end, segment, x0 * height + y0, height, height * width])
    return column, offset, layout, hidden


def mask_crops(
    masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float = 0.5
) -> list[tuple[int, int, np.ndarray]]:
    """One image's thresholded masks, each cut to its box within the image, on the host: ``(top, left,
    mask)`` per instance, ``mask`` a bool array, as :func:`crop_columns` cuts them (empty when the box
    lies outside the image)."""
    if not len(masks):
        return []
    padded, scale = expand_masks(masks, padding=1)
    int_boxes = expand_boxes(boxes.float().cpu(), scale).to(torch.int64).tolist()
    height, width = size
    crops = []
    for mask, (bx0, by0, bx1, by1) in zip(padded, int_boxes, strict=True):
        x0, y0 = max(bx0, 0), max(by0, 0)
        x1, y1 = min(bx1 + 1, width), min(by1 + 1, height)
        if x1 <= x0 or y1 <= y0:
            crops.append((y0, x0, np.zeros((0, 0), dtype=bool)))
            continue
        resized = _resized(mask, max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1))
        crop = resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
        crops.append((y0, x0, (crop > threshold).cpu().numpy()))
    return crops


def encode_crops(crops: Sequence[tuple[int, int, np.ndarray]], height: int, width: int) -> list[Encoded]:
    """COCO compressed RLE counts and area of ``height x width`` masks each given by a crop: ``(top, left,
    mask)``, ``mask`` a bool array lying inside the image (on the host). The full-size masks never exist;
    the result equals pycocotools' encoding of each."""
    if not crops:
        return []
    top, left = (np.array(v, dtype=np.int64) for v in zip(*[(t, le) for t, le, _ in crops], strict=True))
    h = np.array([m.shape[0] if m.size else 0 for _, _, m in crops], dtype=np.int64)
    w = np.array([m.shape[1] if m.size else 0 for _, _, m in crops], dtype=np.int64)
    if np.any(top + h > height) or np.any(left + w > width) or np.any(top < 0) or np.any(left < 0):
        raise ValueError("a crop lies outside its image")
    n = len(crops)
    canvas_h, canvas_w = np.full(n, height, dtype=np.int64), np.full(n, width, dtype=np.int64)
    column, offset, layout, hidden = _layout(left, top, w, h, canvas_h, canvas_w)
    flat = np.zeros(int(layout[1, -1]), dtype=bool)
    for (_, _, mask), step, first in zip(crops, column.tolist(), (offset + 1).tolist(), strict=True):
        if mask.size:
            np.lib.stride_tricks.as_strided(flat[first:], mask.T.shape, (step, 1), writeable=True)[:] = mask.T
    runs = run_lengths(Crops(torch.from_numpy(flat), layout, hidden, [n]))
    return rle_strings(runs)[0]


def run_lengths(crops: Crops) -> Runs:
    """The COCO run lengths and areas of every instance's full-size mask, computed on the crops' device
    and copied to the host in one go.

    A run starts wherever ``flat`` changes value (but at ``hidden`` positions); each such change maps to
    its pixel in the full image. With ``m`` starts ``s_1 < ... < s_m`` in an image of ``total`` pixels,
    the counts are the differences of ``0, s_1, ..., s_m, total``, and the area is the sum of the counts
    at odd places. Finding the changes (``torch.nonzero``) waits for the device once, since their number
    sizes everything after it; what follows is a few element-wise steps and the copy.
    """
    offset, end, segment, base, height, total = crops.layout
    n = len(offset)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Runs(empty, empty, empty, crops.per_image)
    device = crops.flat.device
    # A change at index i of ``change`` starts a run at position p = i + 1 of ``flat``; in instance k,
    # p is q = p - offset[k] into its block, in segment x = q // segment[k], at pixel
    # base[k] + x * height[k] + (q - x * segment[k] - 1) = i + (base - offset)[k] + x * (height - segment)[k].
    table = np.concatenate(
        [offset[1:] - 1, offset - 1, segment, base - offset, height - segment, end - 1, total, crops.hidden]
    )
    meta = torch.from_numpy(table)
    if device.type == "cuda":
        meta = meta.pin_memory()
    meta = meta.to(device, non_blocking=True)
    after, before, segment_t, shift, step, last, total_t = meta[: 7 * n - 1].split([n - 1] + [n] * 6)
    change = crops.flat[1:] != crops.flat[:-1]
    if len(crops.hidden):
        change[meta[7 * n - 1 :] - 1] = False
    i = torch.nonzero(change).squeeze(1)  # sorted: by instance, then pixel
    t = len(i)
    instance = torch.searchsorted(after, i, right=True)  # an empty block shares its offset with the next
    x = (i - before[instance]).div_(segment_t[instance], rounding_mode="floor")
    start = i + shift[instance] + x * step[instance]
    done = torch.searchsorted(i, last)  # run starts in instances 0..k
    starts = torch.diff(done, prepend=done.new_zeros(1))
    # Instance k's counts fill slots head[k] .. tail[k] of the output: the differences of its run starts,
    # then ``total`` minus the last.
    tail = done + torch.arange(n, device=device)
    head = tail - starts
    ends = torch.empty(t + n, dtype=torch.int64, device=device)
    ends[torch.arange(t, device=device) + instance] = start
    ends[tail] = total_t
    begins = torch.cat([ends.new_zeros(1), ends[:-1]])
    begins[head] = 0
    counts = ends - begins
    # Area: the counts at a group's odd places, which are the odd slots of a group that starts on an even
    # slot and the even slots of one that starts on an odd slot, summed from cumulative sums.
    zero = counts.new_zeros(1)
    even = torch.cat([zero, counts[0::2].cumsum(0)])  # even[j]: the sum over even slots below 2j
    odd = torch.cat([zero, counts[1::2].cumsum(0)])  # odd[j]: the sum over odd slots below 2j + 1
    on_odd = odd[(tail + 1) // 2] - odd[head // 2]
    on_even = even[(tail + 2) // 2] - even[(head + 1) // 2]
    areas = torch.where(head % 2 == 0, on_odd, on_even)
    host = torch.cat([counts, starts + 1, areas]).cpu().numpy()
    return Runs(host[: t + n], host[t + n : t + 2 * n], host[t + 2 * n :], crops.per_image)


def rle_strings(runs: Runs) -> list[list[Encoded]]:
    """Each image's ``[(counts, area), ...]``: the COCO compressed strings of :func:`run_lengths`' output
    (numpy, on the host)."""
    encoded = list(zip(compress_groups(runs.counts, runs.lengths), runs.areas.tolist(), strict=True))
    bounds = np.cumsum([0, *runs.per_image]).tolist()
    return [encoded[a:b] for a, b in itertools.pairwise(bounds)]
