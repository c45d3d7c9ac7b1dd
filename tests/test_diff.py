"""batchseg diff and report --compare: matching against pycocotools, counts against the tables themselves,
outputs whose shards do not line up, the per-image table, and one-line refusals."""

from __future__ import annotations

import json
import pathlib
import re
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pycocotools.mask as coco_mask
import pytest
import s3fs

from batchseg.analysis import diff as diff_module
from batchseg.analysis.diff import COLUMNS, TABLE, diff_outputs, match_instances
from batchseg.analysis.report import build_report
from batchseg.analysis.results import Results
from batchseg.cli import main
from batchseg.demo import SHAPES_MODEL
from batchseg.errors import ImageError
from batchseg.format.output import shard_object
from batchseg.format.records import error_row, ok_row, to_parquet
from batchseg.format.rle import encode_rle
from batchseg.segment.job import SegmentConfig
from batchseg.train.synth import write_dataset
from tests.refusals import refusal
from tests.s3server import S3Server
from tests.segmenting import segment_in_process

H, W = 30, 40


def band(start: int, stop: int, rows: tuple[int, int] = (0, 10)) -> np.ndarray:
    """A rectangle over columns ``start:stop`` of rows ``rows``: IoUs of bands are interval IoUs."""
    mask = np.zeros((H, W), dtype=bool)
    mask[rows[0] : rows[1], start:stop] = True
    return mask


def instance(
    category: str, score: float, mask: np.ndarray | None = None, box: list[float] | None = None
) -> dict[str, Any]:
    if mask is not None:
        ys, xs = np.nonzero(mask)
        box = [
            float(xs.min()),
            float(ys.min()),
            float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1),
        ]
    assert box is not None
    return {
        "category_id": {"circle": 1, "square": 2, "triangle": 3, "car": 4}[category],
        "category": category,
        "score": score,
        "bbox": box,
        "area": int(mask.sum()) if mask is not None else int(box[2] * box[3]),
        "rle": encode_rle(mask) if mask is not None else None,
        "keypoints": None,
    }


def coco_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two masks as pycocotools computes it from its own encoding."""
    rles = [coco_mask.encode(np.asfortranarray(m.astype(np.uint8))) for m in (a, b)]
    return float(coco_mask.iou([rles[0]], [rles[1]], [0])[0, 0])


# Two circles in OLD (A, B) and two in NEW (n1 scoring higher than n2), all bands on the same rows.
# n1 overlaps B most, and n2 overlaps B even more: COCOeval's rule (highest score first takes its best)
# pairs n1-B and n2-A; pairing by IoU first, or Hungarian, would give n1-A and n2-B.
A, B = band(0, 20), band(6, 26)
N1, N2 = band(4, 24), band(5, 25)


def test_match_instances_is_cocoeval_greedy_with_pycocotools_iou() -> None:
    old = [instance("circle", 0.9, A), instance("circle", 0.8, B), instance("square", 0.9, N1)]
    new = [instance("circle", 0.6, N2), instance("circle", 0.95, N1), instance("triangle", 0.9, A)]
    assert coco_iou(N1, B) > coco_iou(N1, A) >= 0.5 and coco_iou(N2, B) > coco_iou(N1, B)
    pairs = match_instances(old, new, H, W, 0.5)
    # The square and the triangle sit exactly on circles, but match nothing: other categories.
    assert pairs == [(0, 0, coco_iou(N2, A)), (1, 1, coco_iou(N1, B))]
    assert match_instances(old, new, H, W, 0.7) == [(1, 1, coco_iou(N1, B))]  # N2-A (0.6) is below 0.7
    assert match_instances(old, new, H, W, 1.0) == []
    assert match_instances([], new, H, W, 0.5) == match_instances(old, [], H, W, 0.5) == []


def test_box_only_instances_match_by_box_iou() -> None:
    """A box-only model's instances (no rle), or a category where one side has no mask, use box IoU."""
    old = [instance("car", 0.9, box=[0.0, 0.0, 10.0, 10.0]), instance("circle", 0.9, band(0, 10))]
    new = [
        instance("car", 0.9, box=[5.0, 0.0, 10.0, 10.0]),
        instance("circle", 0.9, box=[0.0, 0.0, 10.0, 8.0]),
    ]
    expected = coco_mask.iou(np.array([[5.0, 0, 10, 10]]), np.array([[0.0, 0, 10, 10]]), [0])[0, 0]
    assert expected == pytest.approx(1 / 3)
    assert match_instances(old, new, H, W, 0.3) == [(0, 0, expected), (1, 1, 0.8)]
    assert match_instances(old, new, H, W, 0.5) == [(1, 1, 0.8)]


