"""COCO run-length encoding of binary masks in pure numpy, byte-compatible with pycocotools."""

from __future__ import annotations

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
    return compress_groups(counts, np.arange(len(counts)), np.zeros(len(counts), dtype=np.int64), 1)[0]


def compress_groups(counts: np.ndarray, position: np.ndarray, owners: np.ndarray, n: int) -> list[str]:
    """COCO's compressed strings of ``n`` run-length lists at once (concatenated, with each value's
    ``position`` in its list and its list's index in ``owners``, lists in order).

    Each count from the fourth on (``i > 2`` in the C code) is stored as the difference to the count two
    places before, then written as 5-bit groups, least significant first, each as one character from
    48 up, with 0x20 marking that more groups follow.
    """
    values = counts.copy()
    later = position >= 3
    values[later] -= counts[np.flatnonzero(later) - 2]
    # 5-bit groups, least significant first; each pass handles only the values that still need one.
    passes = []
    index = np.arange(len(values))
    while len(index):
        c = values & 0x1F
        values = values >> 5  # arithmetic shift: negative deltas end at -1, as in C
        more = np.where(c & 0x10, values != -1, values != 0)
        passes.append((index, ((c | (more << 5)) + 48).astype(np.uint8)))
        index, values = index[more], values[more]
    per_value = np.zeros(len(counts), dtype=np.int64)
    for index, _ in passes:
        per_value[index] += 1
    first_char = np.cumsum(per_value) - per_value
    chars = np.empty(int(per_value.sum()), dtype=np.uint8)
    for k, (index, group) in enumerate(passes):
        chars[first_char[index] + k] = group
    text = chars.tobytes().decode("ascii")
    lengths = np.bincount(owners, weights=per_value, minlength=n).astype(np.int64)
    ends = np.cumsum(lengths)
    return [text[e - k : e] for e, k in zip(ends.tolist(), lengths.tolist(), strict=True)]


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
    """Binary H x W ``bool`` mask from COCO compressed RLE ``counts``."""
    runs = decompress_counts(counts)
    if int(runs.sum()) != height * width:
        raise ValueError(f"RLE covers {int(runs.sum())} pixels, expected {height}x{width}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    return np.repeat(values, runs).reshape((width, height)).T
