"""Every option of ``segment`` and ``train`` is checked before anything is written or Ray starts: a bad value
is one ``error:`` line on stderr naming the option, exit 2, and no output folder."""

from __future__ import annotations

import json
import pathlib
import re
import socket
import time
from typing import Any

import pytest

from batchseg import options
from batchseg.cli import main
from batchseg.errors import BatchsegError, ImageError
from batchseg.format.records import error_row, ok_row, to_parquet
from batchseg.segment import driver
from batchseg.segment.job import SegmentConfig
from batchseg.train import trainer
from batchseg.train.synth import SynthDataset, write_dataset
from tests.refusals import refusal


def case_id(extra: list[str]) -> str:
    """A case's test id: its arguments, a port the OS chose named as such (the id must be the same in every
    pytest-xdist worker, each of which picks its own)."""
    return " ".join(CLOSED if arg.startswith("127.0.0.1:") else arg for arg in extra)


CLOSED = "127.0.0.1:CLOSED-PORT"


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (taken from the OS, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A Ray address that does not answer: ray.init retried it for minutes, after the job file was written.
NO_RAY = [
    (["--address", f"127.0.0.1:{closed_port()}"], "cannot reach the Ray cluster at 127.0.0.1:"),
    (["--address", "ray://127.0.0.1:1"], "cannot reach the Ray cluster at ray://127.0.0.1:1"),
    (["--address", "headnode"], "expected HOST:PORT"),
]

# (extra arguments, the option the one-line message must name)
SEGMENT = [
    *NO_RAY,
    (["--score-threshold", "nan"], "--score-threshold"),
    (["--score-threshold", "-0.1"], "--score-threshold"),
    (["--score-threshold", "inf"], "--score-threshold"),
    (["--mask-threshold", "nan"], "--mask-threshold"),
    (["--mask-threshold", "1"], "--mask-threshold"),
    (["--min-size", "0"], "--min-size"),  # silently meant the model's default
    (["--min-size", "-5"], "--min-size"),
    (["--min-size", "16"], "--min-size"),
    (["--min-size", "100000"], "--min-size"),
    (["--min-size", "1.5"], "--min-size"),
    (["--max-size", "1"], "--max-size"),  # ran to the end, every image an error row
    (["--max-size", "0"], "--max-size"),
    (["--max-size", "-1"], "--max-size"),
    (["--max-size", "20000"], "--max-size"),
    (["--min-size", "512", "--max-size", "256"], "--max-size"),
    (["--max-instances", "0"], "--max-instances"),
    (["--max-instances", "-3"], "--max-instances"),
    (["--max-pixels", "0"], "--max-pixels"),
    (["--max-pixels", "-1"], "--max-pixels"),
    (["--batch-size", "0"], "--batch-size"),
    (["--shard-size", "0"], "--shard-size"),
    (["--shard-size", "-1"], "--shard-size"),
    (["--actors", "0"], "--actors"),
    (["--actors", "3,2"], "--actors"),
    (["--actors", "-1,2"], "--actors"),
    (["--actors", ""], "--actors"),
    (["--gpus-per-actor", "-1"], "--gpus-per-actor"),  # Ray's traceback, after the job file was written
    (["--gpus-per-actor", "nan"], "--gpus-per-actor"),
    (["--gpus-per-actor", "inf"], "--gpus-per-actor"),
    (["--gpus-per-actor", "0.00001"], "--gpus-per-actor"),
    (["--cpus-per-actor", "-1"], "--cpus-per-actor"),
    (["--cpus-per-actor", "nan"], "--cpus-per-actor"),
    (["--cpus-per-actor", "inf"], "--cpus-per-actor"),
    (["--cpus-per-actor", "0"], "--cpus-per-actor"),  # silently meant the default
    (["--io-threads", "0"], "--io-threads"),
    (["--prefetch", "-1"], "--prefetch"),
    (["--max-attempts", "0"], "--max-attempts"),  # ran, each shard tried once
    (["--max-attempts", "-2"], "--max-attempts"),
    (["--connect-timeout", "0"], "--connect-timeout"),
    (["--read-timeout", "nan"], "--read-timeout"),
    (["--weights", ""], "--weights"),  # meant the working directory's model.pt
    (["--precision", "fp8"], "--precision"),
    (["--decode", "gpu"], "--decode"),
    (["--storage-options", "[1]"], "--storage-options"),
]

TRAIN = [
    *NO_RAY,
    (["--workers", "0"], "--workers"),
    (["--workers", "0,2"], "--workers must be N or MIN,MAX with 1 <= MIN <= MAX"),
    (["--workers", "3,2"], "--workers must be N or MIN,MAX"),
    (["--workers", "1,2,3"], "--workers must be N or MIN,MAX"),
    (["--workers", "two"], "--workers"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker"),
    (["--gpus-per-worker", "nan"], "--gpus-per-worker"),
    (["--gpus-per-worker", "inf"], "--gpus-per-worker"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker"),  # silently meant 1
    (["--cpus-per-worker", "-2"], "--cpus-per-worker"),
    (["--cpus-per-worker", "nan"], "--cpus-per-worker"),
    (["--iterations", "0"], "--iterations"),
    (["--iterations", "-1"], "--iterations"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--betas", "0.9,1"], "--betas"),
    (["--betas", "0.9"], "--betas"),
    (["--betas", "0.9,0.99", "--optimizer", "sgd"], "--betas are AdamW's"),
    (["--warmup-iterations", "-1"], "--warmup-iterations"),
    (["--min-sizes", "0"], "--min-sizes"),
    (["--min-sizes", "128,-1"], "--min-sizes"),
    (["--min-sizes", "100000"], "--min-sizes"),
    (["--min-sizes", ""], "--min-sizes"),
    (["--max-size", "0"], "--max-size"),  # silently meant the model's
    (["--max-size", "1"], "--max-size"),
    (["--min-sizes", "128,512", "--max-size", "256"], "--max-size"),
    (["--rois-per-image", "0"], "--rois-per-image"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--grad-clip", "nan"], "--grad-clip"),
    (["--grad-clip", "inf"], "--grad-clip"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--max-failures", "-2"], "--max-failures"),
    (["--loader-workers", "-1"], "--loader-workers"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**70)], "--seed"),
    (["--weights", ""], "--weights"),
    (["--precision", "fp8"], "--precision"),
    (["--precision", "fp16"], "--precision fp16 needs --gpus-per-worker"),  # was fp32 on CPU, silently
    # two workers on one GPU: NCCL fails them once both are placed; a worker trains on one GPU of 1.5
    (["--gpus-per-worker", "0.5"], "--gpus-per-worker must be 0 (CPU) or a whole number: two training"),
    (["--gpus-per-worker", "1.5"], "--gpus-per-worker"),
    (["--trainable-backbone-layers", "6", "--weights", "DEFAULT"], "--trainable-backbone-layers must be in"),
    (["--trainable-backbone-layers", "3"], "--trainable-backbone-layers is for pretrained --weights"),
    # with pretrained weights the backbone's BatchNorm is frozen; on CPUs torch cannot synchronise it
    (["--sync-batchnorm", "--weights", "DEFAULT"], "--sync-batchnorm is for training from scratch"),
    (["--sync-batchnorm"], "--sync-batchnorm needs --gpus-per-worker"),
]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused job fails before Ray starts: starting it here fails the test."""

    def refuse(address: str | None) -> None:
        raise AssertionError("Ray was started for a job that should have been refused")

    monkeypatch.setattr(driver, "init_ray", refuse)  # the trainer takes it from the driver when it runs


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> SynthDataset:
    return write_dataset(str(tmp_path_factory.mktemp("shapes")), 2, seed=1, size=64)


def refused(argv: list[str], option: str, out: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refusal(argv, capsys)
    assert option in err, err
    assert not out.exists(), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize(("extra", "option"), SEGMENT, ids=[case_id(extra) for extra, _ in SEGMENT])
def test_segment_refuses_a_bad_option_before_writing_anything(
    shapes: SynthDataset,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    option: str,
) -> None:
    out = tmp_path / "out"
    argv = ["segment", "--manifest", shapes.manifest, "--output", str(out), "--model", "maskrcnn_small"]
    weights = [] if "--weights" in extra else ["--weights", "none"]
    refused([*argv, *weights, *extra], option, out, capsys)


@pytest.mark.parametrize(("extra", "option"), TRAIN, ids=[case_id(extra) for extra, _ in TRAIN])
def test_train_refuses_a_bad_option_before_writing_anything(
    shapes: SynthDataset,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    option: str,
) -> None:
    out = tmp_path / "run"
    argv = ["train", "--images", shapes.images, "--annotations", shapes.annotations, "--output", str(out)]
    length = [] if "--epochs" in extra or "--iterations" in extra else ["--iterations", "2"]
    refused([*argv, *length, *extra], option, out, capsys)


def annotations_with(shapes: SynthDataset, folder: pathlib.Path, change: Any) -> tuple[str, dict[str, Any]]:
    """A copy of the shapes' COCO JSON that ``change`` (a function of the data set) altered in place."""
    coco = json.loads(pathlib.Path(shapes.annotations).read_text())
    change(coco)
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco))
    return str(path), coco


def each(change: Any) -> Any:
    """A change of every annotation."""
    return lambda coco: coco.update(annotations=[a | change(a) for a in coco["annotations"]])


NOTHING_TO_LEARN = {
    "crowd": each(lambda a: {"iscrowd": 1}),
    "with a box of no size, NaN or outside the image": each(lambda a: {"bbox": [0, 0, float("nan"), 9]}),
    "without a polygon of 3 points or more": each(lambda a: {"segmentation": [[1, 1, 5, 5]]}),
    "of an image id not in 'images'": each(lambda a: {"image_id": 999}),
}


@pytest.mark.parametrize(("reason", "change"), NOTHING_TO_LEARN.items(), ids=list(NOTHING_TO_LEARN))
def test_train_refuses_annotations_with_nothing_to_learn_before_ray_starts(
    shapes: SynthDataset, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], reason: str, change: Any
) -> None:
    """Workers that found it were started again and again by Ray Train (and a run wrote step-0 checkpoints)."""
    path, coco = annotations_with(shapes, tmp_path, change)
    out = tmp_path / "run"
    argv = ["train", "--images", shapes.images, "--annotations", path, "--output", str(out)]
    started = time.monotonic()
    err = refusal([*argv, "--iterations", "2"], capsys)
    n = len(coco["annotations"])
    assert err == (
        f"batchseg: error: {path}: no image has an instance to train on ({n} of {n} annotations dropped "
        f"({n} {reason}); 2 images without instances left out of training)"
    )
    assert not out.exists()
    assert time.monotonic() - started < 10


def test_train_refuses_an_image_folder_without_an_image_to_read_before_ray_starts(
    shapes: SynthDataset, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["train", "--annotations", shapes.annotations, "--output", str(out), "--iterations", "2"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refusal([*argv, "--images", str(empty)], capsys) == (
        f"batchseg: error: none of the 2 images with instances of {shapes.annotations} is under --images "
        f"{empty} (the first: {empty}/img-000000.jpg)"
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "img-000000.jpg").write_bytes(b"not a JPEG")
    (broken / "img-000001.jpg").write_bytes(b"")
    err = refusal([*argv, "--images", str(broken)], capsys)
    assert err.startswith(
        f"batchseg: error: none of the first 2 images with instances of {shapes.annotations} can be read "
        "(the first: "
    ), err
    assert not out.exists()


def test_train_refuses_a_parquet_training_set_without_a_row_or_an_image_to_learn_from_before_ray_starts(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    provenance = {"categories": ["__background__", "thing"]}
    errors = tmp_path / "errors.parquet"
    errors.write_bytes(to_parquet([error_row("1", "x.jpg", ImageError("not_found", "gone"))], provenance))

    def refused(parquet: pathlib.Path) -> str:
        argv = ["train", "--output", str(out), "--iterations", "2", "--annotations", str(parquet)]
        assert main(argv) == 2
        said = capsys.readouterr().err.splitlines()  # an info line first: it reads a foreign Parquet's rows
        assert [line for line in said if " error: " in line] == said[-1:], said
        return said[-1]

    assert refused(errors) == (
        f"batchseg: error: {errors}: no image has an instance to train on (no ok row has an instance with a mask)"
    )
    missing = tmp_path / "missing.parquet"
    instance = {"category_id": 1, "category": "thing", "score": 1.0, "rle": "52", "bbox": None, "area": 4}
    row = ok_row("1", str(tmp_path / "gone.jpg"), 2, 2, [instance | {"keypoints": None}])
    missing.write_bytes(to_parquet([row], provenance))
    err = refused(missing)
    assert err.startswith(
        f"batchseg: error: none of the first 1 images with instances of {missing} can be read (the first: "
        "not_found: "
    ), err
    assert not out.exists()


def test_train_refuses_an_image_id_given_twice(
    shapes: SynthDataset, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """pycocotools keeps the last image of an id: the first would train on the masks of the other."""
    path, _ = annotations_with(
        shapes, tmp_path, lambda coco: coco["images"].append(coco["images"][0] | {"file_name": "other.jpg"})
    )
    out = tmp_path / "run"
    argv = ["train", "--images", shapes.images, "--annotations", path, "--output", str(out), "--epochs", "1"]
    said = (
        f"batchseg: error: {path}: image id 1 is given to two images in 'images' (the second: 'other.jpg'); "
        "each image needs its own id"
    )
    assert refusal(argv, capsys) == said
    validation = ["--validation-images", shapes.images, "--validation-annotations", path]
    argv[argv.index(path)] = shapes.annotations
    assert refusal([*argv, *validation], capsys) == said  # the workers found it, run after run
    assert not out.exists()


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"min_size": 0}, "--min-size"),
        ({"max_size": 1}, "--max-size"),
        ({"cpus_per_actor": float("nan")}, "--cpus-per-actor"),
        ({"max_attempts": 0}, "--max-attempts"),
    ],
)
def test_the_python_api_gets_the_same_checks(
    shapes: SynthDataset, tmp_path: pathlib.Path, changes: dict[str, Any], option: str
) -> None:
    out = tmp_path / "out"
    config = SegmentConfig(shapes.manifest, str(out), model="maskrcnn_small", weights="none", **changes)
    with pytest.raises(BatchsegError, match=option):
        driver.run_segment(config)
    assert not out.exists()
    run = trainer.TrainConfig(
        images=shapes.images,
        annotations=shapes.annotations,
        output=str(tmp_path / "run"),
        iterations=1,
        epochs=1,
    )
    with pytest.raises(BatchsegError, match=r"give --iterations or --epochs \(exactly one\)"):
        trainer.run_training(run)
    assert not (tmp_path / "run").exists()


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("command", ["segment", "train"])
def test_readme_tables_every_option_with_its_real_default(command: str) -> None:
    """README's option tables are the declarations themselves: every option, its default, its help."""
    config = {"segment": SegmentConfig, "train": trainer.TrainConfig}[command]
    text = README.read_text()
    start = text.index(f"<!-- options: {command} ")
    block = text[text.index("\n", start) + 1 : text.index("\n<!-- end options -->", start)]
    table = options.markdown_table(config)
    assert block == table, f"README's {command} options are out of date; the table should read:\n{table}"
    for f, _ in options.declared(config):  # each with its real default, as a reader sees it
        row = next(line for line in block.splitlines() if line.startswith(f"| `{options.flag(f.name)}` |"))
        default = options.default_of(f)
        if isinstance(default, (int, float, str)) and not isinstance(default, bool):
            assert f"| `{default}` |" in row, row


def test_what_readmes_prose_calls_a_default_is_one() -> None:
    defaults: dict[str, set[str | None]] = {}
    for config in (SegmentConfig, trainer.TrainConfig):
        for f, opt in options.declared(config):
            defaults.setdefault(options.flag(f.name), set()).add(options.shown_default(f, opt))
    said = re.findall(r"`(--[a-z-]+) ([^`]+)` \((?:the )?default\)", README.read_text())
    assert said, "README's prose names no default any more: this test can go"
    for name, value in said:
        assert value in defaults[name], f"README calls {name} {value} the default"


@pytest.mark.parametrize(
    ("command", "required"),
    [
        ("segment", ["--manifest", "m.csv", "--output", "out"]),
        ("train", ["--images", "i", "--annotations", "a.json", "--output", "run", "--epochs", "1"]),
    ],
)
def test_the_command_lines_defaults_are_the_python_apis(command: str, required: list[str]) -> None:
    from batchseg.cli import build_parser

    config = {"segment": SegmentConfig, "train": trainer.TrainConfig}[command]
    parsed = options.from_args(config, build_parser().parse_args([command, *required]))
    values = {
        k.removeprefix("--").replace("-", "_"): v for k, v in zip(required[::2], required[1::2], strict=True)
    }
    assert parsed == config(**{k: int(v) if k == "epochs" else v for k, v in values.items()})


def test_help_shows_each_default_from_its_declaration(capsys: pytest.CaptureFixture[str]) -> None:
    from batchseg.cli import main

    for command, config in (("segment", SegmentConfig), ("train", trainer.TrainConfig)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for f, opt in options.declared(config):
            assert options.flag(f.name) in shown
            default = options.shown_default(f, opt)
            if default is not None:
                assert f"(default: {' '.join(default.split())})" in shown, f.name


def test_the_old_name_of_decode_device_is_still_taken(shapes: SynthDataset, tmp_path: pathlib.Path) -> None:
    for name in ("device", "torchvision"):
        options.check(SegmentConfig(shapes.manifest, str(tmp_path), decode=name))
    with pytest.raises(
        BatchsegError, match="--decode must be one of auto, pil, device, torchvision, not 'gpu'"
    ):
        options.check(SegmentConfig(shapes.manifest, str(tmp_path), decode="gpu"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"score_threshold": "0.5"}, "--score-threshold has the wrong type: '0.5'"),
        ({"weights": None}, "--weights must be given, not None"),
        ({"weights": 5}, "--weights has the wrong type: 5"),
        ({"actors": (2, 1)}, "--actors must be N or MIN,MAX with 1 <= MIN <= MAX, not 2,1"),
        ({"keep_columns": ("status",)}, "--keep-columns: status clash with batchseg's own columns"),
        ({"keep_columns": ("Score", "a", "A")}, "--keep-columns: Score clash with batchseg's own columns"),
        ({"keep_columns": ("Score", "a", "A")}, "and a, A clash with each other, ignoring case"),
    ],
)
def test_the_python_api_refuses_wrong_types_and_values_in_one_line(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(BatchsegError, match=re.escape(message)):
        options.check(SegmentConfig("m.csv", "out", **changes))