def write_output(
    folder: pathlib.Path,
    shards: list[list[dict[str, Any]]],
    threshold: float,
    kept: list[pa.Table] | None = None,
    categories: list[str] | None = None,
) -> str:
    """Hand-made shards (with ``kept``, one table of manifest columns per shard) as segment writes them,
    with the model's ``categories`` in their provenance where given."""
    folder.mkdir(parents=True)
    for index, rows in enumerate(shards):
        provenance = {
            "model": "maskrcnn_small",
            "weights": "hand-made",
            "score_threshold": threshold,
            "shard": index,
        } | ({"categories": categories} if categories is not None else {})
        columns = None if kept is None else kept[index]
        (folder / shard_object(index)).write_bytes(to_parquet(rows, provenance, columns))
    return str(folder)


def row(image_id: str, instances: list[dict[str, Any]], size: tuple[int, int] = (W, H)) -> dict[str, Any]:
    return ok_row(image_id, f"/images/{image_id}.png", size[0], size[1], instances)


def failed(image_id: str) -> dict[str, Any]:
    return error_row(image_id, f"/images/{image_id}.png", ImageError("not_found", "gone"))


@pytest.fixture
def pair(tmp_path: pathlib.Path) -> tuple[str, str]:
    """OLD and NEW, hand-made so that every figure is known; their shards do not line up (NEW holds the
    images in another order and other groups), and each holds an image the other has not."""
    circles_old = [
        instance("circle", 0.9, A),
        instance("circle", 0.8, B),
        instance("square", 0.7, band(0, 8, (12, 20))),
    ]
    circles_new = [
        instance("circle", 0.6, N2),
        instance("circle", 0.95, N1),
        instance("square", 0.7, band(0, 8, (12, 20))),
    ]
    cars = (
        [instance("car", 0.9, box=[0.0, 0.0, 10.0, 10.0])],
        [instance("car", 0.8, box=[5.0, 0.0, 10.0, 10.0])],
    )
    old = [
        [row("a", circles_old), row("b", [instance("triangle", 0.9, band(30, 40))]), row("c", [])],
        [failed("d"), row("e", []), row("f", [instance("circle", 0.9, A)])],
        [row("h", [instance("circle", 0.9, A)]), row("i", cars[0])],
    ]
    new = [
        [row("i", cars[1]), row("c", [instance("triangle", 0.5, A), instance("triangle", 0.4, B)])],
        [row("g", []), row("a", circles_new), row("b", []), row("d", [instance("circle", 0.9, A)])],
        [failed("e"), row("h", [instance("circle", 0.9, A)], size=(H, W))],  # h: another size
    ]
    return write_output(tmp_path / "old", old, 0.7), write_output(tmp_path / "new", new, 0.3)


