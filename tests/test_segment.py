"""The segmentation job end to end on real Ray with a real torchvision Mask R-CNN."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pycocotools.mask as coco_mask
import pytest
import torch

from batchseg.analysis.results import open_results
from batchseg.cli import RERUN_RESUMES, main
from batchseg.demo import SHAPES_MODEL
from batchseg.errors import BatchsegError
from batchseg.format.output import DONE_DIR, JOB_FILE, LEASE_FILE
from batchseg.format.records import read_provenance, to_table
from batchseg.inference.models import build_model, load_state_dict, resolve_weights
from batchseg.io.images import decode_image
from batchseg.io.manifest import default_image_id, iter_shards
from batchseg.segment.driver import run_segment
from batchseg.segment.job import SegmentConfig, prepare_job, record_device
from batchseg.segment.processor import ShardProcessor
from batchseg.train.synth import write_dataset
from tests.imagefiles import BOMB_TEST_MAX_PIXELS, EXPECTED_SIZES, write_bad_files
from tests.processes import ray_worker_pids, wait_for
from tests.segmenting import assert_same_rows

# The shipped small model (a real torchvision Mask R-CNN, trained on the shapes these tests segment): it
# finds instances, at a twelfth of ResNet-50's time an image. ResNet-50 itself is checked once, without Ray
# (test_resnet50_masks_equal_torchvisions_own_postprocess).
SMALL_MODEL = {
    "weights": str(SHAPES_MODEL),
    "min_size": 128,
    "max_size": 192,
    "max_pixels": BOMB_TEST_MAX_PIXELS,
}
RESNET50 = {
    "model": "maskrcnn_resnet50_fpn",
    "weights": "none",  # random, seeded: still a real ResNet-50 whose masks torchvision must agree with
    "min_size": 128,
    "max_size": 192,
    "max_instances": 6,
    "max_pixels": BOMB_TEST_MAX_PIXELS,
}


def archive(root: pathlib.Path, images: int, bad: bool) -> tuple[str, list[str], dict[str, str | None]]:
    """Shape images (plus every kind of bad file, plus a missing object) and a manifest naming them all."""
    uris = write_dataset(str(root / "shapes"), images, seed=1, size=96).uris
    expected: dict[str, str | None] = dict.fromkeys(uris)
    if bad:
        for name, kind in write_bad_files(root / "bad").items():
            expected[str(root / "bad" / name)] = kind
        expected[str(root / "missing.jpg")] = "not_found"
    manifest = root / "manifest.csv"
    manifest.write_text("uri\n" + "".join(f"{u}\n" for u in expected))
    return str(manifest), list(expected), expected


def processed(config: SegmentConfig) -> list[dict[str, Any]]:
    """The rows of the whole manifest as one shard, by the processor each actor holds, without Ray."""
    with prepare_job(config) as job:
        return ShardProcessor.for_job(job).rows(next(iter_shards(job.plan)))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """12 shape images (35 instances), every kind of bad file, a missing one; the small model's rows."""
    root = tmp_path_factory.mktemp("files")
    manifest, uris, expected = archive(root, 12, bad=True)
    config = SegmentConfig(manifest=manifest, output=str(root / "rows"), batch_size=1, **SMALL_MODEL)
    return {"config": config, "uris": uris, "expected": expected, "rows": processed(config)}


