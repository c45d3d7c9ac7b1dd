"""Query, Python access and COCO export on a real job output with error rows and zero-instance images."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pycocotools.mask as coco_mask
import pytest
from PIL import Image
from pycocotools.coco import COCO

import batchseg
from batchseg.analysis.export import export_coco
from batchseg.analysis.query import connect, run_query
from batchseg.cli import main
from batchseg.demo import SHAPES_MODEL
from batchseg.errors import BatchsegError
from batchseg.format.records import ok_row, to_parquet
from batchseg.segment.job import SegmentConfig
from batchseg.train.synth import write_dataset
from tests.refusals import refusal
from tests.segmenting import segment_in_process
from tests.test_render import write_segment_output


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real segmentation output: 10 shapes, a blank image (no instances) and a missing file (an error)."""
    root = tmp_path_factory.mktemp("query")
    data = write_dataset(str(root / "shapes"), 10, seed=11)
    Image.new("RGB", (90, 70), (128, 128, 128)).save(root / "blank.png")
    manifest = pathlib.Path(data.manifest)
    manifest.write_text(manifest.read_text() + f"{root / 'blank.png'},1001\n{root / 'missing.jpg'},1002\n")
    config = SegmentConfig(
        manifest=str(manifest),
        output=str(root / "out"),
        weights=str(SHAPES_MODEL),
        score_threshold=0.5,
        shard_size=4,
    )
    segment_in_process(config)
    table = pq.read_table(sorted((root / "out").glob("part-*.parquet")))
    return {"root": root, "uri": config.output, "table": table, "data": data}


def instance_rows(table: pa.Table) -> list[dict[str, Any]]:
    return [i for row in table.to_pylist() for i in row["instances"] or []]


def test_views_agree_with_pyarrow(output: dict[str, Any]) -> None:
    con = connect(output["uri"])
    table = output["table"]
    assert con.execute("SELECT count(*) FROM images").fetchone() == (12,)
    assert con.execute("SELECT count(*) FROM images WHERE status = 'error'").fetchone() == (1,)
    assert con.execute("SELECT count(*) FROM images WHERE len(instances) = 0").fetchone()[0] >= 1  # type: ignore[index]
    per_category = dict(con.execute("SELECT category, count(*) FROM instances GROUP BY 1").fetchall())
    expected: dict[str, int] = {}
    for instance in instance_rows(table):
        expected[instance["category"]] = expected.get(instance["category"], 0) + 1
    assert per_category == expected and sum(expected.values()) > 10
    mean = con.execute("SELECT avg(score) FROM instances").fetchone()[0]  # type: ignore[index]
    assert mean == pytest.approx(np.mean([i["score"] for i in instance_rows(table)]), rel=1e-6)
    columns = [c[0] for c in con.execute("DESCRIBE instances").fetchall()]
    assert columns == ["image_id", "uri", "width", "height", "category_id", "category", "score", "bbox", "area",
                       "rle", "keypoints"]  # fmt: skip


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_query_writes_every_row_in_each_format(output: dict[str, Any], fmt: str) -> None:
    out = output["root"] / f"scores.{fmt}"
    sql = "SELECT image_id, category, score FROM instances ORDER BY image_id, score DESC"
    message = run_query(output["uri"], sql, fmt, str(out))
    n = len(instance_rows(output["table"]))
    assert message == f"{n} rows written to {out} ({fmt})"
    if fmt == "parquet":
        rows = pq.read_table(out).to_pylist()
    elif fmt == "json":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        import pyarrow.csv as pcsv

        rows = pcsv.read_csv(
            out, convert_options=pcsv.ConvertOptions(column_types={"image_id": pa.string()})
        ).to_pylist()
    assert len(rows) == n and set(rows[0]) == {"image_id", "category", "score"}


def test_csv_out_writes_nested_columns_as_json_text(output: dict[str, Any]) -> None:
    """``SELECT * FROM images`` to CSV: the instances (a list of structs) were refused by Arrow's CSV
    writer; each nested cell is now its JSON text, which parses back to the row's value."""
    import pyarrow.csv as pcsv

    out = output["root"] / "images.csv"
    assert run_query(output["uri"], "SELECT * FROM images ORDER BY uri", out=str(out)).startswith("12 rows")
    types = {"image_id": pa.string(), "instances": pa.string()}
    options = pcsv.ConvertOptions(column_types=types, strings_can_be_null=True)  # an error row: no instances
    rows = pcsv.read_csv(out, convert_options=options).to_pylist()
    expected = sorted(output["table"].to_pylist(), key=lambda r: r["uri"])
    assert [r["uri"] for r in rows] == [r["uri"] for r in expected]
    assert [None if r["instances"] is None else json.loads(r["instances"]) for r in rows] == [
        r["instances"] for r in expected
    ]
    assert sum(len(json.loads(r["instances"] or "[]")) for r in rows) == len(instance_rows(output["table"]))


