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

from batchseg.masks import compress_counts


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
    ``paste_masks_in_image(masks, boxes, (height, width))[i, 0] > threshold``.
    """
    if len(masks) == 0:
        return []
    padded, scale = expand_masks(masks, padding=1)
    int_boxes = expand_boxes(boxes.float(), scale).to(torch.int64).tolist()
    crops, places = [], []
    for mask, (bx0, by0, bx1, by1) in zip(padded, int_boxes, strict=True):
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        x0, x1, y0, y1 = max(bx0, 0), min(bx1 + 1, width), max(by0, 0), min(by1 + 1, height)
        if x1 <= x0 or y1 <= y0:  # the box lies outside the image
            x1, y1 = x0, y0
            crops.append(mask.new_zeros(0, dtype=torch.bool))
        else:
            resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            crops.append((resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] > threshold).reshape(-1))
        places.append((y0, x0, y1 - y0, x1 - x0))
    # One copy to the host for all crops: on a GPU, a copy per instance would wait on each.
    flat = torch.cat(crops).cpu().numpy()
    out = []
    offset = 0
    for y0, x0, h, w in places:
        crop = flat[offset : offset + h * w].reshape(h, w)
        offset += h * w
        out.append((compress_counts(crop_counts(crop, y0, x0, height, width)), int(crop.sum())))
    return out


def crop_counts(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """COCO run lengths (column-major, starting with background) of a ``height x width`` mask that is
    zero everywhere but ``crop`` (bool, ``h x w``), placed with its top-left pixel at ``(y0, x0)``.

    Work is proportional to the crop: a run starts wherever a crop column changes value, counting
    the zero rows just above and below the crop; two starts at the same full-image index cancel (a run
    of ones that ends at the bottom of one column and continues at the top of the next).
    """
    h, w = crop.shape
    total = height * width
    if h == 0 or w == 0 or not crop.any():
        return np.array([total], dtype=np.int64)
    padded = np.zeros((h + 2, w), dtype=bool)
    padded[1:-1] = crop
    cols, rows = np.nonzero((padded[1:] != padded[:-1]).T)  # column-major order, as COCO counts
    starts = (x0 + cols).astype(np.int64) * height + y0 + rows
    starts, multiplicity = np.unique(starts, return_counts=True)
    starts = starts[(multiplicity % 2 == 1) & (starts < total)]  # a run may end on the very last pixel
    return np.diff(np.concatenate(([0], starts, [total]))).astype(np.int64)