def test_diff_counts_categories_images_and_changes(pair: tuple[str, str], tmp_path: pathlib.Path) -> None:
    old, new = pair
    diff = diff_outputs(old, new, top=3, out=str(tmp_path / "table.parquet"))
    assert diff.settings == {"score_threshold": (0.7, 0.3)}
    assert diff.images == {
        "old_rows": 8, "new_rows": 8, "in_both": 7, "compared": 4, "changed": 4, "only_in_old": 1,
        "only_in_new": 1, "old_error_rows": 1, "new_error_rows": 1, "not_compared_error": 2,
        "not_compared_size": 1, "not_compared_uri": 0, "duplicate_rows": 0,
    }  # fmt: skip
    circles = (coco_iou(N2, A), coco_iou(N1, B))
    summary = diff.summary()
    assert summary["categories"] == {
        "circle": {"old": 2, "new": 2, "change": 0, "matched": 2, "mean_iou": pytest.approx(sum(circles) / 2), "added": 0, "removed": 0},
        "triangle": {"old": 1, "new": 2, "change": 1, "matched": 0, "mean_iou": None, "added": 2, "removed": 1},
        "car": {"old": 1, "new": 1, "change": 0, "matched": 0, "mean_iou": None, "added": 1, "removed": 1},
        "square": {"old": 1, "new": 1, "change": 0, "matched": 1, "mean_iou": 1.0, "added": 0, "removed": 0},
    }  # fmt: skip
    assert summary["total"] == {
        "old": 5, "new": 6, "change": 1, "matched": 3, "mean_iou": pytest.approx((sum(circles) + 1) / 3), "added": 3, "removed": 2,
    }  # fmt: skip
    # Change scores: c 2 added, i 1 added + 1 removed (tied: NEW's order decides), b 1 removed, a 2 - IoUs.
    assert [(t["image_id"], t["change_score"]) for t in summary["top"]] == [
        ("i", 2.0),
        ("c", 2.0),
        ("b", 1.0),
    ]
    assert json.loads(json.dumps(summary)) == summary

    table = pq.read_table(tmp_path / "table.parquet")
    assert table.schema == TABLE
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert [r["image_id"] for r in table.to_pylist()] == ["i", "c", "a", "b", "d", "e", "h"], "NEW's order"
    assert rows["a"] == {
        "image_id": "a", "uri": "/images/a.png", "old_status": "ok", "new_status": "ok", "old_instances": 3,
        "new_instances": 3, "matched": 3, "added": 0, "removed": 0, "mean_iou": pytest.approx((sum(circles) + 1) / 3),
        "change_score": pytest.approx(2 - sum(circles)),
    }  # fmt: skip
    not_compared = dict.fromkeys(("matched", "added", "removed", "mean_iou", "change_score"))
    assert rows["d"] == {"image_id": "d", "uri": "/images/d.png", "old_status": "error", "new_status": "ok",
                         "old_instances": None, "new_instances": 1, **not_compared}  # fmt: skip
    assert rows["e"] == {"image_id": "e", "uri": "/images/e.png", "old_status": "ok", "new_status": "error",
                         "old_instances": 0, "new_instances": None, **not_compared}  # fmt: skip
    assert rows["h"] == {"image_id": "h", "uri": "/images/h.png", "old_status": "ok", "new_status": "ok",
                         "old_instances": 1, "new_instances": 1, **not_compared}  # fmt: skip
    assert not list(tmp_path.glob("*.tmp-*"))


def test_the_per_image_table_carries_news_kept_columns(tmp_path: pathlib.Path) -> None:
    """NEW's ``--keep-columns`` follow the table's own columns in ``--out`` (to group changes by camera,
    say); one named like a table column is left out, and said so. OLD's are not carried."""
    new_kept = pa.table(
        {"camera": ["north", "south"], "frame": pa.array([7, 8], pa.int16()), "added": ["x", "y"]}
    )
    old = write_output(
        tmp_path / "old", [[row("a", []), row("b", [])]], 0.5, [pa.table({"site": ["s1", "s2"]})]
    )
    new = write_output(
        tmp_path / "new", [[row("b", [instance("circle", 0.9, A)]), row("a", [])]], 0.3, [new_kept]
    )
    for name in ("table.parquet", "table.jsonl", "table.csv"):
        diff = diff_outputs(old, new, out=str(tmp_path / name))
        assert diff.kept_columns == ["camera", "frame"] and diff.left_out_columns == ["added"]
    table = pq.read_table(tmp_path / "table.parquet")
    assert table.schema == pa.schema([*TABLE, pa.field("camera", pa.string()), pa.field("frame", pa.int16())])
    assert [(r["image_id"], r["camera"], r["frame"], r["added"]) for r in table.to_pylist()] == [
        ("b", "north", 7, 1),
        ("a", "south", 8, 0),
    ]
    lines = [json.loads(line) for line in (tmp_path / "table.jsonl").read_text().splitlines()]
    assert [(r["camera"], r["frame"]) for r in lines] == [("north", 7), ("south", 8)]
    assert pcsv.read_csv(tmp_path / "table.csv").column("camera").to_pylist() == ["north", "south"]
    assert (
        diff.kept_note()
        == " with NEW's kept columns camera, frame (left out: added, named like the table's own columns)"
    )


