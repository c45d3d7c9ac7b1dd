"""Parquet training sets: a COCO JSON converted once gives the same examples and masks; chunk sizes come from
footers alone; a segment output's instances selected with SQL are written once into the run folder; and the
round trip: segment, select with --where, train, and the model learns from exactly the instances selected."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import torch

from batchseg.analysis.query import run_query
from batchseg.errors import BatchsegError
from batchseg.options import check
from batchseg.train.config import TrainConfig
from batchseg.train.data import instance_mask
from batchseg.train.examples import CocoTrainingSet, ParquetTrainingSet, open_training_set
from batchseg.train.parquet import (
    DATA_FOLDER,
    RECORD_FILE,
    coco_to_parquet,
    image_rows,
    select_training_set,
)
from batchseg.train.sampling import EpochOrder, Progress, examples_at, positions
from batchseg.train.synth import write_dataset
from batchseg.train.trainer import check_inputs
from tests.s3server import S3Server
from tests.test_finetune import assert_trunk_frozen_as_started
from tests.test_layers import modules_loaded_by
from tests.test_render import Output, write_segment_output

# --- COCO JSON, converted once -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A shapes set of 9 images whose JSON has every kind of segmentation and annotation training meets:
    RLE strings (synth's), a polygon, an uncompressed RLE, a crowd annotation (dropped) and an image whose
    only annotation is crowd (left out)."""
    data = write_dataset(str(tmp_path_factory.mktemp("coco")), 9, seed=5, size=64)
    gt = json.loads(pathlib.Path(data.annotations).read_text())
    first, second, third = (
        next(a for a in gt["annotations"] if a["image_id"] == i["id"]) for i in gt["images"][:3]
    )
    x, y, w, h = first["bbox"]
    first["segmentation"] = [[x, y, x + w, y, x + w / 2, y + h]]  # a polygon: a triangle in its box
    mask = instance_mask(second["segmentation"], *second["segmentation"]["size"])
    runs, value, count = [], 0, 0
    for pixel in mask.flatten(order="F"):  # column-major, as COCO's RLE counts
        if pixel != value:
            runs.append(count)
            value, count = pixel, 0
        count += 1
    second["segmentation"] = {"size": list(mask.shape), "counts": [*runs, count]}
    third["iscrowd"] = 1
    last = gt["images"][-1]["id"]
    for a in gt["annotations"]:
        if a["image_id"] == last:
            a["iscrowd"] = 1
    pathlib.Path(data.annotations).write_text(json.dumps(gt))
    return data.images, data.annotations


