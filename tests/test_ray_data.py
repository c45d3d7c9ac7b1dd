"""The Ray Data entry point on the local Ray: the same rows as ``batchseg segment`` over the same images,
from URIs or from bytes, and a segment output read back with ``ray.data.read_parquet``."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from batchseg.analysis.results import open_results
from batchseg.demo import SHAPES_MODEL
from batchseg.errors import BatchsegError, DeviceError
from batchseg.format.records import SCHEMA, output_schema
from batchseg.io.manifest import default_image_id
from batchseg.segment.job import SegmentConfig
from batchseg.segment.ray_data import Segmenter
from batchseg.train.synth import write_dataset
from tests.segmenting import assert_same_rows, segment_in_process

OPTIONS = {"weights": str(SHAPES_MODEL), "score_threshold": 0.3, "batch_size": 1}


@pytest.fixture(scope="module")
def images(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Six shapes images plus a missing file and a text file, and batchseg segment's output for them."""
    root = tmp_path_factory.mktemp("raydata")
    uris = write_dataset(str(root / "shapes"), 6, seed=4, size=96).uris
    (root / "notes.jpg").write_text("not an image")
    uris += [str(root / "missing.jpg"), str(root / "notes.jpg")]
    (root / "manifest.txt").write_text("".join(f"{u}\n" for u in uris))
    config = SegmentConfig(
        manifest=str(root / "manifest.txt"), output=str(root / "out"), shard_size=3, **OPTIONS
    )
    segment_in_process(config)
    return {"uris": uris, "output": config.output, "rows": open_results(config.output).to_table().to_pylist()}


def by_uri(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: r["uri"])


def test_map_batches_gives_the_rows_segment_gives(images: dict[str, Any]) -> None:
    import ray

    items = [{"uri": u, "camera": f"cam{n % 3}", "box": [n, n + 1]} for n, u in enumerate(images["uris"])]
    ds = ray.data.from_items(items)
    rows = ds.map_batches(
        Segmenter,
        fn_constructor_kwargs=OPTIONS | {"keep_columns": ["camera", "box"]},  # a list, as Python users write
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=3,
        num_cpus=1,
    ).take_all()
    kept = {r["uri"]: (r.pop("camera"), list(r.pop("box"))) for r in rows}
    assert kept == {item["uri"]: (item["camera"], item["box"]) for item in items}
    assert_same_rows(by_uri(rows), by_uri(images["rows"]))
    statuses = {r["uri"].rsplit("/", 1)[-1]: (r["status"], (r["error"] or "").split(":")[0]) for r in rows}
    assert statuses["missing.jpg"] == ("error", "not_found")
    assert statuses["notes.jpg"] == ("error", "not_an_image")
    assert sum(len(r["instances"] or []) for r in rows) > 0


def test_a_bytes_column_with_ids_in_one_actor(images: dict[str, Any]) -> None:
    """Called directly, as Ray Data calls it: encoded images in, a table of batchseg's schema out."""
    segmenter = Segmenter(**OPTIONS)
    data = [pathlib.Path(u).read_bytes() for u in images["uris"][:6]] + [b"", b"\x89PNG broken"]
    table = segmenter({"bytes": data, "image_id": [f"i{n}" for n in range(8)]})  # type: ignore[dict-item]
    assert table.schema == SCHEMA
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == [f"i{n}" for n in range(8)]
    expected = {r["uri"]: r for r in images["rows"]}
    assert_same_rows(
        rows[:6],
        [expected[u] | {"uri": "", "image_id": f"i{n}"} for n, u in enumerate(images["uris"][:6])],
    )
    assert [r["error"].split(":")[0] for r in rows[6:]] == ["empty_file", "not_an_image"]


def test_bad_options_and_batches_are_refused(images: dict[str, Any]) -> None:
    with pytest.raises(BatchsegError, match="--score-threshold"):
        Segmenter(weights=str(SHAPES_MODEL), score_threshold=float("nan"))
    with pytest.raises(BatchsegError, match="needs a 'uri' or 'bytes' column"):
        Segmenter(**OPTIONS)({"path": ["a.jpg"]})  # type: ignore[dict-item]


def test_a_segment_output_reads_back_with_ray_data(images: dict[str, Any]) -> None:
    import ray

    files = open_results(images["output"]).files
    table = pa.Table.from_pylist(ray.data.read_parquet(files).take_all(), schema=SCHEMA)
    assert by_uri(table.to_pylist()) == by_uri(images["rows"])


def test_keep_columns_carry_the_batchs_columns_into_the_rows(images: dict[str, Any]) -> None:
    """``keep_columns`` is segment's ``--keep-columns`` for a batch: named columns (or ``"all"`` but
    ``uri``, ``image_id`` and ``bytes``) follow batchseg's, with their types, on error rows too."""
    uris = images["uris"][5:]  # an image, the missing file, the text file
    batch = {
        "uri": np.array(uris, dtype=object),
        "camera": np.array(["north", "south", "east"], dtype=object),
        "exposure": np.array([0.5, 1.25, 2.0]),
        "frame": np.array([7, 8, 9], dtype=np.int16),
        "box": np.array([[1, 2], [3, 4], [5, 6]]),  # how Ray Data hands a column of equal-length lists
    }
    table = Segmenter(**OPTIONS, keep_columns=("frame", "camera"))(batch)  # type: ignore[arg-type]
    assert table.schema == output_schema(pa.schema([("frame", pa.int16()), ("camera", pa.string())]))
    rows = table.to_pylist()
    assert [(r["status"], r["frame"], r["camera"]) for r in rows] == [
        ("ok", 7, "north"),
        ("error", 8, "south"),
        ("error", 9, "east"),
    ]
    everything = Segmenter(**OPTIONS, keep_columns="all")(batch)  # type: ignore[arg-type]
    assert everything.schema.names == [*SCHEMA.names, "camera", "exposure", "frame", "box"]
    assert everything.column("exposure").to_pylist() == [0.5, 1.25, 2.0]
    assert everything.column("box").to_pylist() == [[1, 2], [3, 4], [5, 6]]
    assert (
        everything.drop_columns(["camera", "exposure", "frame", "box"]).to_pylist()
        == table.drop_columns(["frame", "camera"]).to_pylist()
    )