def test_diff_reads_old_one_shard_at_a_time(pair: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded memory, checked cheaply: OLD's rows are only ever read a shard at a time (never the whole
    dataset), its instances at most twice per shard even though the shards do not line up."""
    reads: list[tuple[str, tuple[str, ...]]] = []
    read_file = Results.read_file

    def recorded(self: Results, path: str, columns: list[str] | None = None) -> pa.Table:
        reads.append((path, tuple(columns or ())))
        return read_file(self, path, columns)

    def whole(self: Results) -> None:
        raise AssertionError("diff read a whole output")

    monkeypatch.setattr(Results, "read_file", recorded)
    monkeypatch.setattr(Results, "dataset", property(whole))
    monkeypatch.setattr(Results, "to_table", whole)
    diff_outputs(*pair)
    old_files = sorted(str(p) for p in pathlib.Path(pair[0]).glob("part-*.parquet"))
    full = Counter(path for path, columns in reads if columns == tuple(COLUMNS) and path in old_files)
    assert set(full) <= set(old_files) and max(full.values()) <= diff_module.OLD_SHARDS_KEPT
    ids_only = [path for path, columns in reads if columns == ("image_id", "status")]
    assert sorted(ids_only) == old_files, "the index reads each OLD shard's ids once"


def test_diff_of_an_output_with_itself_matches_everything(pair: tuple[str, str]) -> None:
    diff = diff_outputs(pair[0], pair[0])
    total = diff.total()
    assert total.old == total.new == total.matched == 7 and total.mean_iou == 1.0
    assert diff.images["changed"] == 0 and diff.top == [] and diff.settings == {}
    assert diff.images["in_both"] == diff.images["old_rows"] == 8
    assert "no image changed" in diff.format()


def test_repeated_image_ids_are_compared_once(tmp_path: pathlib.Path) -> None:
    """Ids are unique in an output batchseg wrote; a hand-made one that repeats an id has its first row
    compared and the others counted, not compared twice."""
    one = [instance("circle", 0.9, A)]
    old = write_output(tmp_path / "old", [[row("x", one), row("y", [])], [row("x", [])]], 0.5)
    new = write_output(tmp_path / "new", [[row("x", one)], [row("x", []), row("y", one)]], 0.5)
    diff = diff_outputs(old, new)
    assert diff.images["duplicate_rows"] == 2 and diff.images["in_both"] == 2
    assert diff.images["only_in_old"] == diff.images["only_in_new"] == 0
    assert diff.total().as_dict() == {
        "old": 1,
        "new": 2,
        "change": 1,
        "matched": 1,
        "mean_iou": 1.0,
        "added": 1,
        "removed": 0,
    }


def test_one_image_id_for_two_images_is_not_compared_and_said(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ids come from the manifest: two runs may give one id to two images. Those are counted as not
    compared, with one warning that gives an example, never matched against each other."""
    one = [instance("circle", 0.9, A)]
    old = write_output(tmp_path / "old", [[row("a", one), row("b", one), row("c", [])]], 0.5)
    moved = [
        row("a", one),
        ok_row("b", "/elsewhere/b.png", W, H, []),
        ok_row("c", "/elsewhere/c.png", W, H, one),
    ]
    new = write_output(tmp_path / "new", [moved], 0.5)
    with caplog.at_level("WARNING", logger="batchseg"):
        diff = diff_outputs(old, new, out=str(tmp_path / "table.csv"))
    counts = {k: diff.images[k] for k in ("in_both", "compared", "changed", "not_compared_uri")}
    assert counts == {"in_both": 3, "compared": 1, "changed": 0, "not_compared_uri": 2}
    assert diff.total().as_dict()["old"] == diff.total().as_dict()["new"] == 1, "only a's instances"
    assert [r.getMessage() for r in caplog.records] == [
        "diff: 2 image ids stand for another URI in each output (other images under one id): not "
        "compared, e.g. 'b': old /images/b.png, new /elsewhere/b.png"
    ]
    assert "not compared, their URIs differ: 2 images" in diff.format()
    table = pcsv.read_csv(tmp_path / "table.csv").to_pylist()
    assert [(r["image_id"], r["uri"], r["change_score"]) for r in table] == [
        ("a", "/images/a.png", 0.0),
        ("b", "/elsewhere/b.png", None),
        ("c", "/elsewhere/c.png", None),
    ]