@pytest.fixture(scope="module")
def segmented(
    ray_address: str, files: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The same manifest segmented by the job on Ray, in shards of 8."""
    output = tmp_path_factory.mktemp("e2e") / "out"
    config = replace(files["config"], output=str(output), shard_size=8)
    summary = run_segment(config)
    return files | {"config": config, "summary": summary, "table": open_results(config.output).to_table()}


def test_one_row_per_manifest_row_in_order(segmented: dict[str, Any]) -> None:
    table = segmented["table"]
    assert table.column("uri").to_pylist() == segmented["uris"]
    assert table.column("image_id").to_pylist() == [default_image_id(u) for u in segmented["uris"]]
    # Across its shards and actors, the job's rows are those of the processor alone.
    assert_same_rows(table.to_pylist(), to_table(segmented["rows"]).to_pylist())


def test_every_row_has_the_right_status_and_error(files: dict[str, Any]) -> None:
    for row in files["rows"]:
        kind = files["expected"][row["uri"]]
        if kind is None:
            assert (row["status"], row["error"]) == ("ok", None)
            assert isinstance(row["instances"], list)
            name = os.path.basename(row["uri"])
            if name in EXPECTED_SIZES:
                assert (row["width"], row["height"]) == EXPECTED_SIZES[name]
        else:
            assert row["status"] == "error"
            assert row["error"].startswith(f"{kind}: ") and len(row["error"]) > len(kind) + 10
            assert row["instances"] is None


def assert_masks_equal_torchvisions(rows: list[dict[str, Any]], config: SegmentConfig) -> None:
    """Each instance's RLE decodes (with pycocotools) to exactly the mask torchvision pastes and thresholds."""
    weights = resolve_weights(config.weights, config.model)
    model = build_model(
        weights,
        load_state_dict(weights),  # the checkpoint's, or random (seeded) for weights "none"
        min_size=config.min_size,
        max_size=config.max_size,
        box_score_thresh=config.score_threshold,
        box_detections_per_img=config.max_instances,
    )
    checked = 0
    for row in rows:
        if row["status"] != "ok":
            continue
        pixels = decode_image(pathlib.Path(row["uri"]).read_bytes())
        assert pixels.shape == (row["height"], row["width"], 3)
        with torch.inference_mode():
            out = model([torch.from_numpy(pixels).permute(2, 0, 1).float() / 255])[0]
        masks = (out["masks"][:, 0] > config.mask_threshold).numpy()
        assert len(row["instances"]) == len(masks)
        for instance, mask, box, score in zip(
            row["instances"], masks, out["boxes"], out["scores"], strict=True
        ):
            rle = {"size": [row["height"], row["width"]], "counts": instance["rle"]}
            np.testing.assert_array_equal(coco_mask.decode(rle), mask.astype(np.uint8))
            assert (
                instance["rle"]
                == coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
            )
            assert instance["area"] == int(mask.sum())
            x1, y1, x2, y2 = box.tolist()
            np.testing.assert_allclose(instance["bbox"], [x1, y1, x2 - x1, y2 - y1], rtol=1e-5, atol=1e-3)
            assert instance["score"] == pytest.approx(float(score), rel=1e-5)
            assert instance["category"] == weights.categories[instance["category_id"]]
            checked += 1
    assert checked > 20  # the test means something only if the model found instances


def test_masks_equal_torchvisions_own_postprocess(segmented: dict[str, Any]) -> None:
    """The job's rows (the small model's, on Ray)."""
    assert_masks_equal_torchvisions(segmented["table"].to_pylist(), segmented["config"])


def test_resnet50_masks_equal_torchvisions_own_postprocess(tmp_path: pathlib.Path) -> None:
    """torchvision's ResNet-50 Mask R-CNN through the processor (what each actor runs), without Ray."""
    manifest, _, _ = archive(tmp_path, 6, bad=False)  # 25 instances with these random weights
    config = SegmentConfig(manifest=manifest, output=str(tmp_path / "out"), batch_size=1, **RESNET50)
    assert_masks_equal_torchvisions(processed(config), config)


def test_jpegs_decoded_in_batches_by_torchvision_give_the_same_rows(files: dict[str, Any]) -> None:
    """The GPU path's decoder (``decode_jpeg`` on the model's device; here the CPU) with EXIF applied on
    tensors, and PIL for what it cannot take (CMYK, PNG, GIF, broken files), changes nothing in the rows."""
    config = files["config"]
    assert config.decode == "auto"  # on the CPU: PIL
    # Another output: the decoder is a setting of an output, and a rerun with another is refused.
    on_device = replace(config, decode="torchvision", output=config.output + "-device")
    assert processed(on_device) == files["rows"]


def test_encoding_masks_in_a_background_thread_gives_the_same_rows(tmp_path: pathlib.Path) -> None:
    """The GPU path overlaps a batch's mask encoding with the next batch; here on the CPU, no Ray."""
    manifest, _, _ = archive(tmp_path, 6, bad=False)
    tables = []
    for name, threaded in (("sync", False), ("overlap", True)):
        config = SegmentConfig(manifest=manifest, output=str(tmp_path / name), batch_size=2, **SMALL_MODEL)
        with prepare_job(config) as job:
            processor = ShardProcessor.for_job(job)
        if threaded:
            processor.encoder = ThreadPoolExecutor(1)
        record = processor.process(next(iter_shards(job.plan)))
        assert record.rows == 6
        tables.append(open_results(str(tmp_path / name)).to_table().drop_columns([]).to_pylist())
    assert tables[0] == tables[1]


def test_summary_and_provenance(segmented: dict[str, Any]) -> None:
    config, summary = segmented["config"], segmented["summary"]
    kinds = [k for k in segmented["expected"].values() if k]
    assert summary["status"] == "complete"
    assert summary["images"] == summary["manifest_rows"] == len(segmented["uris"])
    assert summary["error"] == len(kinds)
    assert summary["ok"] == len(segmented["uris"]) - len(kinds)
    assert summary["errors_by_kind"] == {k: kinds.count(k) for k in set(kinds)}
    assert summary["instances"] == sum(
        len(r or []) for r in segmented["table"].column("instances").to_pylist()
    )
    assert summary["shards_done"] == summary["shards_total"] == 4  # 28 rows in shards of 8
    on_disk = json.loads((pathlib.Path(config.output) / "_summary.json").read_text())
    assert on_disk["images"] == summary["images"]
    files = sorted(pathlib.Path(config.output).glob("part-*.parquet"))
    assert [f.name for f in files] == [f"part-{i:06d}.parquet" for i in range(4)]
    provenance = read_provenance(pq.read_schema(files[0]))
    assert provenance["model"] == "maskrcnn_small"  # the model the checkpoint names
    assert provenance["weights"] == resolve_weights(config.weights).identity
    assert provenance["weights"].startswith("sha256:")
    assert (provenance["score_threshold"], provenance["min_size"], provenance["shard"]) == (0.5, 128, 0)
    assert provenance["batchseg_version"]


def test_rerun_skips_everything_and_other_settings_are_refused(segmented: dict[str, Any]) -> None:
    config = segmented["config"]
    before = {p: p.stat().st_mtime_ns for p in pathlib.Path(config.output).glob("part-*.parquet")}
    summary = run_segment(config)
    assert (summary["images_this_run"], summary["shards_skipped"], summary["status"]) == (0, 4, "complete")
    assert {p: p.stat().st_mtime_ns for p in before} == before
    with pytest.raises(BatchsegError, match=r"other settings \(score_threshold: 0.5 -> 0.7\).*--overwrite"):
        run_segment(replace(config, score_threshold=0.7))
    recorded = json.loads((pathlib.Path(config.output) / "_batchseg_job.json").read_text())
    assert (recorded["precision"], recorded["decode"], recorded["device"]) == ("auto", "auto", "cpu")


def test_a_rerun_on_another_device_kind_is_refused_before_any_shard_is_written(
    ray_address: str, tmp_path: pathlib.Path
) -> None:
    manifest, _, _ = archive(tmp_path, 2, bad=False)
    config = SegmentConfig(manifest=manifest, output=str(tmp_path / "out"), shard_size=1, **SMALL_MODEL)
    with prepare_job(config) as job:
        record_device(job, "cuda")  # as a run on GPUs records it, before its first shard
    with pytest.raises(BatchsegError, match=r"other settings \(device: 'cuda' -> 'cpu'\).*--overwrite"):
        run_segment(config)  # this cluster has no GPU
    assert not list((tmp_path / "out").glob("part-*"))


def test_overwrite_starts_over(ray_address: str, tmp_path: pathlib.Path) -> None:
    manifest, uris, _ = archive(tmp_path, 3, bad=False)
    output = tmp_path / "out"
    output.mkdir()
    (output / "part-000009.parquet").write_bytes(b"stale")
    (output / "keep-me.txt").write_text("not ours")
    config = SegmentConfig(manifest=manifest, output=str(output), shard_size=2, **SMALL_MODEL)
    run_segment(config)
    changed = replace(config, score_threshold=0.6, overwrite=True)
    summary = run_segment(changed)
    assert (summary["images_this_run"], summary["shards_skipped"]) == (3, 0)
    assert sorted(p.name for p in output.iterdir()) == [
        "_batchseg_job.json",
        "_done",
        "_summary.json",
        "keep-me.txt",
        "part-000000.parquet",
        "part-000001.parquet",
    ]
    assert open_results(str(output)).to_table().column("uri").to_pylist() == uris


def test_a_shard_deleted_by_hand_is_redone_and_verify_proves_the_output(
    ray_address: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, uris, _ = archive(tmp_path, 5, bad=False)
    config = SegmentConfig(manifest=manifest, output=str(tmp_path / "out"), shard_size=2, **SMALL_MODEL)
    run_segment(config)
    (tmp_path / "out" / "part-000001.parquet").unlink()  # its completion record stays
    assert main(["verify", config.output]) == 1
    assert "part-000001.parquet is missing" in capsys.readouterr().out
    summary = run_segment(config)
    assert (summary["status"], summary["images"], summary["images_this_run"]) == ("complete", 5, 2)
    assert_exactly_once(config, uris)
    assert main(["verify", config.output]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {config.output}: 5 images in 3 shards")


def done_markers(output: pathlib.Path) -> dict[str, bytes]:
    return (
        {p.name: p.read_bytes() for p in (output / DONE_DIR).glob("*.json")}
        if (output / DONE_DIR).exists()
        else {}
    )


def assert_exactly_once(config: SegmentConfig, uris: list[str]) -> None:
    table = open_results(config.output).to_table()
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(uris)
    assert sorted(ids) == sorted(default_image_id(u) for u in uris)
    assert set(table.column("status").to_pylist()) == {"ok"}


@pytest.mark.slow
def test_sigkill_then_rerun_is_exactly_once_and_redoes_only_unfinished_shards(
    ray_address: str, tmp_path: pathlib.Path
) -> None:
    # 20 shards: the small model does one in a tenth of a second, and the kill must land mid-job.
    manifest, uris, _ = archive(tmp_path, 60, bad=False)
    output = tmp_path / "out"
    config = SegmentConfig(manifest=manifest, output=str(output), shard_size=3, batch_size=3, **SMALL_MODEL)
    args = [sys.executable, "-m", "batchseg.cli", "segment", "--manifest", manifest, "--output", str(output),
            "--shard-size", "3", "--batch-size", "3", "--address", ray_address]  # fmt: skip
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_MODEL.items()]
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(done_markers(output)) >= 2, 180, "two finished shards")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    first = done_markers(output)
    assert 2 <= len(first) < 20, "the kill should land mid-job"
    summary = run_segment(config)
    assert summary["status"] == "complete"
    assert summary["shards_skipped"] >= len(first)
    assert summary["shards_this_run"] == 20 - summary["shards_skipped"]
    after = done_markers(output)
    assert {k: after[k] for k in first} == first, "finished shards were not redone"
    assert_exactly_once(config, uris)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "ray"),
    [(signal.SIGTERM, "session"), (signal.SIGHUP, "session"), (signal.SIGTERM, "own")],
    ids=["term", "hup", "term-own-ray"],
)
def test_sigterm_or_sighup_stops_as_ctrl_c_does_and_a_rerun_finishes(
    ray_address: str, tmp_path: pathlib.Path, signum: int, ray: str
) -> None:
    """Kubernetes sends SIGTERM, a closed ssh session SIGHUP: one line, exit 128 + the signal, no Ray stack
    dump, on a Ray the job joined or one it started (``--address local``: ray.init's C++ handler is the one
    put back), the lease released; the rerun does the rest. (While Ray starts: the test below.)"""
    manifest, uris, _ = archive(tmp_path, 60, bad=False)
    output = tmp_path / "out"
    config = SegmentConfig(manifest=manifest, output=str(output), shard_size=3, batch_size=3, **SMALL_MODEL)
    args = [sys.executable, "-m", "batchseg.cli", "segment", "--manifest", manifest, "--output", str(output),
            "--shard-size", "3", "--batch-size", "3", "--address", ray_address if ray == "session" else "local"]  # fmt: skip
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_MODEL.items()]
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as err:
        driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: done_markers(output), 180, "a finished shard")
        finally:
            driver.send_signal(signum)
            code = driver.wait(timeout=60)
    lines = stderr.read_text().splitlines()
    name = signal.Signals(signum).name
    said = [line for line in lines if name in line]
    assert said == [f"batchseg: stopped by {name}; {RERUN_RESUMES}"], lines
    assert code == 128 + signum, lines
    assert not [line for line in lines if "Traceback" in line or "received at" in line], lines
    assert len(done_markers(output)) < 20, "the signal should land mid-job"
    assert not (output / LEASE_FILE).exists(), "the stopped job keeps the output from a rerun"
    assert run_segment(config)["status"] == "complete"
    assert_exactly_once(config, uris)


