"""COCO run-length encoding of binary masks in pure numpy, byte-compatible with pycocotools."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def rle_counts(mask: np.ndarray) -> np.ndarray:
    """Run lengths of ``mask`` (H x W, any dtype, nonzero = foreground) in COCO order.

    COCO walks the mask column by column (Fortran order) and the first run counts background
    pixels, so it is 0 when the first pixel is foreground. Returns an int64 array.
    """
    flat = np.asarray(mask).astype(bool, copy=False).ravel(order="F")
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds)
    if flat[0]:
        counts = np.concatenate(([0], counts))
    return counts.astype(np.int64, copy=False)


def compress_counts(counts: np.ndarray) -> str:
    """COCO's compressed string form of run lengths (``rleToString`` in pycocotools' maskApi.c)."""
    counts = np.asarray(counts, dtype=np.int64)
    return compress_groups(counts, np.array([len(counts)]))[0]


def compress_groups(counts: np.ndarray, lengths: np.ndarray) -> list[str]:
    """COCO's compressed strings of several run-length lists at once: ``counts`` holds them end to end,
    ``lengths[k]`` values for list ``k``.

    Each count from the fourth on (``i > 2`` in the C code) is stored as the difference to the count two
    places before, then written as 5-bit groups, least significant first, each as one character from
    48 up, with 0x20 marking that more groups follow: as many groups as the value needs as a signed
    number (its sign is the last group's 0x10 bit). Vectorised over every value, in int32 unless a count
    needs more; most values take one character, so each later pass only touches the few that need more.
    """
    counts = np.asarray(counts)
    lengths = np.asarray(lengths, dtype=np.int64)
    dtype: type[np.signedinteger[Any]] = np.int32 if not len(counts) or counts.max() < 2**31 else np.int64
    values = counts.astype(dtype)
    values[2:] -= counts[:-2].astype(dtype)
    starts = np.cumsum(lengths) - lengths
    for i in range(3):  # the first three counts of each list are written as they are
        first_three = starts[lengths > i] + i
        values[first_three] = counts[first_three]
    magnitude = values ^ (values >> (8 * values.itemsize - 1))  # v, or -v - 1 for negative v
    groups = np.ones(len(values), dtype=np.int32)
    top, limit = (int(magnitude.max()) if len(values) else 0), 16
    while limit <= top:  # a value in [-limit, limit) fits in one more group than the previous limit
        groups += magnitude >= limit
        limit <<= 5
    ends = np.cumsum(groups)
    first = ends - groups
    chars = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint8)
    chars[first] = ((values & 0x1F) | ((groups > 1) << 5)) + 48
    index, k = np.flatnonzero(groups > 1), 1
    while len(index):
        more = groups[index] > k + 1
        chars[first[index] + k] = (((values[index] >> (5 * k)) & 0x1F) | (more << 5)) + 48
        index, k = index[more], k + 1
    text = chars.tobytes().decode("ascii")
    bounds = np.concatenate(([0], ends))[np.cumsum(lengths)].tolist()
    return [text[a:b] for a, b in itertools.pairwise([0, *bounds])]


def decompress_counts(text: str) -> np.ndarray:
    """Inverse of :func:`compress_counts` (``rleFrString``)."""
    counts: list[int] = []
    i, n = 0, len(text)
    while i < n:
        x, k, more = 0, 0, True
        while more:
            c = ord(text[i]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return np.asarray(counts, dtype=np.int64)


def encode_rle(mask: np.ndarray) -> str:
    """COCO compressed RLE ``counts`` of a binary H x W mask.

    ``pycocotools.mask.decode({"size": [H, W], "counts": encode_rle(m)})`` equals ``m != 0``.
    """
    return compress_counts(rle_counts(mask))


def decode_rle(counts: str, height: int, width: int) -> np.ndarray:
    """Binary H x W ``bool`` mask from COCO compressed RLE ``counts``; a ValueError when the runs do not
    cover H x W exactly.

    Not ``pycocotools.mask.decode``: given runs that cover fewer pixels (a truncated or hand-edited row),
    it returns a mask whose remaining pixels are uninitialised memory, with no error; and it is no faster
    on the smooth masks a model makes (``bench/rle_decode.py``)."""
    runs = decompress_counts(counts)
    if int(runs.sum()) != height * width:
        raise ValueError(f"RLE covers {int(runs.sum())} pixels, expected {height}x{width}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    return np.repeat(values, runs).reshape((width, height)).T


def sample_points(start: int, length: int, samples: int) -> np.ndarray:
    """The pixels under the centres of ``samples`` output pixels spread evenly over ``length`` pixels from
    ``start``: output pixel ``i`` shows pixel ``start + floor((i + 0.5) * length / samples)`` (int64, never
    decreasing; ``start + i`` when ``samples == length``). Exact integer arithmetic, so no pixel is
    missed or repeated by rounding."""
    i = np.arange(samples, dtype=np.int64)
    return start + ((2 * i + 1) * length) // (2 * samples)


# Sampled pixels handled per block: the lookups' int64 temporaries stay near 16 MB for any mask.
_WINDOW_BLOCK = 1 << 21


def decode_window(
    counts: str,
    height: int,
    width: int,
    region: tuple[int, int, int, int],
    shape: tuple[int, int],
) -> tuple[np.ndarray, int, int]:
    """A ``height x width`` mask (COCO compressed RLE ``counts``) as a picture of ``shape`` ``(rows,
    columns)`` pixels shows its ``region`` ``(left, top, width, height)``: picture pixel ``(r, c)`` is the
    mask pixel under its centre, ``(sample_points(top, region height, rows)[r], sample_points(left,
    region width, columns)[c])`` (nearest-neighbour; the identity when ``shape`` is the region's size).

    Returns ``(crop, row, column)``: the ``bool`` picture pixels from ``(row, column)`` that the mask's
    extent covers; every picture pixel outside the crop is background, and the crop is empty (0 x 0) when
    the mask lies outside the region. Only the crop is computed, from the runs: neither the mask nor the
    whole picture is ever allocated, so a 100,000 x 100,000 slide's mask costs what its crop does.
    Raises ``ValueError`` when the runs do not cover ``height x width``, or the region or shape is not
    inside the mask or is empty."""
    left, top, region_w, region_h = region
    rows, cols = shape
    if min(region_w, region_h, rows, cols) < 1 or left < 0 or top < 0:
        raise ValueError(f"an empty or negative region {region} or picture shape {shape}")
    if left + region_w > width or top + region_h > height:
        raise ValueError(f"the region {region} is not inside the {height}x{width} mask")
    runs = decompress_counts(counts)
    if int(runs.sum()) != height * width:
        raise ValueError(f"RLE covers {int(runs.sum())} pixels, expected {height}x{width}")
    # Foreground runs as [start, end) over COCO's column-major pixel index (x * height + y).
    ends = np.cumsum(runs)
    starts, ends = (ends - runs)[1::2], ends[1::2]
    starts, ends = starts[ends > starts], ends[ends > starts]
    empty = np.zeros((0, 0), dtype=bool), 0, 0
    if not len(starts):
        return empty
    first_col, last_col = starts[0] // height, (ends[-1] - 1) // height
    # A run that crosses into the next column covers the first row of one and the last row of the other.
    crosses = bool((starts // height != (ends - 1) // height).any())
    top_row = 0 if crosses else int((starts % height).min())
    bottom_row = height - 1 if crosses else int(((ends - 1) % height).max())
    ys, xs = sample_points(top, region_h, rows), sample_points(left, region_w, cols)
    r0, r1 = np.searchsorted(ys, top_row), np.searchsorted(ys, bottom_row, side="right")
    c0, c1 = np.searchsorted(xs, first_col), np.searchsorted(xs, last_col, side="right")
    if r0 >= r1 or c0 >= c1:
        return empty
    ys, xs = ys[r0:r1], xs[c0:c1]
    crop = np.empty((len(xs), len(ys)), dtype=bool)  # column-major, as the runs are
    step = max(1, _WINDOW_BLOCK // len(ys))
    for block in range(0, len(xs), step):
        # Ascending pixel indices: the run each falls in (the last starting at or before it) holds it or not.
        pixels = (xs[block : block + step, None] * height + ys[None, :]).ravel()
        run = np.searchsorted(starts, pixels, side="right") - 1
        inside = (run >= 0) & (pixels < ends[np.maximum(run, 0)])
        crop[block : block + step] = inside.reshape(-1, len(ys))
    return crop.T, int(r0), int(c0)