def test_coco_to_parquet_gives_the_json_s_examples_and_masks_in_row_groups(
    coco: tuple[str, str], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, annotations = coco
    out = str(tmp_path / "train")
    record = coco_to_parquet(images, annotations, out, row_group_images=3)
    expected = CocoTrainingSet(images, annotations)
    want = expected.read_chunk(0)
    assert len(want) == 8 and expected.stats.dropped["crowd"] >= 2  # the all-crowd image is left out
    assert record | {"made_from": None} == {
        "made_from": None,
        "images": 8,
        "instances": sum(len(e.labels) for e in want),
        "files": 1,
    }

    def no_rows(*args: Any) -> Any:
        raise AssertionError("a training set batchseg wrote is opened from its footers alone")

    monkeypatch.setattr(ParquetTrainingSet, "_rows", no_rows)
    data = ParquetTrainingSet(out)
    assert data.chunk_sizes == (3, 3, 2)
    assert data.categories == expected.categories == ("__background__", "circle", "square", "triangle")
    monkeypatch.undo()
    got = [e for i in range(len(data.chunk_sizes)) for e in data.read_chunk(i)]
    assert [len(data.read_chunk(i)) for i in range(3)] == list(data.chunk_sizes)
    for g, w in zip(got, want, strict=True):
        assert (g.image_id, g.uri, g.width, g.height, g.labels) == (
            w.image_id,
            w.uri,
            w.width,
            w.height,
            w.labels,
        )
        assert pathlib.Path(g.uri).is_file()  # absolute: no --images needed
        for a, b in zip(g.segmentations, w.segmentations, strict=True):
            assert np.array_equal(instance_mask(a, g.height, g.width), instance_mask(b, w.height, w.width))
    # the polygon and the uncompressed RLE are stored as compressed RLE, with their masks' areas and boxes
    rows = pq.read_table(out).to_pylist()
    assert isinstance(want[0].segmentations[0], list) and isinstance(want[1].segmentations[0]["counts"], list)
    for row, example in zip(rows[:2], want[:2], strict=True):
        first_mask = instance_mask(example.segmentations[0], example.height, example.width)
        instance = row["instances"][0]
        assert isinstance(instance["rle"], str) and instance["score"] == 1.0
        assert instance["area"] == int(first_mask.sum()) > 0
        ys, xs = np.nonzero(first_mask)
        assert instance["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert open_training_set(None, out).chunk_sizes == (3, 3, 2)  # open_training_set knows Parquet


def test_coco_to_parquet_is_a_light_command_and_refuses_an_existing_output(
    coco: tuple[str, str], tmp_path: pathlib.Path
) -> None:
    images, annotations = coco
    out = tmp_path / "p"
    argv = ["coco-to-parquet", "--images", images, "--annotations", annotations, "--output", str(out)]
    assert modules_loaded_by(argv) == set()
    assert (out / "part-000000.parquet").is_file() and (out / RECORD_FILE).is_file()
    with pytest.raises(BatchsegError, match="exists: give a new folder"):
        coco_to_parquet(images, annotations, str(out))


# --- any Parquet of an output's columns ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Output:
    """7 images in two shards: an image without instances, a box-only person, two error rows."""
    return write_segment_output(tmp_path_factory.mktemp("output"))


def test_a_segment_output_is_a_training_set_counted_exactly_once(output: Output) -> None:
    """Not written as a training set: its rows are read once to count the examples (error rows, rows
    without instances and box-only instances are no examples), and its categories come from its pairs."""
    data = ParquetTrainingSet(output.uri)
    examples = [e for i in range(len(data.chunk_sizes)) for e in data.read_chunk(i)]
    assert [len(data.read_chunk(i)) for i in range(len(data.chunk_sizes))] == list(data.chunk_sizes)
    masked = [r for r in output.rows if r["status"] == "ok" and any(i["rle"] for i in r["instances"])]
    assert [e.image_id for e in examples] == [r["image_id"] for r in masked] and len(examples) == 6
    assert sum(len(e.labels) for e in examples) == sum(1 for r in masked for i in r["instances"] if i["rle"])
    assert data.categories == ("__background__", "circle", "square", "triangle")


# --- a segment output's instances selected with SQL ----------------------------------------------------------


def selected_by_query(output: str, where: str) -> list[tuple[str, str]]:
    """(image_id, rle) of each instance ``batchseg query`` selects with ``where``, in output order."""
    out = pathlib.Path(output).parent / f"query-{abs(hash(where))}.parquet"
    sql = f"SELECT image_id, rle FROM instances WHERE rle IS NOT NULL AND ({where})"
    run_query(output, sql, "parquet", str(out))
    return [(r["image_id"], r["rle"]) for r in pq.read_table(out).to_pylist()]


def in_training_set(folder: str) -> list[tuple[str, str]]:
    data = ParquetTrainingSet(folder)
    return [
        (e.image_id, s["counts"])
        for i in range(len(data.chunk_sizes))
        for e in data.read_chunk(i)
        for s in e.segmentations
    ]


def test_a_selection_is_the_instances_the_same_sql_selects_written_once(
    output: Output, tmp_path: pathlib.Path
) -> None:
    run = str(tmp_path / "run")
    folder, record = select_training_set(output.uri, "score >= 0.9", run, row_group_images=2)
    want = selected_by_query(output.uri, "score >= 0.9")
    assert (
        0 < len(want) < sum(len(r["instances"] or []) for r in output.rows)
    )  # it selects, it does not keep all
    assert in_training_set(folder) == want
    assert record["instances"] == len(want) and record["images"] == len({i for i, _ in want})
    data = ParquetTrainingSet(folder)
    assert data.chunk_sizes == (2,) * (record["images"] // 2) + ((1,) if record["images"] % 2 else ())
    # a rerun reuses it, untouched; another --where on that run folder is refused, before anything is written
    part = pathlib.Path(folder) / "part-000000.parquet"
    written = part.stat().st_mtime_ns
    assert select_training_set(output.uri, "score >= 0.9", run) == (folder, record)
    assert part.stat().st_mtime_ns == written
    with pytest.raises(
        BatchsegError, match=r"trains on --from-results .* --where 'score >= 0.9', not .* 'score >= 0.5'"
    ):
        select_training_set(output.uri, "score >= 0.5", run)
    config = TrainConfig(from_results=output.uri, where="score > 0.5", output=run, iterations=1)
    with pytest.raises(BatchsegError, match="give another --output"):
        check_inputs(config)


def test_a_selection_from_an_output_on_s3_into_a_run_folder_on_s3(
    output: Output, s3: S3Server, tmp_path: pathlib.Path
) -> None:
    """Object stores: the output is read through a pyarrow dataset (not DuckDB's own reader), in output
    order too, and the training set is written and read through fsspec."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.options())
    for shard in pathlib.Path(output.uri).glob("part-*.parquet"):
        fs.pipe_file(f"data/parquet-train/output/{shard.name}", shard.read_bytes())
    folder, record = select_training_set(
        "s3://data/parquet-train/output", "score >= 0.8", "s3://out/parquet-train/run", s3.options(), 2
    )
    local, _ = select_training_set(output.uri, "score >= 0.8", str(tmp_path / "run"), row_group_images=2)
    data = ParquetTrainingSet(folder, s3.options())
    assert data.chunk_sizes == ParquetTrainingSet(local).chunk_sizes and record["files"] == 1
    assert [e for i in range(len(data.chunk_sizes)) for e in data.read_chunk(i)] == [
        e for i in range(len(data.chunk_sizes)) for e in ParquetTrainingSet(local).read_chunk(i)
    ]


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("scroe >= 0.9", r"--where cannot be evaluated on the instances view: Binder Error: .*scroe"),
        ("score >=", r"--where cannot be evaluated on the instances view: Parser Error"),
        ("score > 2", r"--where 'score > 2' selects no instance with a mask in .*: nothing to train on"),
        ("  ", "--where is empty"),
    ],
)
def test_a_bad_selection_is_one_error_before_anything_is_written(
    output: Output, tmp_path: pathlib.Path, where: str, error: str
) -> None:
    with pytest.raises(BatchsegError, match=error):
        select_training_set(output.uri, where, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_missing_output_is_refused_before_training(tmp_path: pathlib.Path) -> None:
    config = TrainConfig(from_results=str(tmp_path / "nothing"), output=str(tmp_path / "run"), iterations=1)
    with pytest.raises(BatchsegError, match=r"--from-results .*nothing does not exist"):
        check_inputs(config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchsegError, match="holds no part-"):
        select_training_set(str(tmp_path / "empty"), None, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_data_options_relate(coco: tuple[str, str], tmp_path: pathlib.Path) -> None:
    images, annotations = coco
    run = str(tmp_path / "run")
    base: dict[str, Any] = {"output": run, "iterations": 1}
    for changes, message in [
        ({}, "give --annotations or --from-results"),
        ({"annotations": annotations, "from_results": run}, "give --annotations or --from-results"),
        (
            {"annotations": annotations, "images": images, "where": "score > 0.5"},
            "--where selects instances of --from-results",
        ),
        ({"from_results": run, "images": images}, "--images is for a COCO JSON --annotations"),
    ]:
        with pytest.raises(BatchsegError, match=message):
            check(TrainConfig(**base, **changes))
    with pytest.raises(BatchsegError, match="is COCO JSON: give --images"):
        check_inputs(TrainConfig(**base, annotations=annotations))
    converted = str(tmp_path / "converted")
    coco_to_parquet(images, annotations, converted)
    with pytest.raises(BatchsegError, match="--images is for a COCO JSON --annotations; the Parquet"):
        check_inputs(TrainConfig(**base, annotations=converted, images=images))
    check_inputs(TrainConfig(**base, annotations=converted))


@pytest.mark.parametrize("cut", [1, 2, 3, 5])
def test_instance_rows_are_grouped_back_into_images_across_batches(cut: int) -> None:
    rows = [("a", 1), ("a", 2), ("b", 3), ("c", 4), ("c", 5), ("c", 6), ("a", 7)]  # "a" again: another row
    table = pa.table(
        {
            "image_id": [i for i, _ in rows],
            "uri": [f"/x/{i}.jpg" for i, _ in rows],
            "width": pa.array([8] * len(rows), pa.int32()),
            "height": pa.array([6] * len(rows), pa.int32()),
            "category_id": pa.array([1] * len(rows), pa.int32()),
            "category": ["thing"] * len(rows),
            "score": pa.array([0.5] * len(rows), pa.float32()),
            "bbox": pa.array([[0.0, 0.0, 1.0, 1.0]] * len(rows), pa.list_(pa.float32())),
            "area": pa.array([k for _, k in rows], pa.int64()),
            "rle": [str(k) for _, k in rows],
            "keypoints": pa.nulls(len(rows), pa.list_(pa.float32())),
        }
    )
    batches = table.to_batches(max_chunksize=cut)
    images = pa.concat_tables(list(image_rows(batches))).to_pylist()
    assert [(r["image_id"], [i["rle"] for i in r["instances"]]) for r in images] == [
        ("a", ["1", "2"]),
        ("b", ["3"]),
        ("c", ["4", "5", "6"]),
        ("a", ["7"]),
    ]
    assert {r["status"] for r in images} == {"ok"} and images[0]["instances"][0]["area"] == 1


# --- the round trip: segment, select with SQL, train -----------------------------------------------------------


def test_segment_select_with_sql_train_and_the_model_learns_from_the_instances_selected(
    ray_address: str, tmp_path: pathlib.Path
) -> None:
    """The shipped shapes model segments a small set; ``--where "score >= 0.9"`` keeps its confident
    instances; a run of one epoch at one image a step on two workers takes a step per two selected images,
    from the training set holding exactly what the same SQL selects through ``batchseg query``. The run
    fine-tunes the model that made the labels (self-training), validated by both workers at the checkpoint:
    ``model.pt`` says how its backbone trained, and the stages it froze are bit-identical to the file it
    started from."""
    from batchseg.demo import SHAPES_MODEL
    from batchseg.segment.config import SegmentConfig
    from batchseg.train.trainer import run_training
    from tests.segmenting import segment_in_process

    data = write_dataset(str(tmp_path / "shapes"), 8, seed=2, size=64)
    segmented = str(tmp_path / "segmented")
    segment_in_process(
        SegmentConfig(
            manifest=data.manifest, output=segmented, weights=str(SHAPES_MODEL), score_threshold=0.3
        )
    )
    where = "score >= 0.9"
    want = selected_by_query(segmented, where)
    every = duckdb.sql(f"SELECT count(*) FROM read_parquet('{segmented}/part-*.parquet'), UNNEST(instances)")
    assert 0 < len(want) < every.fetchall()[0][0]
    images = len({i for i, _ in want})
    run = tmp_path / "run"
    config = TrainConfig(
        from_results=segmented,
        where=where,
        output=str(run),
        epochs=1,
        batch_size=1,
        workers=2,
        min_sizes=(64,),
        max_size=96,
        weights=str(SHAPES_MODEL),
        trainable_backbone_layers=2,
        validation_images=data.images,
        validation_annotations=data.annotations,
    )
    metrics = run_training(config)
    assert metrics["step"] == math.ceil(images / 2)  # one epoch, an image a step per worker
    assert metrics["images_seen"] == images  # every selected image, once
    assert 0 <= metrics["segm_AP50"] <= 1
    assert metrics["training_set"] | {"made_from": None} == {
        "made_from": None,
        "images": images,
        "instances": len(want),
        "files": 1,
    }
    assert in_training_set(str(run / DATA_FOLDER)) == want
    saved = torch.load(run / "model.pt", weights_only=True)
    assert saved["backbone"] == {"frozen_batchnorm": True, "trainable_layers": 2, "sync_batchnorm": False}
    assert_trunk_frozen_as_started(saved["model"])
    assert tuple(saved["categories"]) == ParquetTrainingSet(str(run / DATA_FOLDER)).categories
    assert saved["categories"][1:] == ["circle", "square", "triangle"]
    assert saved["config"]["annotations"] == str(run / DATA_FOLDER) and saved["config"]["where"] == where
    # each worker of two reads only its share, and the shares add up to the selection
    data_set = ParquetTrainingSet(str(run / DATA_FOLDER))
    order = EpochOrder(data_set.chunk_sizes, seed=0, epoch=0)
    read = [
        e
        for rank in range(2)
        for e in examples_at(data_set, order, positions(Progress.start(len(order)).share(rank, 2, 1)))
    ]
    assert sorted({(e.image_id, s["counts"]) for e in read for s in e.segmentations}) == sorted(want)
    assert len(read) == 2 * math.ceil(images / 2)