# The CLI with a signal ($SIGNAL) sent to itself inside ray.init, as Ray builds its state accessor (where a
# loaded machine once caught a SIGHUP): Python runs the handler as that constructor returns.
SIGNAL_IN_RAY_INIT = """
import os, signal, sys
import ray._private.state as state
import batchseg.cli
from batchseg.cli import main
if os.environ.get("DEFAULT_HANDLERS"):  # as a program using batchseg's library may have them
    batchseg.cli.stop_on_signals = lambda: None
made = state.GlobalStateAccessor
sent = []
def accessor(*args):
    built = made(*args)
    if not sent:
        sent.append(os.kill(os.getpid(), int(os.environ["SIGNAL"])))
    return built
state.GlobalStateAccessor = accessor
sys.exit(main(sys.argv[1:]))
"""


def signal_in_ray_init(
    ray_address: str, tmp_path: pathlib.Path, signum: int, **env: str
) -> subprocess.CompletedProcess[str]:
    """A small job run by the CLI (:data:`SIGNAL_IN_RAY_INIT`), sent ``signum`` while Ray starts."""
    manifest, _, _ = archive(tmp_path, 6, bad=False)
    args = [sys.executable, "-c", SIGNAL_IN_RAY_INIT, "segment", "--manifest", manifest, "--output", str(tmp_path / "out"),
            "--shard-size", "3", "--address", ray_address, *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL_MODEL.items())]  # fmt: skip
    env = os.environ | env | {"SIGNAL": str(int(signum))}
    here = pathlib.Path(__file__).parents[1]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=here, env=env)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT], ids=["hup", "term", "int"])
