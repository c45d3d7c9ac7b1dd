"""``--keep-columns``: manifest columns carried into every output row (error rows too), with their types
from Parquet and JSON Lines manifests and as written from CSV ones; names that clash are refused first."""

from __future__ import annotations

import datetime
import json
import pathlib
import pickle
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchseg.analysis.query import connect
from batchseg.analysis.results import open_results
from batchseg.cli import main
from batchseg.demo import SHAPES_MODEL
from batchseg.errors import BatchsegError
from batchseg.format.records import SCHEMA
from batchseg.io.manifest import iter_rows, iter_shards, plan_shards
from batchseg.segment.driver import run_segment
from batchseg.segment.job import SegmentConfig, prepare_job
from batchseg.segment.processor import ShardProcessor
from batchseg.train.synth import write_dataset
from tests.refusals import refusal
from tests.segmenting import segment_in_process

SMALL = {"model": "maskrcnn_small", "weights": str(SHAPES_MODEL), "batch_size": 2}
DAY = datetime.datetime(2026, 11, 29, 8, 30)


def metadata(count: int) -> dict[str, Any]:
    """Columns of many Arrow types, as a catalogue would have them beside its URIs."""
    return {
        "camera": [f"cam-{i % 3}" for i in range(count)],
        "exposure": [0.5 * i for i in range(count)],
        "frame": pa.array(range(count), pa.int16()),
        "taken": pa.array([DAY + datetime.timedelta(hours=i) for i in range(count)], pa.timestamp("ms")),
        "tags": [["a", str(i)] for i in range(count)],
        "where": [{"lat": 1.0 * i, "lon": -1.0 * i} for i in range(count)],
        "code": [f"{i:03d}" for i in range(count)],  # leading zeros: text, whatever it looks like
        "blank": [None if i % 2 else "x" for i in range(count)],
    }


def parquet_manifest(root: pathlib.Path, uris: list[str]) -> tuple[str, pa.Table]:
    table = pa.table({"uri": uris, **metadata(len(uris))})
    pq.write_table(table, root / "manifest.parquet")
    return str(root / "manifest.parquet"), table


def kept_rows(manifest: str, keep: Any, shard_size: int = 3) -> list[dict[str, Any]]:
    plan = plan_shards(manifest, shard_size, keep=keep)
    rows = []
    for shard in iter_shards(plan):
        assert shard.columns is not None and shard.columns.num_rows == len(shard)
        rows += shard.columns.to_pylist()
    return rows


