"""RLE encoding agrees byte for byte with pycocotools."""

import numpy as np
import pycocotools.mask as coco_mask
import pytest

from batchseg.format.rle import (
    compress_groups,
    decode_rle,
    decode_window,
    decompress_counts,
    encode_rle,
    sample_points,
)


def reference(mask: np.ndarray) -> str:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {
        "empty": np.zeros((20, 30), bool),
        "full": np.ones((20, 30), bool),
        "one_pixel": np.zeros((9, 11), bool),
        "last_pixel": np.zeros((9, 11), bool),
        "first_pixel": np.zeros((9, 11), bool),
        "border_frame": np.ones((16, 16), bool),
        "single_row": rng.random((1, 50)) > 0.5,
        "single_col": rng.random((50, 1)) > 0.5,
        "large_runs": np.zeros((400, 600), bool),
    }
    out["one_pixel"][4, 5] = True
    out["last_pixel"][-1, -1] = True
    out["first_pixel"][0, 0] = True
    out["border_frame"][1:-1, 1:-1] = False
    out["large_runs"][50:390, 10:580] = True
    for i in range(20):
        h, w = rng.integers(1, 64, size=2)
        out[f"random_{i}"] = rng.random((h, w)) < rng.random()
    return out


@pytest.mark.parametrize("name", list(cases()))
def test_encode_matches_pycocotools_and_round_trips(name: str) -> None:
    mask = cases()[name]
    counts = encode_rle(mask)
    assert counts == reference(mask)
    decoded = coco_mask.decode({"size": list(mask.shape), "counts": counts})
    np.testing.assert_array_equal(decoded.astype(bool), mask)
    np.testing.assert_array_equal(decode_rle(counts, *mask.shape), mask)


def test_decode_rejects_wrong_size() -> None:
    counts = encode_rle(np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="expected 5x4"):
        decode_rle(counts, 5, 4)


def test_many_lists_compress_at_once_as_pycocotools_compresses_each() -> None:
    rng = np.random.default_rng(8)
    lists = [[], [0], [3, 0], [0, 1, 2], [7, 0, 0, 9]]
    for _ in range(50):
        scale = int(rng.choice([2, 40, 2000, 2**20, 2**29]))  # pycocotools has room for 6 characters a count
        lists.append(rng.integers(0, scale, size=int(rng.integers(1, 40))).tolist())
    got = compress_groups(
        np.array([c for counts in lists for c in counts], dtype=np.int64), [len(c) for c in lists]
    )
    # (pycocotools frees an empty list's buffer wrongly: its string is "")
    expected = [
        coco_mask.frPyObjects({"size": [1, 1], "counts": c}, 1, 1)["counts"].decode() if c else ""
        for c in lists
    ]
    assert got == expected
    huge = np.array([0, 2**40, 3, 2**33, 1], dtype=np.int64)  # beyond pycocotools' 32-bit counts
    np.testing.assert_array_equal(decompress_counts(compress_groups(huge, [5])[0]), huge)


def window_reference(
    counts: str, height: int, width: int, region: tuple[int, int, int, int], shape: tuple[int, int]
) -> np.ndarray:
    """pycocotools' full-size decode, cropped to ``region`` and sampled at each picture pixel's centre."""
    left, top, region_w, region_h = region
    full = coco_mask.decode({"size": [height, width], "counts": counts}).astype(bool)
    ys = [top + int((r + 0.5) * region_h / shape[0]) for r in range(shape[0])]
    xs = [left + int((c + 0.5) * region_w / shape[1]) for c in range(shape[1])]
    return full[np.ix_(ys, xs)]


def random_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:  # noise: many short runs, runs crossing columns
        return rng.random((height, width)) < rng.random()
    mask = np.zeros((height, width), bool)
    if kind == 1:  # a few rectangles, anywhere (touching the borders too)
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(height), rng.integers(width)
            mask[y : y + rng.integers(1, height + 1), x : x + rng.integers(1, width + 1)] = True
    elif kind == 2:  # one pixel
        mask[rng.integers(height), rng.integers(width)] = True
    return mask  # kind 3: empty