def test_a_signal_while_ray_starts_is_held_until_it_has_started_then_stops_the_job(
    ray_address: str, tmp_path: pathlib.Path, signum: int
) -> None:
    """Raised inside ray.init, the signal's exception left Ray's state accessor half made and the process
    hung destroying it (the driver outlived SIGHUP by minutes). Held until ray.init returns, it stops the
    job as Ctrl-C does: one line, exit 128 + the signal, nothing written but the job file (the lease
    released)."""
    proc = signal_in_ray_init(ray_address, tmp_path, signum)
    lines = proc.stderr.splitlines()
    how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    assert [line for line in lines if how in line] == [f"batchseg: {how}; {RERUN_RESUMES}"], lines
    assert proc.returncode == 128 + signum, lines
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [JOB_FILE]  # the lease released


def test_a_signal_held_while_ray_starts_then_does_what_its_handler_from_before_does(
    ray_address: str, tmp_path: pathlib.Path
) -> None:
    """A program using batchseg's library, with SIGTERM's default handler: the held SIGTERM ends it as that
    handler does (killed by the signal), once Ray has started, rather than hanging it or becoming a stop."""
    proc = signal_in_ray_init(ray_address, tmp_path, signal.SIGTERM, DEFAULT_HANDLERS="1")
    assert proc.returncode == -signal.SIGTERM, proc.stderr