def test_parquet_and_jsonl_keep_their_types_csv_keeps_the_text(tmp_path: pathlib.Path) -> None:
    uris = [f"/data/{i}.jpg" for i in range(7)]
    manifest, table = parquet_manifest(tmp_path, uris)
    plan = plan_shards(manifest, 3, keep="all")
    assert plan.columns == table.schema.remove_metadata().remove(0)  # all but uri, types as written
    assert kept_rows(manifest, "all") == table.drop_columns(["uri"]).to_pylist()
    assert kept_rows(manifest, ("code", "frame")) == table.select(["code", "frame"]).to_pylist()

    (tmp_path / "m.csv").write_text(
        "uri,code,exposure,note\n" + "".join(f"{u},{i:03d},{0.5 * i},\n" for i, u in enumerate(uris))
    )
    csv_plan = plan_shards(str(tmp_path / "m.csv"), 3, keep="all")
    assert csv_plan.columns == pa.schema([(n, pa.string()) for n in ("code", "exposure", "note")])
    assert kept_rows(str(tmp_path / "m.csv"), "all")[1] == {"code": "001", "exposure": "0.5", "note": None}

    lines = [json.dumps({"uri": u, "frame": i, "tags": ["x"], "ok": i % 2 == 0}) for i, u in enumerate(uris)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    json_plan = plan_shards(str(tmp_path / "m.jsonl"), 3, keep="all")
    assert json_plan.columns == pa.schema(
        [("frame", pa.int64()), ("tags", pa.list_(pa.string())), ("ok", pa.bool_())]
    )
    assert kept_rows(str(tmp_path / "m.jsonl"), ("ok",)) == [{"ok": i % 2 == 0} for i in range(7)]


def test_a_shard_carries_only_its_own_rows_to_the_actor(tmp_path: pathlib.Path) -> None:
    uris = [f"/data/{i}.jpg" for i in range(5000)]
    manifest, _ = parquet_manifest(tmp_path, uris)
    shard = next(iter_shards(plan_shards(manifest, 10, keep="all")))
    whole = len(pickle.dumps(pq.read_table(manifest)))
    assert len(pickle.dumps(shard)) < whole / 50  # an Arrow slice would pickle the whole batch


def test_kept_values_are_part_of_the_shard_fingerprint(tmp_path: pathlib.Path) -> None:
    uris = [f"/data/{i}.jpg" for i in range(6)]
    manifest, table = parquet_manifest(tmp_path, uris)
    before = plan_shards(manifest, 3, keep=("camera",)).shard_fingerprints
    assert plan_shards(manifest, 3).shard_fingerprints != before  # keeping columns is another row
    cameras = table.column("camera").to_pylist()
    cameras[4] = "replaced"
    pq.write_table(table.set_column(1, "camera", pa.array(cameras)), manifest)
    after = plan_shards(manifest, 3, keep=("camera",)).shard_fingerprints
    assert (after[0], after[1] != before[1]) == (before[0], True)


@pytest.mark.parametrize(
    ("manifest", "keep", "message"),
    [
        ("parquet", ("camera", "lens"), r"has no column 'lens' \(it has: uri, camera, exposure"),
        ("txt", ("camera",), r"has no column 'camera' \(it has: uri\)"),
        ("folder", ("camera",), "is a folder; it has no columns to keep"),
    ],
)
def test_columns_a_manifest_does_not_have_are_refused(
    tmp_path: pathlib.Path, manifest: str, keep: tuple[str, ...], message: str
) -> None:
    uris = [f"/data/{i}.jpg" for i in range(3)]
    paths = {"parquet": parquet_manifest(tmp_path, uris)[0], "folder": str(tmp_path)}
    (tmp_path / "m.txt").write_text("\n".join(uris))
    paths["txt"] = str(tmp_path / "m.txt")
    with pytest.raises(BatchsegError, match=message):
        plan_shards(paths[manifest], 3, keep=keep)
    assert next(iter_rows(paths["txt"], keep="all"))[2] is None  # 'all' of a list of URIs: nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep-columns", "camera,,code"], "argument --keep-columns: expected 'all' or column names"),
        (["--keep-columns", "code,code"], "argument --keep-columns: names a column twice"),
        (["--keep-columns", "camera,status"], "--keep-columns: status clash with batchseg's own columns"),
        (["--keep-columns", "score"], "--keep-columns: score clash with batchseg's own columns"),
        (["--keep-columns", "uri"], "--keep-columns: uri clash with batchseg's own columns"),
        (["--keep-columns", "all", "--manifest-with", "height"], "the manifest's column(s) height clash"),
        # DuckDB reads names without case: a kept Category would be what instances.category returns
        (
            ["--keep-columns", "Status,URI,camera,Category"],
            "--keep-columns: Status, URI, Category clash with batchseg's own columns (the row's and the "
            "instances'), ignoring case (as SQL reads column names); rename them in the manifest",
        ),
        (["--keep-columns", "camera,Camera,code"], "--keep-columns: camera, Camera clash with each other"),
        (["--keep-columns", "all", "--manifest-with", "Width"], "the manifest's column(s) Width clash"),
    ],
)
def test_bad_keep_columns_are_one_line_before_anything_is_written(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    manifest, table = parquet_manifest(tmp_path, ["/data/a.jpg"])
    if "--manifest-with" in args:
        pq.write_table(table.append_column(args[-1], pa.array([1])), manifest)
        args = args[:-2]
    err = refusal(["segment", "--manifest", manifest, "--output", str(tmp_path / "out"), *args], capsys)
    assert message in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def kept_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real output (without Ray: the job is not under test here): six shapes images and a missing one, every metadata column kept."""
    root = tmp_path_factory.mktemp("keep")
    uris = [*write_dataset(str(root / "shapes"), 6, seed=3, size=96).uris, str(root / "missing.jpg")]
    manifest, table = parquet_manifest(root, uris)
    config = SegmentConfig(
        manifest=manifest, output=str(root / "out"), shard_size=3, keep_columns="all", **SMALL
    )
    summary = segment_in_process(config)
    return {"config": config, "summary": summary, "manifest": table, "root": root}


def test_every_row_carries_its_manifest_columns_with_their_types(kept_output: dict[str, Any]) -> None:
    config, manifest = kept_output["config"], kept_output["manifest"]
    assert (kept_output["summary"]["ok"], kept_output["summary"]["error"]) == (6, 1)
    results = open_results(config.output)
    table = results.to_table()
    assert table.schema.names == [*SCHEMA.names, *manifest.schema.names[1:]]
    assert table.schema.remove_metadata() == pa.schema([*SCHEMA, *manifest.schema.remove(0)])
    assert table.drop_columns(SCHEMA.names).to_pylist() == manifest.drop_columns(["uri"]).to_pylist()
    error = table.filter(pa.compute.equal(table.column("status"), "error")).to_pylist()
    assert (
        len(error) == 1
        and error[0]["code"] == "006"
        and error[0]["taken"] == DAY + datetime.timedelta(hours=6)
    )
    assert results.kept_columns == manifest.schema.names[1:]
    image = next(results.images(status="ok"))
    assert image.kept["camera"] == "cam-0" and image.kept["tags"] == ["a", "0"]
    for shard in sorted(pathlib.Path(config.output).glob("part-*.parquet")):  # plain Parquet for other tools
        assert pq.read_schema(shard).names[len(SCHEMA) :] == manifest.schema.names[1:]


def test_the_sql_views_expose_the_kept_columns(kept_output: dict[str, Any]) -> None:
    con = connect(kept_output["config"].output)
    per_camera = con.sql("SELECT camera, count(*) FROM images GROUP BY camera ORDER BY camera").fetchall()
    assert per_camera == [("cam-0", 3), ("cam-1", 2), ("cam-2", 2)]
    instances = con.sql("SELECT image_id, code, frame, category, score FROM instances").fetchall()
    ok = open_results(kept_output["config"].output).to_table().to_pylist()
    expected = sorted((r["image_id"], r["code"], r["frame"]) for r in ok for _ in r["instances"] or [])
    assert sorted(row[:3] for row in instances) == expected and expected


def test_verify_passes_and_other_kept_columns_are_other_settings(
    kept_output: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    config = kept_output["config"]
    assert main(["verify", config.output]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    with pytest.raises(
        BatchsegError, match=r"other settings \(keep_columns: .*'camera': 'string'.* -> \{\}\)"
    ):
        run_segment(SegmentConfig(**{**vars(config), "keep_columns": ()}))


def test_csv_columns_reach_the_rows_as_text_without_ray(tmp_path: pathlib.Path) -> None:
    uris = write_dataset(str(tmp_path / "shapes"), 2, seed=4, size=96).uris
    (tmp_path / "m.csv").write_text("uri,code,caption\n" + f'{uris[0]},007,"a, b"\n{uris[1]},1e3,\n')
    with prepare_job(SegmentConfig(manifest=str(tmp_path / "m.csv"), output=str(tmp_path / "out"),
                                   keep_columns=("caption", "code"), **SMALL)) as job:  # fmt: skip
        ShardProcessor.for_job(job).process(next(iter_shards(job.plan)))
    rows = open_results(str(tmp_path / "out")).to_table(columns=["uri", "caption", "code"]).to_pylist()
    assert rows == [
        {"uri": uris[0], "caption": "a, b", "code": "007"},
        {"uri": uris[1], "caption": None, "code": "1e3"},
    ]