def test_decode_window_is_pycocotools_full_decode_cropped_and_sampled() -> None:
    rng = np.random.default_rng(24)
    for _ in range(600):
        height, width = (int(v) for v in rng.integers(1, 90, size=2))
        mask = random_mask(rng, height, width)
        counts = encode_rle(mask)
        left, top = int(rng.integers(width)), int(rng.integers(height))
        region = (left, top, int(rng.integers(1, width - left + 1)), int(rng.integers(1, height - top + 1)))
        # Scales from 1/20 up to 3 (and exactly 1), with independent rounding on each axis.
        scale = float(rng.choice([1.0, rng.uniform(0.05, 1.0), rng.uniform(1.0, 3.0)]))
        shape = (max(1, round(region[3] * scale)), max(1, round(region[2] * scale)))
        expected = window_reference(counts, height, width, region, shape)
        crop, row, col = decode_window(counts, height, width, region, shape)
        assert crop.dtype == bool
        got = np.zeros(shape, bool)
        got[row : row + crop.shape[0], col : col + crop.shape[1]] = crop
        np.testing.assert_array_equal(got, expected, err_msg=f"{height}x{width} {region} {shape}")
        assert row + crop.shape[0] <= shape[0] and col + crop.shape[1] <= shape[1]
        if not mask.any():
            assert crop.shape == (0, 0)


def test_decode_window_at_full_size_is_decode_rle() -> None:
    mask = cases()["large_runs"]
    crop, row, col = decode_window(encode_rle(mask), 400, 600, (0, 0, 600, 400), (400, 600))
    np.testing.assert_array_equal(crop, mask[50:390, 10:580])
    assert (row, col) == (50, 10)


def test_decode_window_of_a_huge_mask_costs_its_picture() -> None:
    """A 100,000 x 100,000 mask (10 GB decoded) with a square at its far corner, seen 500 px wide."""
    import tracemalloc

    size = 100_000
    runs = np.zeros(2 * 1000 + 1, dtype=np.int64)  # 1000 columns of 1000 foreground rows, at the end
    runs[0] = size * (size - 1000) + (size - 1000)
    runs[1::2], runs[2:-1:2] = 1000, size - 1000
    counts = compress_groups(runs, np.array([len(runs)]))[0]
    tracemalloc.start()
    crop, row, col = decode_window(counts, size, size, (0, 0, size, size), (500, 500))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (row, col, crop.shape, bool(crop.all())) == (495, 495, (5, 5), True)
    assert peak < 1_000_000


def test_decode_window_refuses_what_does_not_fit() -> None:
    counts = encode_rle(np.ones((4, 6), bool))
    with pytest.raises(ValueError, match="expected 5x6"):
        decode_window(counts, 5, 6, (0, 0, 6, 5), (5, 6))
    with pytest.raises(ValueError, match="not inside"):
        decode_window(counts, 4, 6, (2, 0, 5, 4), (4, 5))
    for region, shape in (((0, 0, 0, 4), (4, 1)), ((-1, 0, 6, 4), (4, 6)), ((0, 0, 6, 4), (0, 6))):
        with pytest.raises(ValueError, match="empty or negative"):
            decode_window(counts, 4, 6, region, shape)


def test_sample_points_spread_evenly_and_are_the_identity_at_full_size() -> None:
    np.testing.assert_array_equal(sample_points(7, 5, 5), [7, 8, 9, 10, 11])
    np.testing.assert_array_equal(sample_points(0, 10, 4), [1, 3, 6, 8])  # centres 1.25, 3.75, 6.25, 8.75
    np.testing.assert_array_equal(sample_points(0, 2, 6), [0, 0, 0, 1, 1, 1])