SHUT_DOWN_THEN_SIGTERM = """
import signal
from batchseg.errors import Stopped, stop_on_signals
from batchseg.segment.driver import init_ray, shutdown_ray
stop_on_signals()
init_ray("local")
shutdown_ray()
try:
    signal.raise_signal(signal.SIGTERM)
except Stopped:
    print("stopped")
"""


def test_shutting_ray_down_keeps_the_stop_signals_handlers() -> None:
    """ray.shutdown() leaves SIGTERM's default behind it: a second SIGTERM while a stopped job cleaned up
    (train removing its unregistered checkpoints) would have ended it without a word."""
    proc = subprocess.run(
        [sys.executable, "-c", SHUT_DOWN_THEN_SIGTERM], capture_output=True, text=True, timeout=90
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "stopped"), proc.stderr[-2000:]


def write_manifest(path: pathlib.Path, uris: list[str]) -> str:
    path.write_text("".join(f"{u}\n" for u in uris))
    return str(path)


@pytest.mark.slow
def test_grow_sigkill_grow_rerun_keeps_unchanged_shards_and_every_row_exactly_once(
    ray_address: str, tmp_path: pathlib.Path
) -> None:
    """An archive that grows: each rerun keeps the finished shards whose rows are unchanged and redoes or
    adds the others, through a SIGKILL mid-run and a row inserted in the middle."""
    _, uris, _ = archive(tmp_path, 61, bad=False)
    output = tmp_path / "out"
    manifest = tmp_path / "manifest.txt"
    config = SegmentConfig(manifest=write_manifest(manifest, uris[:13]), output=str(output), shard_size=3,
                           batch_size=3, **SMALL_MODEL)  # fmt: skip
    first = run_segment(config)  # shards of 3, 3, 3, 3, 1
    assert (first["shards_new"], first["shards_kept"], first["images"]) == (5, 0, 13)
    markers = done_markers(output)

    # Grown at the end to 60 rows (20 shards): 4 kept, the short last one redone, 15 new; killed mid-run.
    write_manifest(manifest, uris[:60])
    args = [sys.executable, "-m", "batchseg.cli", "segment", "--manifest", str(manifest), "--output", str(output),
            "--shard-size", "3", "--batch-size", "3", "--address", ray_address]  # fmt: skip
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_MODEL.items()]
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for(lambda: len(done_markers(output)) >= 6, 180, "two shards of the grown manifest")
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    assert (
        "60 images in 20 shards of up to 3: 4 kept, 1 redone, 15 new; 16 to do"
        in (tmp_path / "driver.log").read_text()
    )
    killed = done_markers(output)
    assert 6 <= len(killed) < 20, "the kill should land mid-job"
    unchanged = [f"part-{i:06d}.json" for i in range(4)]
    assert [killed[k] for k in unchanged] == [markers[k] for k in unchanged], "unchanged shards were redone"

    # A row inserted after row 7: shards 0 and 1 stay, 2 to 19 changed (those the killed run finished are
    # redone), 20 is new.
    grown = [*uris[:7], uris[60], *uris[7:60]]
    summary = run_segment(replace(config, manifest=write_manifest(manifest, grown)))
    assert summary["status"] == "complete"
    assert (summary["shards_kept"], summary["shards_removed"], summary["shards_total"]) == (2, 0, 21)
    assert summary["shards_redone"] == len(killed) - 2
    assert summary["shards_new"] == 21 - len(killed)
    assert [done_markers(output)[k] for k in unchanged[:2]] == [markers[k] for k in unchanged[:2]]
    assert_exactly_once(replace(config, manifest=str(manifest)), grown)
    assert open_results(str(output)).to_table().column("uri").to_pylist() == grown
    assert main(["verify", str(output)]) == 0