def test_keep_columns_the_batch_lacks_or_that_clash_are_refused(images: dict[str, Any]) -> None:
    batch = {"uri": np.array(images["uris"][:1], dtype=object), "status": np.array(["raw"], dtype=object)}
    with pytest.raises(
        BatchsegError, match=r"keep_columns: the batch has no column 'camera' \(it has: uri, status\)"
    ):
        Segmenter(**OPTIONS, keep_columns=("camera",))(batch)  # type: ignore[arg-type]
    with pytest.raises(BatchsegError, match="status clash with batchseg's own"):
        Segmenter(**OPTIONS, keep_columns=("status",))
    with pytest.raises(BatchsegError, match="keep_columns='all': the batch's column\\(s\\) status clash"):
        Segmenter(**OPTIONS, keep_columns="all")(batch)  # type: ignore[arg-type]
    with pytest.raises(BatchsegError, match=r"Category clash with batchseg's own columns .*ignoring case"):
        Segmenter(**OPTIONS, keep_columns=("Category",))
    batch = {"uri": batch["uri"], "Status": batch["status"]}
    with pytest.raises(BatchsegError, match="keep_columns='all': the batch's column\\(s\\) Status clash"):
        Segmenter(**OPTIONS, keep_columns="all")(batch)  # type: ignore[arg-type]


def test_a_device_error_is_raised_never_made_rows(tmp_path: pathlib.Path) -> None:
    """A CUDA error in the model is no image's fault: the batch fails (Ray Data's task raises) rather than
    becoming inference_error rows."""
    segmenter = Segmenter(**OPTIONS)
    data = write_dataset(str(tmp_path / "shapes"), 2, seed=4, size=96).uris

    def broken(images: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    segmenter.processor.predictor.detect = broken  # type: ignore[method-assign]
    with pytest.raises(DeviceError, match="CUDA error: an illegal memory access"):
        segmenter({"uri": np.array(data)})


def test_nulls_in_a_batch_are_error_rows_of_their_own(tmp_path: pathlib.Path) -> None:
    """Called directly with numpy batches, as Ray Data calls it: a null URI or bytes fails its row alone
    (``no_input``), with an empty uri and an id no other row has; a null image_id is a missing one."""
    segmenter = Segmenter(**OPTIONS)
    uris = write_dataset(str(tmp_path / "shapes"), 2, seed=4, size=96).uris
    batch = {
        "uri": np.array([uris[0], None, None, uris[1]], dtype=object),
        "image_id": np.array(["a", None, None, None], dtype=object),
    }
    rows = segmenter(batch).to_pylist()  # type: ignore[arg-type]
    assert [(r["uri"], r["status"], r["error"]) for r in rows] == [
        (uris[0], "ok", None),
        ("", "error", "no_input: 'uri' is null, nothing to read"),
        ("", "error", "no_input: 'uri' is null, nothing to read"),
        (uris[1], "ok", None),
    ]
    ids = [r["image_id"] for r in rows]
    assert ids[0] == "a" and ids[3] == default_image_id(uris[1])
    assert len(set(ids)) == 4 and all(len(i) == 16 for i in ids[1:3])
    data = np.array([pathlib.Path(uris[0]).read_bytes(), None], dtype=object)
    rows = segmenter({"bytes": data}).to_pylist()  # type: ignore[dict-item]
    assert [(r["status"], r["error"]) for r in rows] == [
        ("ok", None),
        ("error", "no_input: 'bytes' is null, nothing to read"),
    ]


def test_pyarrow_batches_with_nulls_through_ray_data(images: dict[str, Any]) -> None:
    """``batch_format="pyarrow"`` hands a table: taken as a numpy batch is, kept columns with their Arrow
    types; a null in the bytes fails its row, a null URI beside bytes is just an empty uri."""
    import ray

    data = [pathlib.Path(u).read_bytes() for u in images["uris"][:3]]
    items = [
        {"bytes": data[0], "uri": images["uris"][0], "frame": 1},
        {"bytes": None, "uri": images["uris"][1], "frame": 2},
        {"bytes": data[2], "uri": None, "frame": 3},
    ]
    rows = (
        ray.data.from_items(items)
        .map_batches(
            Segmenter,
            fn_constructor_kwargs=OPTIONS | {"keep_columns": ["frame"]},
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_format="pyarrow",
            batch_size=3,
            num_cpus=1,
        )
        .take_all()
    )
    rows.sort(key=lambda r: r["frame"])
    expected = {r["uri"]: r for r in images["rows"]}
    assert [(r["frame"], r["uri"], r["status"], r["error"]) for r in rows] == [
        (1, images["uris"][0], "ok", None),
        (2, images["uris"][1], "error", "no_input: 'bytes' is null, nothing to read"),
        (3, "", "ok", None),
    ]
    third = {k: v for k, v in rows[2].items() if k != "frame"}
    assert_same_rows([third], [expected[images["uris"][2]] | {"uri": "", "image_id": third["image_id"]}])
    assert rows[1]["image_id"] not in {rows[0]["image_id"], rows[2]["image_id"]}
