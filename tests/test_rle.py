"""RLE encoding agrees byte for byte with pycocotools."""

import numpy as np
import pycocotools.mask as coco_mask
import pytest

from batchseg.format.rle import compress_groups, decode_rle, decompress_counts, encode_rle


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