@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_replaced_and_its_shard_redone(
    ray_address: str, tmp_path: pathlib.Path
) -> None:
    manifest, uris, _ = archive(tmp_path, 45, bad=False)  # 15 shards: the kill must land mid-job
    output = tmp_path / "out"
    config = SegmentConfig(
        manifest=manifest,
        output=str(output),
        shard_size=3,
        batch_size=1,
        actors=(1, 2),
        cpus_per_actor=1,
        **SMALL_MODEL,
    )
    result: dict[str, Any] = {}
    job = threading.Thread(target=lambda: result.update(run_segment(config)))
    job.start()
    try:
        wait_for(
            lambda: len(done_markers(output)) >= 1 and ray_worker_pids("SegmentationActor"),
            180,
            "a running actor",
        )
        for pid in ray_worker_pids("SegmentationActor"):
            os.kill(pid, signal.SIGKILL)
    finally:
        job.join(timeout=300)
    assert result["status"] == "complete"
    assert result["retries"] >= 1
    assert_exactly_once(config, uris)


def test_a_shard_that_keeps_failing_is_reported_and_a_rerun_finishes_it(
    ray_address: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, uris, _ = archive(tmp_path, 4, bad=False)
    output = tmp_path / "out"
    (output / "part-000001.parquet").mkdir(parents=True)  # a folder in the way: every write of shard 1 fails
    config = SegmentConfig(manifest=manifest, output=str(output), shard_size=2, max_attempts=2, **SMALL_MODEL)
    summary = run_segment(config)
    assert summary["status"] == "incomplete"
    assert [f["shard"] for f in summary["shards_failed"]] == [1]
    assert "IsADirectoryError" in summary["shards_failed"][0]["error"]
    assert (summary["retries"], summary["shards_done"], summary["images"]) == (2, 1, 2)
    # The counts reach summary.json. Whether the lone actor failed twice *in a row* (and was replaced)
    # depends on whether shard 0, which it runs beside shard 1, finished between the two failures:
    # tests/test_scheduling.py tests the replacement itself.
    on_disk = json.loads((output / "_summary.json").read_text())
    assert (on_disk["shard_failures"], on_disk["actors_lost"]) == (2, 0)
    assert on_disk["actors_replaced"] == summary["actors_replaced"] in (0, 1)
    assert "shard 1 failed 2 times; giving up on it" in capsys.readouterr().err
    (output / "part-000001.parquet").rmdir()
    summary = run_segment(config)
    assert (summary["status"], summary["shards_this_run"], summary["shards_skipped"]) == ("complete", 1, 1)
    assert_exactly_once(config, uris)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_manifest", "manifest .*nope.csv does not exist"),
        ("no_uri_column", "has no 'uri' column"),
        ("unwritable_output", "cannot use output .*file/out: NotADirectoryError"),
        ("offline_default_weights", "cannot download .* pass --weights PATH_OR_URI"),
        ("bad_threshold", "--score-threshold must be in"),
        ("no_prefetch", "--prefetch must be at least 1, not 0"),
        ("no_io_threads", "--io-threads must be at least 1, not -2"),
        ("no_read_timeout", "--read-timeout must be positive seconds, not 0.0"),
        ("endless_connect_timeout", "--connect-timeout must be positive seconds, not nan"),
    ],
)
def test_job_level_problems_fail_early_with_one_line(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    from batchseg.cli import main

    manifest, _, _ = archive(tmp_path, 1, bad=False)
    args = {"--manifest": manifest, "--output": str(tmp_path / "out"), "--weights": "none"}
    if case == "missing_manifest":
        args["--manifest"] = str(tmp_path / "nope.csv")
    elif case == "no_uri_column":
        (tmp_path / "m.csv").write_text("path\na.jpg\n")
        args["--manifest"] = str(tmp_path / "m.csv")
    elif case == "unwritable_output":
        (tmp_path / "file").write_text("a file, not a folder")
        args["--output"] = str(tmp_path / "file" / "out")
    elif case == "offline_default_weights":
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
        args["--weights"] = "DEFAULT"
    elif case == "bad_threshold":
        args["--score-threshold"] = "1.5"
    elif case == "no_prefetch":
        args["--prefetch"] = "0"
    elif case == "no_io_threads":
        args["--io-threads"] = "-2"
    elif case == "no_read_timeout":
        args["--read-timeout"] = "0"
    elif case == "endless_connect_timeout":
        args["--connect-timeout"] = "nan"
    code = main(["segment", *[x for pair in args.items() for x in pair]])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("batchseg: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "_done").exists()


def test_cli_error_has_no_traceback(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchseg.cli",
            "segment",
            "--manifest",
            str(tmp_path / "x.csv"),
            "--output",
            "o",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"batchseg: error: manifest {tmp_path / 'x.csv'} does not exist"


def test_unknown_model_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from batchseg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--manifest", "m.csv", "--output", "o", "--model", "resnet9000"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'resnet9000'" in capsys.readouterr().err


def test_an_interrupted_run_leaves_no_actor_alive(
    ray_address: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a process whose Ray lives on (a notebook, this test session), a run stopped by Ctrl-C (or any
    error) kills its actors, giving their CPUs and GPUs back."""
    import ray

    manifest, _, _ = archive(tmp_path, 6, bad=False)
    config = SegmentConfig(manifest=manifest, output=str(tmp_path / "out"), shard_size=2, **SMALL_MODEL)
    cpus = ray.cluster_resources()["CPU"]
    wait = ray.wait

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        ready, rest = wait(*args, **kwargs)
        if ready:  # an actor has started (or finished a shard): the user presses Ctrl-C
            raise KeyboardInterrupt
        return ready, rest

    monkeypatch.setattr(ray, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_segment(config)
    monkeypatch.undo()
    assert stopped.traceback  # still held, as a notebook holds it: the actors must not rely on its end
    wait_for(lambda: not ray_worker_pids("SegmentationActor"), 30, "the job's actors to end")
    wait_for(lambda: ray.available_resources().get("CPU") == cpus, 30, "every CPU to be free again")


@pytest.mark.parametrize("how", ["--verbose", "BATCHSEG_DEBUG=1"])
def test_verbose_shows_the_cause_behind_the_one_line_error(tmp_path: pathlib.Path, how: str) -> None:
    manifest, _, _ = archive(tmp_path, 1, bad=False)
    (tmp_path / "file").write_text("a file, not a folder")
    args = [
        "segment",
        "--manifest",
        manifest,
        "--output",
        str(tmp_path / "file" / "out"),
        "--weights",
        "none",
    ]
    env = os.environ | ({"BATCHSEG_DEBUG": "1"} if how.startswith("BATCHSEG") else {})
    verbose = ["--verbose"] if how == "--verbose" else []
    proc = subprocess.run(
        [sys.executable, "-m", "batchseg.cli", *args, *verbose], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(
        f"batchseg: error: cannot use output {tmp_path / 'file' / 'out'}: NotADirectoryError"
    )
    assert lines[0] == "Traceback (most recent call last):"
    assert "The above exception was the direct cause of the following exception:" in proc.stderr
    assert "batchseg.errors.BatchsegError" in proc.stderr


# Before they were refused, a FIFO's read waited for a writer forever: the suite's timeout ends that.
def test_fifos_and_sockets_in_a_folder_manifest_are_read_error_rows(
    ray_address: str, tmp_path: pathlib.Path
) -> None:
    images = tmp_path / "archive" / "images"
    uris = write_dataset(str(tmp_path / "archive"), 4, seed=2, size=64).uris
    os.mkfifo(images / "pipe.jpg")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(images / "sock.png"))
        config = SegmentConfig(manifest=str(images), output=str(tmp_path / "out"), weights=str(SHAPES_MODEL))
        summary = run_segment(config)
    rows = {r["uri"]: r for r in open_results(config.output).to_table().to_pylist()}
    assert (
        rows.pop(str(images / "pipe.jpg"))["error"]
        == f"read_error: {images / 'pipe.jpg'} is a FIFO, not an image file"
    )
    assert (
        rows.pop(str(images / "sock.png"))["error"]
        == f"read_error: {images / 'sock.png'} is a socket, not an image file"
    )
    assert sorted(rows) == uris and all(r["status"] == "ok" for r in rows.values())
    assert (summary["status"], summary["ok"], summary["errors_by_kind"]) == ("complete", 4, {"read_error": 2})


def first_actor_fails(monkeypatch: pytest.MonkeyPatch, claim: pathlib.Path, detect: Any) -> None:
    """The job's actors as the driver starts them, but the first to claim ``claim`` (a file made with
    O_EXCL) runs ``detect`` for its predictor's, in its own process only: a GPU with a fault."""
    import ray

    from batchseg.segment import driver

    actor = driver.SegmentationActor

    class FirstActorFails(actor.__ray_actor_class__):  # type: ignore[name-defined,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL))
                self.processor.predictor.detect = detect

    groups = actor.__ray_metadata__.concurrency_groups
    monkeypatch.setattr(driver, "SegmentationActor", ray.remote(concurrency_groups=groups)(FirstActorFails))


def test_one_actor_whose_gpu_fails_every_forward_pass_costs_no_row(
    ray_address: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One of two actors fails every forward pass as a GPU with a sticky fault does: its shard fails, is
    never recorded, and its process ends, so a fresh one replaces it; the job ends with every row ok,
    exactly once, and no record counts an inference error."""

    def broken(images: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    one_bad_gpu_costs_no_row(tmp_path, monkeypatch, broken, 12, actors=(2, 2), cpus_per_actor=1)


def one_bad_gpu_costs_no_row(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, detect: Any, images: int, **options: Any
) -> None:
    """A job of ``images`` in shards of 2 (with ``options``) whose first actor runs ``detect`` for its
    predictor's: every row ok, exactly once, and the bad actor's process ended."""
    claim = tmp_path / "bad-gpu-claimed"
    first_actor_fails(monkeypatch, claim, detect)
    manifest, uris, _ = archive(tmp_path, images, bad=False)
    config = SegmentConfig(
        manifest=manifest, output=str(tmp_path / "out"), shard_size=2, batch_size=2, **SMALL_MODEL, **options
    )
    summary = run_segment(config)
    assert claim.exists()
    assert_one_bad_actor_cost_no_row(config, uris, summary, shards=images // 2)


def assert_one_bad_actor_cost_no_row(
    config: SegmentConfig, uris: list[str], summary: dict[str, Any], shards: int
) -> None:
    assert (summary["status"], summary["shards_failed"], summary["shards_done"]) == ("complete", [], shards)
    assert summary["retries"] >= 1  # the bad actor's shard, done again elsewhere
    # Its process ended at the first device error (a CUDA context cannot be trusted after one), rather than
    # being replaced for failing shard after shard.
    assert (summary["actors_lost"], summary["actors_replaced"]) == (1, 0)
    assert_exactly_once(config, uris)
    records = [json.loads(marker) for marker in done_markers(pathlib.Path(config.output)).values()]
    assert len(records) == shards and all(r["errors"] == {} and r["ok"] == r["rows"] for r in records)


PASSWORD, SIGNATURE = "pa55word-in-the-url", "5ecret-signature"


@contextlib.contextmanager
def guarded_http(root: pathlib.Path) -> Any:
    """An HTTP server of ``root``'s files that, like a store behind a pre-signed URL, answers only requests
    with the user info ``reader:PASSWORD`` and the query's ``X-Amz-Signature=SIGNATURE``; yields its
    ``http://HOST:PORT``."""
    import base64
    import functools
    import http.server
    import urllib.parse

    allowed = "Basic " + base64.b64encode(f"reader:{PASSWORD}".encode()).decode()

    class Guarded(http.server.SimpleHTTPRequestHandler):
        def send_head(self) -> Any:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            if self.headers.get("Authorization") != allowed or query.get("X-Amz-Signature") != [SIGNATURE]:
                self.send_error(403)
                return None
            return super().send_head()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Guarded, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_credentials_in_the_manifest_and_weights_urls_are_never_written_or_printed(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest and weights read through URLs that carry a password and a signature: the output records
    them (job file, every Parquet footer) and messages name them without either."""
    from tests.segmenting import segment_in_process

    _, uris, _ = archive(tmp_path, 4, bad=False)
    served = tmp_path / "served"
    served.mkdir()
    (served / "m.csv").write_text("uri\n" + "".join(f"{u}\n" for u in uris))
    (served / "model.pt").write_bytes(SHAPES_MODEL.read_bytes())
    query = f"?X-Amz-Date=20261207T000000Z&X-Amz-Credential=AKID%2F{PASSWORD}&X-Amz-Signature={SIGNATURE}"
    output = tmp_path / "out"
    with guarded_http(served) as server:
        signed = server.replace("://", f"://reader:{PASSWORD}@") + "/{}" + query
        config = SegmentConfig(manifest=signed.format("m.csv"), output=str(output), shard_size=2,
                               **(SMALL_MODEL | {"weights": signed.format("model.pt")}))  # fmt: skip
        summary = segment_in_process(config)
        # the same URL with another password: refused, and the message names the URL without its secrets
        wrong = config.manifest.replace(PASSWORD, "not-the-password")
        assert main(["segment", "--manifest", wrong, "--output", str(tmp_path / "other")]) == 2
    assert summary["ok"] == len(uris)
    job = json.loads((output / "_batchseg_job.json").read_text())
    assert job["manifest"] == f"{server.replace('://', '://REDACTED@')}/m.csv?X-Amz-Date=20261207T000000Z" \
        "&X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED"  # fmt: skip
    assert job["weights_uri"] == job["manifest"].replace("/m.csv", "/model.pt")
    footers = [read_provenance(pq.read_schema(p)) for p in sorted(output.glob("part-*.parquet"))]
    assert len(footers) == summary["shards_total"] > 1
    assert all(f["manifest"] == job["manifest"] for f in footers)
    written = [p for p in output.rglob("*") if p.is_file()]
    assert len(written) == 2 + 2 * len(footers)  # the job file, the summary, the shards and their records
    for secret in (PASSWORD, SIGNATURE, "not-the-password"):
        for path in written:
            assert secret.encode() not in path.read_bytes(), path
    out = capsys.readouterr()
    assert "cannot open manifest http://REDACTED@127.0.0.1" in out.err
    for secret in (PASSWORD, SIGNATURE, "not-the-password"):
        assert secret not in out.out + out.err