def test_categories_that_differ_between_the_weights_are_settings_that_differ(tmp_path: pathlib.Path) -> None:
    """The provenance records each model's categories: the names one has and the other lacks are listed;
    the whole lists where only their order (so the category ids) differs."""
    shards = [[row("a", [])]]
    old = write_output(tmp_path / "old", shards, 0.5, categories=["circle", "square", "triangle"])
    new = write_output(tmp_path / "new", shards, 0.5, categories=["circle", "star", "triangle", "moon"])
    swapped = write_output(tmp_path / "swapped", shards, 0.5, categories=["square", "circle", "triangle"])
    unrecorded = write_output(tmp_path / "unrecorded", shards, 0.5)
    diff = diff_outputs(old, new)
    assert diff.settings == {"categories": (["square"], ["star", "moon"])}
    assert "settings that differ: categories ['square'] -> ['star', 'moon']" in diff.format()
    assert diff_outputs(old, swapped).settings == {
        "categories": (["circle", "square", "triangle"], ["square", "circle", "triangle"])
    }
    assert diff_outputs(old, old).settings == diff_outputs(old, unrecorded).settings == {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The shipped model over 8 shapes images and a missing file, at score thresholds 0.7 (OLD) and 0.3
    (NEW), shards of 3: the outputs line up shard to shard."""
    root = tmp_path_factory.mktemp("diff")
    data = write_dataset(str(root / "shapes"), 8, seed=5)
    manifest = pathlib.Path(data.manifest)
    manifest.write_text(manifest.read_text() + f"{root / 'missing.jpg'},1002\n")
    outputs = {}
    for name, threshold in (("old", 0.7), ("new", 0.3)):
        config = SegmentConfig(
            manifest=str(manifest),
            output=str(root / name),
            weights=str(SHAPES_MODEL),
            score_threshold=threshold,
            shard_size=3,
        )
        segment_in_process(config)
        outputs[name] = config.output
    return {"root": root, **outputs}


def table_of(output: str) -> dict[str, dict[str, Any]]:
    return {
        r["image_id"]: r
        for r in pq.read_table(sorted(pathlib.Path(output).glob("part-*.parquet"))).to_pylist()
    }


def test_diff_cli_on_two_thresholds_of_the_shipped_model(
    runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Counts computed here from the two tables: per category, and matched (a lower threshold keeps every
    instance of a higher one, bit for bit, so each is matched at IoU 1 and nothing is removed)."""
    old, new = table_of(runs["old"]), table_of(runs["new"])
    compared = [i for i in old if old[i]["status"] == new[i]["status"] == "ok"]
    assert len(compared) == 8 and old["1002"]["status"] == "error"
    counts = {
        side: Counter(i["category"] for k in compared for i in rows[k]["instances"])
        for side, rows in (("old", old), ("new", new))
    }
    for k in compared:  # what the test relies on, checked on the tables
        assert {(i["category"], i["rle"]) for i in old[k]["instances"]} <= {
            (i["category"], i["rle"]) for i in new[k]["instances"]
        }
    assert sum(counts["new"].values()) > sum(counts["old"].values()) > 0

    csv, summary = runs["root"] / "changes.csv", runs["root"] / "diff.json"
    argv = ["diff", runs["old"], runs["new"], "--top", "3", "--out", str(csv), "--json", str(summary)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    figures = json.loads(summary.read_text())
    assert set(figures["categories"]) == set(counts["new"])
    for category in counts["new"]:
        o, n = counts["old"][category], counts["new"][category]
        assert figures["categories"][category] == {
            "old": o, "new": n, "change": n - o, "matched": o, "mean_iou": 1.0 if o else None, "added": n - o, "removed": 0,
        }  # fmt: skip
        change = f"\\+{n - o}" if n > o else "0"
        assert re.search(
            rf"^{category} +{o} +{n} +{change} +{o} +{'1.000' if o else '-'} +{n - o} +0$", printed, re.M
        )
    assert figures["images"]["in_both"] == 9 and figures["images"]["compared"] == 8
    assert figures["images"]["old_error_rows"] == figures["images"]["new_error_rows"] == 1
    assert figures["settings"] == {"score_threshold": {"old": 0.7, "new": 0.3}}
    assert "only in old: 0, only in new: 0" in printed and "score_threshold 0.7 -> 0.3" in printed

    table = pcsv.read_csv(csv).to_pylist()
    assert len(table) == 9
    for r in table:
        if str(r["image_id"]) == "1002":
            assert r["old_status"] == r["new_status"] == "error" and r["change_score"] is None
            continue
        n_old, n_new = len(old[str(r["image_id"])]["instances"]), len(new[str(r["image_id"])]["instances"])
        assert (r["old_instances"], r["new_instances"], r["matched"]) == (n_old, n_new, n_old)
        assert (r["added"], r["removed"], r["change_score"]) == (n_new - n_old, 0, n_new - n_old)
    most = sorted((r["change_score"] for r in table if r["change_score"]), reverse=True)[:3]
    assert [t["change_score"] for t in figures["top"]] == most


def test_diff_reads_each_shard_of_aligned_outputs_once(
    runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    read_file = Results.read_file

    def recorded(self: Results, path: str, columns: list[str] | None = None) -> pa.Table:
        if columns == COLUMNS:
            reads.append(path)
        return read_file(self, path, columns)

    monkeypatch.setattr(Results, "read_file", recorded)
    diff_outputs(runs["old"], runs["new"])
    shards = [
        sorted(str(p) for p in pathlib.Path(runs[side]).glob("part-*.parquet")) for side in ("old", "new")
    ]
    assert len(shards[0]) == 3 and sorted(reads) == sorted(shards[0] + shards[1])


def test_report_compare_shows_the_diff_and_the_changed_images_side_by_side(runs: dict[str, Any]) -> None:
    out = runs["root"] / "report.html"
    result = build_report(runs["new"], str(out), gallery=2, compare=runs["old"])
    expected = diff_outputs(runs["old"], runs["new"], top=2).summary()
    assert {k: v for k, v in result["compare"].items() if k != "pairs"} == expected
    assert result["compare"]["pairs"] == 2
    page = out.read_text(encoding="utf-8")
    assert "Compared with the old output" in page and runs["old"] in page
    for category, c in expected["categories"].items():
        mean_iou = "&ndash;" if c["mean_iou"] is None else f"{c['mean_iou']:.3f}"
        cells = [
            category,
            c["old"],
            c["new"],
            f"{c['change']:+,}" if c["change"] else 0,
            c["matched"],
            mean_iou,
            c["added"],
            c["removed"],
        ]
        assert "<tr>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>" in page
    assert (
        len(re.findall(r'<img alt="(old|new) [^"]*" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}">', page))
        == 4
    )
    for image in expected["top"]:
        assert f"<b>{image['image_id']}</b> &middot; change {image['change_score']:.2f}" in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3 + 2 + 4  # charts, gallery, pairs
    assert "http://" not in page and "https://" not in page


@pytest.fixture
def damaged(pair: tuple[str, str], tmp_path: pathlib.Path) -> dict[str, str]:
    old, new = pair
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for shard in sorted(pathlib.Path(new).glob("part-*.parquet")):
        (corrupt / shard.name).write_bytes(shard.read_bytes())
    (corrupt / "part-000002.parquet").write_text("not parquet")  # found after two shards were compared
    return {
        "OLD": old,
        "NEW": new,
        "EMPTY": str(empty),
        "MISSING": str(tmp_path / "nowhere"),
        "CORRUPT": str(corrupt),
        "DIR": str(tmp_path),
    }


BAD_DIFFS = [
    (["{OLD}", "{MISSING}"], "output .*nowhere holds no part-NNNNNN.parquet files: not a batchseg segment output"),
    (["{EMPTY}", "{NEW}"], "output .*empty holds no part-NNNNNN.parquet files"),
    (["{OLD}", "{CORRUPT}", "--out", "{DIR}/t.csv"], "cannot read shard .*part-000002.parquet"),
    (["{OLD}", "{NEW}", "--iou", "0"], "argument --iou: must be more than 0 and at most 1, not 0"),
    (["{OLD}", "{NEW}", "--iou", "-0.5"], "argument --iou: must be more than 0 and at most 1"),
    (["{OLD}", "{NEW}", "--iou", "nan"], "argument --iou: must be more than 0 and at most 1, not nan"),
    (["{OLD}", "{NEW}", "--iou", "1.5"], "argument --iou: must be more than 0 and at most 1"),
    (["{OLD}", "{NEW}", "--iou", "half"], "argument --iou: expected a number"),
    (["{OLD}", "{NEW}", "--top", "0"], "argument --top: must be at least 1, not 0"),
    (["{OLD}", "{NEW}", "--top", "-3"], "argument --top: must be at least 1"),
    (["{OLD}", "{NEW}", "--out", "{DIR}/t.txt"], "--out .*t.txt: name it .csv, .parquet or .jsonl"),
    (["{OLD}", "{NEW}", "--out", "{OLD}/part-000000.parquet"], "--out .*part-000000.parquet would overwrite batchseg's own file in .*old"),
    (["{OLD}", "{NEW}", "--json", "{NEW}/summary.json"], "--json .*summary.json would overwrite batchseg's own file in .*new"),
    (["{OLD}", "{NEW}", "--out", "{DIR}/t.csv", "--json", "{DIR}/t.csv"], "--json .*t.csv is also --out"),
    (["{OLD}", "{NEW}", "--storage-options", "[1]"], "argument --storage-options: expected a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BAD_DIFFS, ids=[" ".join(a[1:]) or a[0] for a, _ in BAD_DIFFS])
def test_diff_refuses_bad_input_with_one_line_and_writes_nothing(
    damaged: dict[str, str], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    before = sorted(pathlib.Path(damaged["DIR"]).rglob("*"))
    err = refusal(["diff", *(arg.format(**damaged) for arg in argv)], capsys)
    assert re.search(message, err), err
    assert sorted(pathlib.Path(damaged["DIR"]).rglob("*")) == before, "nothing written, not even in part"


def test_report_compare_refuses_to_overwrite_the_old_output(
    pair: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", pair[1], "--compare", pair[0], "--out", f"{pair[0]}/summary.json"]) == 2
    assert "would overwrite batchseg's own file" in capsys.readouterr().err
    assert not pathlib.Path(pair[0], "summary.json").exists()


def test_diff_on_s3_reads_and_writes_through_fsspec(
    pair: tuple[str, str], s3: S3Server, tmp_path: pathlib.Path
) -> None:
    """The same figures and table from an object store, and a diff that fails halfway leaves no table
    there (nor its temporary object)."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.options())
    for side, folder in zip(("old", "new"), pair, strict=True):
        for shard in pathlib.Path(folder).glob("part-*.parquet"):
            fs.pipe_file(f"out/diff/{side}/{shard.name}", shard.read_bytes())
    fs.pipe_file(
        "out/diff/broken/part-000000.parquet", pathlib.Path(pair[1], "part-000000.parquet").read_bytes()
    )
    fs.pipe_file("out/diff/broken/part-000001.parquet", b"not parquet")
    options = json.dumps(s3.options())
    argv = ["diff", "s3://out/diff/old", "s3://out/diff/new", "--storage-options", options]
    assert main([*argv, "--out", "s3://out/diff/table.parquet", "--json", "s3://out/diff/figures.json"]) == 0
    local = diff_outputs(*pair, out=str(tmp_path / "table.parquet"))
    assert json.loads(fs.cat_file("out/diff/figures.json")) | {
        "old": local.old,
        "new": local.new,
    } == json.loads(json.dumps(local.summary()))
    with fs.open("out/diff/table.parquet", "rb") as f:
        assert pq.read_table(f).equals(pq.read_table(tmp_path / "table.parquet"))

    broken = ["diff", "s3://out/diff/old", "s3://out/diff/broken", "--storage-options", options]
    assert main([*broken, "--out", "s3://out/diff/broken.csv"]) == 2
    assert not [p for p in fs.find("out/diff") if "broken.csv" in p]
