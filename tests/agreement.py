"""Two runs of one model on the same images compared (fp32 against bf16, CPU against GPU): instances
matched, box and mask differences, and how many box coordinates lie on bf16's grid. Used by the tests
and by bench/precision.py and bench/gpu.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from batchseg.format.rle import decode_rle
from batchseg.train.synth import draw_shapes

Instances = list[dict[str, Any]]  # one image's instances, as Predictor gives them

# bf16 keeps 8 significant bits: from 512 to 1024 pixels its numbers are 4 pixels apart.
GRID_FROM, GRID_STEP = 512, 4


def scaled_shapes(count: int, seed: int = 0, side: int = 1000) -> list[np.ndarray]:
    """``count`` shapes images drawn at the size the shipped model was trained on (about 128 pixels),
    scaled up to about ``side`` pixels a side: large boxes for a model run at ``--min-size 1024``."""
    rng = np.random.default_rng(seed)
    scaled = []
    for _ in range(count):
        pixels = draw_shapes(rng, 128).pixels
        height, width = pixels.shape[:2]
        size = (round(width * side / 128), round(height * side / 128))
        scaled.append(np.array(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)))
    return scaled


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two ``[x, y, w, h]`` boxes."""
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    union = a[2] * a[3] + b[2] * b[3] - w * h
    return w * h / union if union > 0 else 0.0


def matched(first: Instances, second: Instances, min_iou: float = 0.5) -> list[tuple[dict, dict]]:
    """Pairs of one image's instances from two runs: each of ``first``'s, best score first, with the
    unmatched instance of ``second`` of its category whose box overlaps it most (at least ``min_iou``)."""
    pairs = []
    free = list(second)
    for instance in sorted(first, key=lambda i: -i["score"]):
        same = [o for o in free if o["category_id"] == instance["category_id"]]
        best = max(same, key=lambda o: box_iou(instance["bbox"], o["bbox"]), default=None)
        if best is not None and box_iou(instance["bbox"], best["bbox"]) >= min_iou:
            pairs.append((instance, best))
            free.remove(best)
    return pairs


def corners(instance: dict[str, Any]) -> np.ndarray:
    x, y, w, h = instance["bbox"]
    return np.array([x, y, x + w, y + h], dtype=np.float64)


@dataclass(frozen=True)
class Agreement:
    """How two runs over the same images agree: ``instances`` of the first run, ``pairs`` of them matched
    in the second; ``box_px`` the mean absolute difference of the matched boxes' corners in pixels;
    ``mask_iou`` the least mask IoU of a matched pair (None without masks); ``on_grid`` the share of the
    second run's box coordinates at ``GRID_FROM`` pixels or more that lie on a multiple of ``GRID_STEP``
    (about 0.25 for float32 boxes near image borders, 1.0 for bf16 boxes)."""

    instances: int
    pairs: int
    box_px: float
    mask_iou: float | None
    on_grid: float

    def line(self) -> str:
        mask = f", least mask IoU {self.mask_iou:.3f}" if self.mask_iou is not None else ""
        return (
            f"{self.pairs} of {self.instances} instances matched; boxes differ by {self.box_px:.2f} px on "
            f"average{mask}; {self.on_grid:.0%} of coordinates >= {GRID_FROM} px on a multiple of {GRID_STEP}"
        )


def agreement(first: list[Instances], second: list[Instances], sizes: list[tuple[int, int]]) -> Agreement:
    """``first`` and ``second``: each image's instances from two runs; ``sizes``: each image's
    ``(height, width)``, for the masks."""
    pairs, ious = [], []
    for (height, width), a, b in zip(sizes, first, second, strict=True):
        for x, y in matched(a, b):
            pairs.append((x, y))
            if x["rle"] is not None:  # (batchseg's decoder: bench/gpu.sh's python may lack pycocotools)
                a, b = (decode_rle(i["rle"], height, width) for i in (x, y))
                ious.append(float((a & b).sum() / max(1, (a | b).sum())))
    differences = [np.abs(corners(x) - corners(y)) for x, y in pairs]
    coordinates = np.concatenate([corners(i) for image in second for i in image] or [np.zeros(0)])
    large = coordinates[coordinates >= GRID_FROM]
    return Agreement(
        instances=sum(len(a) for a in first),
        pairs=len(pairs),
        box_px=float(np.mean(differences)) if differences else 0.0,
        mask_iou=min(ious) if ious else None,
        on_grid=float(np.mean(large % GRID_STEP == 0)) if len(large) else 0.0,
    )