def test_a_query_that_fails_while_writing_leaves_no_file(output: dict[str, Any]) -> None:
    """A 0-byte (or half) file was left at --out when DuckDB failed on a row."""
    sql = "SELECT CASE WHEN status = 'error' THEN error('a bad row') ELSE uri END AS uri FROM images"
    for name in ("bad.csv", "bad.parquet", "bad.jsonl"):
        with pytest.raises(BatchsegError, match="a bad row"):
            run_query(output["uri"], sql, out=str(output["root"] / name))
        assert not (output["root"] / name).exists()
    assert not [p.name for p in output["root"].iterdir() if p.name.startswith("bad.")]


def test_query_out_without_a_format_takes_it_from_the_name(output: dict[str, Any]) -> None:
    """It wrote JSON Lines into results.csv and said "(table)"."""
    sql = "SELECT image_id, score FROM instances"
    for name, fmt in (("s.csv", "csv"), ("s.jsonl", "json"), ("s.parquet", "parquet")):
        out = output["root"] / name
        assert run_query(output["uri"], sql, out=str(out)).endswith(f"rows written to {out} ({fmt})")
    assert pq.read_table(output["root"] / "s.parquet").num_rows == len(instance_rows(output["table"]))
    assert (output["root"] / "s.csv").read_text().splitlines()[0] == '"image_id","score"'
    with pytest.raises(BatchsegError, match=r"--out .*s.txt: give --format csv, json or parquet"):
        run_query(output["uri"], sql, out=str(output["root"] / "s.txt"))
    assert not (output["root"] / "s.txt").exists()


def test_query_cli_prints_a_table_and_reports_bad_sql(
    output: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["query", output["uri"], "SELECT status, count(*) AS n FROM images GROUP BY 1 ORDER BY 1"]) == 0
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["status", "n"] and printed[2].split() == ["error", "1"]
    assert printed[3].split() == ["ok", "11"] and printed[-1] == "(2 rows)"
    with pytest.raises(BatchsegError, match=r"query failed: .*nope"):
        run_query(output["uri"], "SELECT * FROM nope")


def test_python_api_filters_and_decodes_masks(output: dict[str, Any]) -> None:
    results = batchseg.open_results(output["uri"])
    assert len(results) == 12 and results.summary is not None and results.summary["error"] == 1
    assert results.provenance["model"] == "maskrcnn_small"
    assert [i.image_id for i in results.images(status="error")] == ["1002"]
    circles = list(results.images(category="circle", min_score=0.8))
    assert circles and all(
        i["category"] == "circle" and i["score"] >= 0.8 for im in circles for i in im.instances
    )
    image = next(results.images(status="ok", min_score=0.5))
    masks = image.masks()
    assert masks.shape == (len(image.instances), image.height, image.width) and masks.dtype == bool
    for mask, instance in zip(masks, image.instances, strict=True):
        reference = coco_mask.decode({"size": [image.height, image.width], "counts": instance["rle"]})
        np.testing.assert_array_equal(mask, reference.astype(bool))
        assert mask.sum() == instance["area"]
    errors = results.to_table(filter=pc.field("status") == "error")
    assert errors.column("error").to_pylist() == [errors.column("error")[0].as_py()]
    assert errors.column("error")[0].as_py().startswith("not_found: ")
    with pytest.raises(BatchsegError, match=r"holds no part-.*not a batchseg segment output"):
        batchseg.open_results(str(output["root"] / "shapes"))
    one = sorted(pathlib.Path(output["uri"]).glob("part-*.parquet"))[1]
    shard = batchseg.open_results(str(one))  # one shard file reads on its own; it has no summary
    assert len(shard) == 4 and shard.summary is None and shard.provenance["shard"] == 1
    assert [r["image_id"] for b in shard.batches(["image_id"]) for r in b.to_pylist()] == ["5", "6", "7", "8"]


