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