def test_export_coco_round_trips_through_pycocotools(output: dict[str, Any]) -> None:
    out, images = output["root"] / "results.json", output["root"] / "images.json"
    counts = export_coco(output["uri"], str(out), str(images))
    table = output["table"]
    assert counts == {"images": 11, "instances": len(instance_rows(table)), "skipped_rows": 1}
    dataset = COCO(str(images))
    assert sorted(dataset.getImgIds()) == [*range(1, 11), 1001]  # the manifest's numeric ids are kept
    assert [c["name"] for c in dataset.loadCats(dataset.getCatIds())] == ["circle", "square", "triangle"]
    detections = dataset.loadRes(str(out))
    assert len(detections.getAnnIds()) == counts["instances"]
    first = next(r for r in table.to_pylist() if r["instances"])
    ann = detections.loadAnns(detections.getAnnIds(imgIds=int(first["image_id"])))[0]
    np.testing.assert_array_equal(
        detections.annToMask(ann),
        coco_mask.decode({"size": [first["height"], first["width"]], "counts": first["instances"][0]["rle"]}),
    )
    # The same export scores against the synthetic ground truth with pycocotools directly.
    truth = COCO(output["data"].annotations)
    assert truth.loadRes(str(out)).getAnnIds()


def test_an_export_that_fails_halfway_leaves_neither_file(
    output: dict[str, Any], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both files were streamed in place, so a failure on the third instance left half a JSON list."""
    from batchseg.analysis import export

    converted: list[int] = []

    def failing(*args: Any) -> dict[str, Any]:
        converted.append(1)
        if len(converted) == 3:
            raise OSError("the store went away")
        return export.coco_result(*args)

    monkeypatch.setattr(export, "coco_result", failing)
    out, images = tmp_path / "results.json", tmp_path / "images.json"
    with pytest.raises(
        BatchsegError, match=r"cannot write the COCO export .*results\.json: .*the store went away"
    ):
        export_coco(output["uri"], str(out), str(images))
    assert len(converted) == 3 and list(tmp_path.iterdir()) == []


def test_render_cli_draws_each_selected_image_over_its_masks(output: dict[str, Any]) -> None:
    out = output["root"] / "overlays"
    assert (
        main(["render", output["uri"], "--out", str(out), "--where", "len(instances) > 0", "--limit", "3"])
        == 0
    )
    written = sorted(out.glob("*.png"))
    rows = [r for r in output["table"].to_pylist() if r["instances"]][:3]
    assert [p.stem for p in written] == sorted(r["image_id"] for r in rows)
    for row in rows:
        original = np.asarray(Image.open(row["uri"]).convert("RGB")).astype(int)
        drawn = np.asarray(Image.open(out / f"{row['image_id']}.png").convert("RGB")).astype(int)
        assert drawn.shape == original.shape
        changed = (drawn != original).any(axis=2)
        for instance in row["instances"]:
            mask = coco_mask.decode(
                {"size": [row["height"], row["width"]], "counts": instance["rle"]}
            ).astype(bool)
            assert changed[mask].mean() > 0.9  # every instance's pixels are tinted (labels may cover a few)
    splash = output["root"] / "splash"
    assert (
        main(
            [
                "render",
                output["uri"],
                "--out",
                str(splash),
                "--style",
                "splash",
                "--where",
                "image_id = '1002'",
            ]
        )
        == 0
    )
    assert not list(splash.glob("*.png"))  # the error row has no image to draw


def test_report_cli_on_a_real_output(output: dict[str, Any]) -> None:
    out = output["root"] / "report.html"
    assert main(["report", output["uri"], "--out", str(out), "--gallery", "4"]) == 0
    html = out.read_text()
    assert "not_found" in html and "missing.jpg" in html
    assert html.count('src="data:image/png;base64,') == 3 + 4  # three charts and the gallery
    assert "http://" not in html and "https://" not in html


def test_read_side_commands_answer_bad_input_with_one_line_and_exit_2(
    output: dict[str, Any], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad SQL in --where, an --out that cannot be written: one 'batchseg: error:' line, nothing written."""
    (tmp_path / "a-file").write_text("in the way of a folder")
    (tmp_path / "a-folder.csv").mkdir()  # the move of a whole file would have put it inside
    cases = [
        (["render", output["uri"], "--out", str(tmp_path / "png"), "--where", "nope("], "--where cannot be evaluated"),
        (["export-coco", output["uri"], "--out", str(tmp_path)], f"cannot write {tmp_path}: IsADirectoryError"),
        (["query", output["uri"], "SELECT 1", "--format", "csv", "--out", str(tmp_path / "a-file" / "x.csv")],
         f"cannot write {tmp_path / 'a-file' / 'x.csv'}"),
        (["query", output["uri"], "SELECT 1", "--out", str(tmp_path / "a-folder.csv")],
         f"cannot write {tmp_path / 'a-folder.csv'}: IsADirectoryError"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"batchseg: error: {message}"), err
    assert not (tmp_path / "png").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file",
        "a-folder.csv",
    ]
    assert list((tmp_path / "a-folder.csv").iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "", "SELECT 1"],
        ["segment", "--manifest", "", "--output", "o"],
        ["export-coco", "x", "--out", ""],
        ["render", "x", "--out", "o", "--limit", "0"],
        ["report", "x", "--out", "r.html", "--gallery", "-1"],
        ["synth", "--output", "o", "--images", "0"],
        ["synth", "--output", "o", "--images", "4", "--size", "8"],
        ["train", "--images", "", "--annotations", "a.json", "--output", "o", "--iterations", "1"],
    ],
    ids=lambda argv: " ".join(argv[:1] + [a for a in argv if a.startswith("--")][-1:]),
)
def test_empty_paths_and_impossible_counts_are_refused_while_parsing(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty path would silently mean the working directory; a count of 0 (or -1) is never meant."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(
        r"error: argument [-\w]+: (expected a path or URI, not an empty string|must be at least)", err
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Read-side inputs made without Ray: a good output (tests/test_render's), one whose last of 70,001 rows
    has a non-numeric image_id (a query on it fails while its rows stream, after the first batch), damaged
    outputs (a shard that is not Parquet, one of another tool's schema, a summary.json that is a list),
    annotations that are not COCO, and a folder that does not exist yet."""
    root = tmp_path_factory.mktemp("inputs")
    good = write_segment_output(root / "good")
    paths = {"OUT": good.uri, "GT": good.data.annotations, "NEW": str(root / "new"), "DIR": str(root)}
    for name in ("BIG", "CORRUPT", "FOREIGN", "LISTED"):
        (root / name).mkdir()
        paths[name] = str(root / name)
    rows = [ok_row(str(i), f"/a/{i}.jpg", 10, 10, []) for i in range(70_000)] + [
        ok_row("x", "/a/x", 10, 10, [])
    ]
    (root / "BIG" / "part-000000.parquet").write_bytes(to_parquet(rows, {}))
    (root / "CORRUPT" / "part-000000.parquet").write_text("not parquet")
    pq.write_table(pa.table({"a": [1, 2]}), root / "FOREIGN" / "part-000000.parquet")
    for shard in pathlib.Path(good.uri).glob("part-*.parquet"):
        (root / "LISTED" / shard.name).write_bytes(shard.read_bytes())
    (root / "LISTED" / "summary.json").write_text("[1, 2]")
    gt = json.loads(pathlib.Path(good.data.annotations).read_text())
    (root / "images-as-ints.json").write_text(json.dumps(gt | {"images": [1, 2]}))
    paths["INTS_GT"] = str(root / "images-as-ints.json")
    (root / "gt2.json").write_text(json.dumps(gt))  # for --json naming the annotations: not overwritten
    paths["GT2"] = str(root / "gt2.json")
    return paths


BAD_INPUT = [
    (["query", "{OUT}", ""], "query failed: no statement that returns rows"),
    (["query", "{OUT}", "   "], "query failed: no statement that returns rows"),
    (["query", "{OUT}", "-- nothing"], "query failed: no statement that returns rows"),
    (["query", "{BIG}", "SELECT CAST(image_id AS INT) AS n FROM images", "--format", "csv", "--out", "{DIR}/n.csv"],
     "query failed: Conversion Error"),
    (["query", "{CORRUPT}", "SELECT 1"], "cannot read output .*CORRUPT: .*Parquet"),
    (["query", "{FOREIGN}", "SELECT count(*) FROM images"], "a shard of output .*FOREIGN is not a batchseg shard: it has no column image_id"),
    (["query", "{OUT}", "SELECT 1", "--storage-options", ""], "argument --storage-options: not valid JSON"),
    (["render", "{OUT}", "--out", "{NEW}", "--where", ""], "--where is empty"),
    (["render", "{OUT}", "--out", "{NEW}", "--where", "-- x"], "--where cannot be evaluated on the images view: Parser Error"),
    (["render", "{OUT}", "--out", "{NEW}", "--where", "true) OR (true"], "--where cannot be evaluated on the images view: Parser Error"),
    (["render", "{OUT}", "--out", "{NEW}", "--where", "nope(("], "--where cannot be evaluated on the images view: Parser Error"),
    (["render", "{OUT}", "--out", "{NEW}", "--limit", "0"], "argument --limit: must be at least 1, not 0"),
    (["render", "{OUT}", "--out", "{NEW}", "--limit", "-1"], "argument --limit: must be at least 1, not -1"),
    (["render", "{BIG}", "--out", "{NEW}", "--where", "CAST(image_id AS INT) >= 0"], "--where cannot be evaluated on the images view: Conversion Error"),
    (["render", "{CORRUPT}", "--out", "{NEW}"], "cannot read output .*CORRUPT: .*Parquet"),
    (["export-coco", "{CORRUPT}", "--out", "{NEW}/r.json"], "cannot read .*CORRUPT.*Parquet"),
    (["export-coco", "{FOREIGN}", "--out", "{NEW}/r.json"], "is not a batchseg shard"),
    (["export-coco", "{OUT}", "--out", "{NEW}/r.json", "--images", "{NEW}/r.json"], "--images .* is also --out"),
    (["report", "{FOREIGN}", "--out", "{NEW}/r.html"], "is not a batchseg shard"),
    (["report", "{LISTED}", "--out", "{NEW}/r.html"], "summary.json is not a batchseg summary"),
    (["report", "{GT}", "--out", "{NEW}/r.html"], "annotations.json holds no part-NNNNNN.parquet files and no _summary.json"),
    (["report", "{OUT}", "--out", "{NEW}/r.html", "--gallery", "x"], "argument --gallery: expected a whole number"),
    (["eval", "--predictions", "{OUT}", "--annotations", "{GT}", "--json", "{DIR}"], "cannot write .*: IsADirectoryError"),
    (["eval", "--predictions", "{OUT}", "--annotations", "{GT2}", "--json", "{GT2}"], "--json .* is also --annotations"),
    (["eval", "--predictions", "{FOREIGN}", "--annotations", "{GT}"], "is not a batchseg shard"),
    (["eval", "--predictions", "{CORRUPT}", "--annotations", "{GT}"], "cannot read .*CORRUPT.*Parquet"),
    (["eval", "--predictions", "{OUT}", "--annotations", "{INTS_GT}"], "is not a COCO instances JSON"),
    (["eval", "--predictions", "{OUT}", "--annotations", "{OUT}"], "is a folder, not a COCO JSON file"),
    # Files to write that would replace the output's own: a shard, the summary, a completion record.
    (["query", "{OUT}", "SELECT 1", "--format", "csv", "--out", "{OUT}/part-000000.parquet"], "--out .*part-000000.parquet would overwrite batchseg's own file"),
    (["export-coco", "{OUT}", "--out", "{NEW}/r.json", "--images", "{OUT}/summary.json"], "--images .*summary.json would overwrite batchseg's own file"),
    (["report", "{OUT}", "--out", "{OUT}/_done/part-000001.json"], "--out .*part-000001.json would overwrite batchseg's own file"),
    (["eval", "--predictions", "{OUT}", "--annotations", "{GT}", "--json", "{OUT}/part-000001.parquet"], "--json .* would overwrite batchseg's own file"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_read_side_commands_refuse_bad_input_with_one_line(
    inputs: dict[str, str], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """Bad SQL, empty or impossible values, damaged outputs, files that cannot be written: exit 2 and one
    line naming the problem (no traceback), whether DuckDB finds it before the rows stream or while."""
    err = refusal([arg.format(**inputs) for arg in argv], capsys)
    assert re.search(message, err), err


def test_a_render_limit_past_the_output_renders_every_image(
    inputs: dict[str, str], tmp_path: pathlib.Path
) -> None:
    """A --limit too big for a SQL LIMIT (past 2**63) was a "--where is not valid SQL" error."""
    assert main(["render", inputs["OUT"], "--out", str(tmp_path), "--limit", str(10**23)]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 7
