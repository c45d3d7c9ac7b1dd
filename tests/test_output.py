"""The output folder's ownership and self-checks, on outputs written through OutputDir itself (no Ray):
batchseg reads, counts and removes only the files it names; a rerun trusts a completion record only when
its object backs it; ``batchseg verify`` proves an output whole."""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchseg.analysis.query import connect
from batchseg.analysis.report import build_report
from batchseg.analysis.results import open_results
from batchseg.cli import main
from batchseg.demo import SHAPES_MODEL
from batchseg.errors import BatchsegError, ImageError
from batchseg.format.output import (
    DONE_DIR,
    JOB_FILE,
    OLD_SUMMARY_FILE,
    SUMMARY_FILE,
    OutputDir,
    ShardRecord,
    is_ours,
    settings_of,
    shard_index,
    shard_object,
    shard_record,
)
from batchseg.format.records import error_row, ok_row, to_parquet
from batchseg.io import atomic
from batchseg.io.manifest import Shard, iter_shards, plan_shards
from batchseg.segment.config import SegmentConfig
from batchseg.segment.job import prepare_job, record_device
from batchseg.segment.processor import ShardProcessor
from batchseg.train.synth import write_dataset
from tests.diskfull import fill_the_disk
from tests.segmenting import segment_in_process

SHARD_SIZE = 4
BOX = {"category_id": 1, "category": "circle", "score": 0.9, "bbox": [1.0, 1.0, 2.0, 2.0], "area": 4}
INSTANCE = BOX | {"rle": "04", "keypoints": None}  # a 2x2 image's 4 pixels: its mask is the whole image

# Names other tools write beside batchseg's: Spark's, a person's notes, a listing of parts.
FOREIGN = [
    "part-00000-c0ffee.snappy.parquet",
    "part-notes.parquet",
    "part-list.parquet.txt",
    "part-1.parquet",
    "part-0000001.parquet",
    "README.md",
    f"{DONE_DIR}/notes.txt",
    f"{DONE_DIR}/part-1.json",
    f"{DONE_DIR}/part-000001.json.bak",
]


def write_output(root: pathlib.Path, images: int = 10) -> dict[str, Any]:
    """A manifest of ``images`` rows and a finished output over it, written as the job writes one."""
    manifest = root / "manifest.txt"
    manifest.write_text("".join(f"{root}/img{i:03d}.png\n" for i in range(images)))
    plan = plan_shards(str(manifest), SHARD_SIZE)
    output = OutputDir(str(root / "out"))
    provenance = {"model": "m", "shard_size": SHARD_SIZE, "manifest": plan.manifest}
    output.prepare(provenance | {"manifest_fingerprint": plan.fingerprint}, False)
    settings = settings_of(provenance)
    ids = []
    for shard in iter_shards(plan):
        rows = [ok_row(i, u, 2, 2, [INSTANCE]) for i, u in zip(shard.image_ids, shard.uris, strict=True)]
        record = ShardRecord.of(shard, rows, attempt=1, seconds=0.5, storage_retries=0, settings=settings)
        output.write_shard(shard, to_parquet(rows, provenance), record)
        ids += shard.image_ids
    return {"manifest": str(manifest), "out": root / "out", "ids": ids, "plan": plan}


def add_foreign_files(out: pathlib.Path) -> None:
    for name in FOREIGN:
        (out / name).parent.mkdir(exist_ok=True)
        if name.endswith(".parquet"):  # another tool's Parquet, with columns of its own
            pq.write_table(pa.table({"image_id": ["x"], "value": [1.5]}), out / name)
        else:
            (out / name).write_text("not batchseg's")


def test_overwrite_removes_batchseg_files_and_nothing_else(tmp_path: pathlib.Path) -> None:
    made = write_output(tmp_path)
    out = made["out"]
    add_foreign_files(out)
    (out / SUMMARY_FILE).write_text("{}")
    (out / OLD_SUMMARY_FILE).write_text("{}")
    (out / "part-000001.parquet.tmp-0123456789abcdef0123456789abcdef").write_bytes(b"a crashed write")
    (out / ".part-000002.parquet.tmp-0123456789abcdef0123456789abcdef").write_bytes(b"a crashed write")
    OutputDir(str(out)).clear()
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == sorted(FOREIGN)


def test_readers_read_only_batchseg_shards(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = write_output(tmp_path)
    out = made["out"]
    add_foreign_files(out)
    results = open_results(str(out))
    assert [pathlib.Path(f).name for f in results.files] == [f"part-{i:06d}.parquet" for i in range(3)]
    assert results.to_table().column("image_id").to_pylist() == made["ids"]
    sql = "SELECT count(*), count(status), sum(len(instances)) FROM images"
    assert connect(str(out)).sql(sql).fetchall() == [(10, 10, 10)]
    report = build_report(str(out), str(tmp_path / "report.html"), gallery=0)
    assert report["table_totals"]["images"] == 10
    assert main(["report", str(out), "--out", str(tmp_path / "cli.html"), "--gallery", "0"]) == 0


def test_segment_into_a_folder_with_other_files_warns_and_keeps_them(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = write_output(tmp_path)
    add_foreign_files(made["out"])
    job = OutputDir(str(made["out"])).read_job()
    assert job is not None
    capsys.readouterr()
    OutputDir(str(made["out"])).prepare(job, overwrite=True)
    warning = capsys.readouterr().err
    assert f"holds {len(FOREIGN)} file(s) batchseg did not write" in warning
    assert "part-00000-c0ffee.snappy.parquet" in warning and "left alone" in warning
    assert all((made["out"] / name).exists() for name in FOREIGN)
    assert not [p for p in made["out"].iterdir() if p.name.startswith("part-00000") and len(p.name) == 19]


def test_a_rerun_redoes_shards_whose_record_does_not_hold(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = write_output(tmp_path, images=16)
    out = made["out"]
    (out / "part-000001.parquet").unlink()  # deleted by hand, its record kept
    with open(out / "part-000002.parquet", "ab") as f:  # replaced by another object
        f.write(b"more")
    size = (out / "part-000002.parquet").stat().st_size
    (out / DONE_DIR / "part-000000.json").write_text('{"shard": 0, "rows": ')  # damaged
    capsys.readouterr()
    assert OutputDir(str(out)).resume(made["plan"].shard_fingerprints).kept == {3}
    warnings = capsys.readouterr().err
    assert "part-000001: its completion record is there but part-000001.parquet is missing" in warnings
    assert f"part-000002.parquet is {size:,} bytes, its completion record says {size - 4:,};" in warnings
    assert "part-000000: its completion record is unreadable" in warnings
    assert sorted(p.name for p in (out / DONE_DIR).iterdir()) == ["part-000003.json"]
    assert sorted(p.name for p in out.glob("part-*")) == ["part-000003.parquet"]  # no stale rows to read
    assert OutputDir(str(out)).resume(made["plan"].shard_fingerprints).kept == {3}  # a second look agrees


def test_records_without_a_size_are_trusted_when_their_object_is_there(tmp_path: pathlib.Path) -> None:
    made = write_output(tmp_path)
    out = made["out"]
    for path in (out / DONE_DIR).iterdir():  # as batchseg before 0.x wrote them
        record = json.loads(path.read_text())
        path.write_text(
            json.dumps({k: v for k, v in record.items() if k not in ("bytes", "storage_retries")})
        )
    (out / "part-000002.parquet").unlink()
    assert OutputDir(str(out)).resume(made["plan"].shard_fingerprints).kept == {0, 1}
    assert [(r.shard, r.bytes, r.storage_retries) for r in OutputDir(str(out)).records()] == [
        (0, None, 0),
        (1, None, 0),
    ]


def test_a_completion_record_is_written_as_batchseg_wrote_it_before(tmp_path: pathlib.Path) -> None:
    """Byte for byte: outputs written before and after read alike, by batchseg and by anyone's script."""
    shard = Shard(7, ["a", "b", "c", "d", "e"], ["u/a", "u/b", "u/c", "u/d", "u/e"])
    rows = [
        ok_row("a", "u/a", 2, 2, [INSTANCE, INSTANCE]),
        error_row("b", "u/b", ImageError("not_found", "gone")),
        ok_row("c", "u/c", 2, 2, []),
        error_row("d", "u/d", ImageError("decode_error", "not an image")),
        error_row("e", "u/e", ImageError("not_found", "gone")),
    ]
    record = ShardRecord.of(shard, rows, attempt=2, seconds=1.23456, storage_retries=3, settings="5e771265")
    written = OutputDir(str(tmp_path)).write_shard(shard, b"0123456789", record)
    text = (tmp_path / DONE_DIR / "part-000007.json").read_text()
    assert text == (  # then the newer fields: the settings' fingerprint, the object's MD5
        '{"rows": 5, "ok": 2, "errors": {"not_found": 2, "decode_error": 1}, "instances": 2, '
        '"seconds": 1.235, "attempt": 2, "storage_retries": 3, "shard": 7, '
        f'"fingerprint": "{shard.fingerprint}", "bytes": 10, '
        '"settings": "5e771265", "md5": "781e5e245d69b566979b86e28d23f2c7"}'
    )
    assert ShardRecord.from_json(text) == written
    assert (tmp_path / "part-000007.parquet").read_bytes() == b"0123456789"
    with pytest.raises(ValueError, match="shard 7 given for shard 8"):
        OutputDir(str(tmp_path)).write_shard(Shard(8, shard.image_ids, shard.uris), b"", record)


def test_shard_names_sort_in_manifest_order_past_a_million_shards(tmp_path: pathlib.Path) -> None:
    """Six digits up to 999,999 (as before), then a letter counting the digits: a listing sorted by name
    (a person's, Spark's) is in shard order."""
    indices = [0, 1, 999_999, 10**6, 10**6 + 1, 9_999_999, 10**7, 12_345_678, 10**8, 10**9, 10**12]
    names = [shard_object(i) for i in indices]
    assert sorted(names) == names
    assert names[2:4] == ["part-999999.parquet", "part-g1000000.parquet"]
    assert shard_record(12_345_678) == f"{DONE_DIR}/part-h12345678.json"
    assert [shard_index(n) for n in names] == [shard_index(shard_record(i)) for i in indices] == indices
    # not batchseg's names for any shard: another writer's (or an older batchseg's past 999,999)
    for name in ("part-1000000.parquet", "part-g999999.parquet", "part-g01234567.parquet", "part-a1.parquet"):
        assert shard_index(name) is None and not is_ours(name)
    output = OutputDir(str(tmp_path))
    for index in (10**6, 999_999):
        shard = Shard(index, ["a"], ["u/a"])
        rows = [ok_row("a", "u/a", 2, 2, [INSTANCE])]
        output.write_shard(
            shard, to_parquet(rows, {}), ShardRecord.of(shard, rows, attempt=1, seconds=0, storage_retries=0)
        )
    assert [o.index for o in output.shard_objects()] == [999_999, 10**6]
    assert sorted(output.check().done) == [999_999, 10**6]


def precision_job(root: pathlib.Path, **changes: Any) -> SegmentConfig:
    manifest = root / "manifest.txt"
    manifest.write_text("".join(f"{root}/img{i}.png\n" for i in range(2)))
    options = {"model": "maskrcnn_small", "weights": "none", "shard_size": 1} | changes
    return SegmentConfig(manifest=str(manifest), output=str(root / "out"), **options)


def test_precision_decode_and_the_device_kind_are_settings_of_an_output(tmp_path: pathlib.Path) -> None:
    """--precision and --decode as given, and the device kind the driver decides (recorded before any shard
    is written; a rerun's job file keeps it): a rerun with another is refused like other settings."""
    config = precision_job(tmp_path, decode="device")
    with prepare_job(config) as job:  # a job holds the output until it is released
        record_device(job, "cuda")
    assert {k: OutputDir(config.output).read_job()[k] for k in ("precision", "decode", "device")} == {
        "precision": "auto",
        "decode": "device",
        "device": "cuda",
    }
    for other, change in (
        ({"precision": "bf16"}, "precision: 'auto' -> 'bf16'"),
        ({"decode": "pil"}, "decode: 'device' -> 'pil'"),
    ):
        with pytest.raises(BatchsegError, match=rf"other settings \({change}\).*--overwrite"):
            prepare_job(replace(config, **other))
    again = prepare_job(replace(config, decode="torchvision"))  # device's older name: the same decoder
    assert OutputDir(config.output).read_job()["device"] == "cuda"
    with pytest.raises(BatchsegError, match=r"other settings \(device: 'cuda' -> 'cpu'\).*--overwrite"):
        record_device(again, "cpu")
    record_device(again, "cuda")
    again.release()
    with prepare_job(replace(config, precision="fp32", overwrite=True)) as job:  # starts over
        record_device(job, "cpu")
    assert OutputDir(config.output).read_job()["device"] == "cpu"
    assert not list((tmp_path / "out").glob("part-*"))


def test_an_output_made_before_precision_decode_and_device_were_recorded_resumes_with_any(
    tmp_path: pathlib.Path,
) -> None:
    config = precision_job(tmp_path)
    prepare_job(config).release()
    path = tmp_path / "out" / JOB_FILE
    older = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("precision", "decode")}
    path.write_text(json.dumps(older))
    with prepare_job(replace(config, precision="bf16", decode="pil")) as job:
        record_device(job, "cpu")
    assert {k: json.loads(path.read_text())[k] for k in ("precision", "decode", "device")} == {
        "precision": "bf16",
        "decode": "pil",
        "device": "cpu",
    }


def test_hand_edited_records_are_removed_and_their_shards_redone(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = write_output(tmp_path, images=28)  # 7 shards
    out = made["out"]
    edits: list[Callable[[dict[str, Any]], Any]] = [
        lambda r: [r],  # not an object
        lambda r: r | {"rows": "4"},  # a count as a string
        lambda r: {k: v for k, v in r.items() if k != "errors"},
        lambda r: r | {"shard": 1},  # another shard's
        lambda r: r | {"rows": -4},
        lambda r: r | {"errors": {"not_found": 1.5}},
    ]
    for index, edit in enumerate(edits):
        path = out / shard_record(index)
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    capsys.readouterr()
    assert OutputDir(str(out)).resume(made["plan"].shard_fingerprints).kept == {6}
    warnings = capsys.readouterr().err
    redone = "its record is removed and the shard redone"
    assert warnings.count(redone) == len(edits)
    for shard, problem in [
        (0, "unreadable (TypeError)"),
        (1, "unreadable (TypeError)"),
        (2, "unreadable (KeyError)"),
        (3, "another shard's"),
        (4, "another shard's"),
        (5, "unreadable (TypeError)"),
    ]:
        assert f"part-{shard:06d}: its completion record is {problem}; {redone}" in warnings
    assert sorted(p.name for p in (out / DONE_DIR).iterdir()) == ["part-000006.json"]


def grow(root: pathlib.Path, lines: list[str]) -> list[str]:
    """The manifest of :func:`write_output` rewritten with ``lines``; returns the new shards' fingerprints."""
    (root / "manifest.txt").write_text("".join(f"{line}\n" for line in lines))
    return list(plan_shards(str(root / "manifest.txt"), SHARD_SIZE).shard_fingerprints)


def test_a_grown_manifest_keeps_the_shards_whose_rows_are_unchanged(tmp_path: pathlib.Path) -> None:
    made = write_output(tmp_path)  # 10 rows: shards of 4, 4, 2
    out = made["out"]
    lines = (tmp_path / "manifest.txt").read_text().splitlines()
    kept = {n: (out / n).read_bytes() for n in ("part-000000.parquet", "part-000001.parquet")}
    resume = OutputDir(str(out)).resume(
        grow(tmp_path, [*lines, *(f"{tmp_path}/new{i}.png" for i in range(5))])
    )
    assert (resume.kept, resume.redone, resume.new, resume.removed) == ({0, 1}, (2,), 1, ())
    assert resume.line() == "2 kept, 1 redone, 1 new"
    assert {n: (out / n).read_bytes() for n in kept} == kept  # untouched
    assert not (out / "part-000002.parquet").exists() and not (out / DONE_DIR / "part-000002.json").exists()


def test_a_row_inserted_in_the_middle_redoes_its_shard_and_every_later_one(tmp_path: pathlib.Path) -> None:
    made = write_output(tmp_path)
    lines = (tmp_path / "manifest.txt").read_text().splitlines()
    resume = OutputDir(str(made["out"])).resume(grow(tmp_path, [*lines[:5], f"{tmp_path}/b.png", *lines[5:]]))
    assert (resume.kept, resume.redone, resume.new) == ({0}, (1, 2), 0)


def test_a_shrunk_manifest_removes_the_shards_past_its_end(tmp_path: pathlib.Path) -> None:
    made = write_output(tmp_path, images=12)  # shards of 4, 4, 4
    out = made["out"]
    lines = (tmp_path / "manifest.txt").read_text().splitlines()
    (out / "part-000005.parquet").write_bytes(b"an unfinished shard of a bigger manifest, no record")
    resume = OutputDir(str(out)).resume(grow(tmp_path, lines[:8]))
    assert (resume.kept, resume.redone, resume.removed, resume.line()) == (
        {0, 1},
        (),
        (2, 5),
        "2 kept, 0 redone, 0 new, 2 removed past the manifest's end",
    )
    assert sorted(p.name for p in out.glob("part-*")) == ["part-000000.parquet", "part-000001.parquet"]
    assert sorted(p.name for p in (out / DONE_DIR).iterdir()) == ["part-000000.json", "part-000001.json"]
    assert open_results(str(out)).to_table().column("image_id").to_pylist() == made["ids"][:8]


def test_records_without_a_fingerprint_are_redone(tmp_path: pathlib.Path) -> None:
    made = write_output(tmp_path)
    out = made["out"]
    path = out / DONE_DIR / "part-000001.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "fingerprint"}))
    resume = OutputDir(str(out)).resume(made["plan"].shard_fingerprints)
    assert (resume.kept, resume.redone) == ({0, 2}, (1,))


def run_verify(out: pathlib.Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, list[str]]:
    code = main(["verify", str(out), *extra])
    return code, capsys.readouterr().out.splitlines()


def test_verify_passes_a_whole_output(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write_output(tmp_path)["out"]
    add_foreign_files(out)
    code, lines = run_verify(out, capsys)
    assert (code, len(lines)) == (0, 1)
    assert lines[0].startswith(f"OK: {out}: 10 images in 3 shards, every manifest row exactly once")


def rewrite_shard(out: pathlib.Path, index: int, keep: slice, *, fix_size: bool = True) -> None:
    """Rewrite a shard object with only some of its rows, and its record's size and MD5 to match (a hand
    edit that neither a listing nor the record's checksum can see)."""
    path = out / shard_object(index)
    pq.write_table(pq.read_table(path).slice(keep.start, keep.stop - keep.start), path)
    record_path = out / shard_record(index)
    record = json.loads(record_path.read_text())
    if fix_size:
        record_path.write_text(json.dumps(record | matching(path)))


def matching(path: pathlib.Path) -> dict[str, Any]:
    """A completion record's size and MD5 of the object at ``path``, as a hand edit of both would put them."""
    data = path.read_bytes()
    return {"bytes": len(data), "md5": hashlib.md5(data).hexdigest()}


def test_verify_finds_every_kind_of_damage(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = write_output(tmp_path, images=20)
    out = made["out"]
    (out / "part-000001.parquet").unlink()
    rewrite_shard(out, 2, slice(0, 3))
    (out / DONE_DIR / "part-000003.json").unlink()  # an unfinished shard: object, no record
    code, lines = run_verify(out, capsys)
    assert code == 1
    assert lines[0] == f"FAILED: {out}: 5 problem(s) in 3 shards"
    assert lines[1:] == [
        "  part-000001: its completion record is there but part-000001.parquet is missing",
        "  part-000003.parquet has no completion record (an unfinished shard, or put there by hand)",
        "  part-000002.parquet holds 3 rows, its completion record says 4",
        "  part-000002.parquet does not hold the manifest's rows for it: 1 missing, 0 not in the shard",
        "  2 of the manifest's shards are not done (part-000001, part-000003): rerun segment",
    ]


def test_verify_checks_ids_against_the_manifest(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = write_output(tmp_path)
    out = made["out"]
    shard0 = pq.read_table(out / "part-000000.parquet")
    shard1 = pq.read_table(out / "part-000001.parquet")
    # Shard 1 holds shard 0's first row instead of its own: the right count, one id twice in the output.
    swapped = pa.concat_tables([shard0.slice(0, 1), shard1.slice(1)]).replace_schema_metadata(
        shard1.schema.metadata
    )
    pq.write_table(swapped, out / "part-000001.parquet")
    record = json.loads((out / DONE_DIR / "part-000001.json").read_text())
    (out / DONE_DIR / "part-000001.json").write_text(
        json.dumps(record | matching(out / "part-000001.parquet"))
    )
    code, lines = run_verify(out, capsys)
    assert code == 1
    assert lines[1:] == [
        "  part-000001.parquet does not hold the manifest's rows for it: 1 missing, 1 not in the shard"
    ]
    # Without the manifest, the same damage shows as an id in two shards.
    pathlib.Path(made["manifest"]).unlink()
    code, lines = run_verify(out, capsys)
    assert code == 1
    assert any("cannot check the image ids against the manifest" in line for line in lines)
    assert f"  part-000001: image_id {made['ids'][0]!r} is also in an earlier shard" in lines


def test_verify_names_the_shards_a_grown_manifest_changed_and_refuses_a_folder_that_is_not_an_output(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = write_output(tmp_path)  # 10 rows: shards of 4, 4, 2
    with open(made["manifest"], "a") as f:
        f.write("".join(f"{tmp_path}/img{i}.png\n" for i in range(900, 903)))
    code, lines = run_verify(made["out"], capsys)
    assert code == 1
    assert lines[1:] == [
        "  part-000002: the manifest's rows for it changed: rerun segment to redo it",
        "  1 of the manifest's shards are not done (part-000003): rerun segment",
    ]
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a batchseg output" in err[0]


HEX = "0123456789abcdef" * 2


def test_a_rerun_removes_the_writes_an_earlier_run_left_unfinished_and_nothing_else(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = write_output(tmp_path)
    out = made["out"]
    unfinished = [  # a crash or a full disk left these; older batchseg named them without the dot
        f"part-000001.parquet.tmp-{HEX}",
        f".part-000002.parquet.tmp-{HEX}",
        f"{DONE_DIR}/.part-000000.json.tmp-{HEX}",
        f".{SUMMARY_FILE}.tmp-{HEX}",
        f"{OLD_SUMMARY_FILE}.tmp-{HEX}",
    ]
    others = [  # a person's or another tool's, whatever they look like
        "notes.tmp-abc",
        f"notes.tmp-{HEX}",
        f".notes.tmp-{HEX}",
        f"part-1.parquet.tmp-{HEX}",
        f"part-000001.parquet.tmp-{HEX.upper()}",
        f"{DONE_DIR}/part-000001.json.tmp-{HEX}0",
    ]
    for name in unfinished + others:
        (out / name).write_bytes(b"")
    job = OutputDir(str(out)).read_job()
    assert job is not None
    OutputDir(str(out)).prepare(job, overwrite=False)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp-" in p.name)
    assert left == sorted(others)
    assert "removing 5 unfinished write(s)" in capsys.readouterr().err
    assert len(OutputDir(str(out)).resume(made["plan"].shard_fingerprints).kept) == 3


def small_job(root: pathlib.Path) -> SegmentConfig:
    """Four shape images in two shards, segmented by the shipped small model."""
    uris = write_dataset(str(root / "shapes"), 4, seed=1, size=64).uris
    (root / "manifest.txt").write_text("".join(f"{u}\n" for u in uris))
    return SegmentConfig(
        manifest=str(root / "manifest.txt"),
        output=str(root / "out"),
        shard_size=2,
        weights=str(SHAPES_MODEL),
        min_size=128,
        max_size=192,
    )


def test_a_full_disk_leaves_no_temporary_and_ends_the_job_in_one_line(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = small_job(tmp_path)
    out = pathlib.Path(config.output)
    with prepare_job(config) as job, monkeypatch.context() as disk:
        fill_the_disk(disk)  # the disk fills once the job has started: each shard's write fails
        with pytest.raises(OSError, match="No space left"):
            ShardProcessor.for_job(job).process(next(iter_shards(job.plan)))
    assert [p.name for p in out.rglob("*")] == [JOB_FILE]  # no temporary, no shard, no record, no lease
    # The job's end: every shard done, then the disk full as the summary is written.
    segment_in_process(config)
    (out / SUMMARY_FILE).unlink()
    fill_the_disk(monkeypatch, bound_for=SUMMARY_FILE)
    flags = ["--weights", str(SHAPES_MODEL), "--min-size", "128", "--max-size", "192", "--shard-size", "2"]
    capsys.readouterr()
    assert main(["segment", "--manifest", config.manifest, "--output", config.output, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"batchseg: error: cannot write the summary to {out}: OSError: [Errno 28] No space left on device"
    )
    assert not [line for line in err if "Traceback" in line]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_the_output_folder_is_a_parquet_data_set_that_directory_readers_read(
    tmp_path: pathlib.Path,
) -> None:
    """pyarrow, pandas and Spark read a folder's files but those named ``_*`` or ``.*``: every side file
    batchseg writes there, and a write in progress, is so named."""
    import pandas as pd
    import pyarrow.dataset as ds

    made = write_output(tmp_path)
    out = made["out"]
    OutputDir(str(out)).write_summary({"images": 10})
    (out / pathlib.Path(atomic.aside(str(out / shard_object(3)))).name).write_bytes(b"half a shard")
    assert ds.dataset(out, format="parquet").to_table().column("image_id").to_pylist() == made["ids"]
    assert sorted(pd.read_parquet(out)["image_id"]) == sorted(made["ids"])


def test_an_older_outputs_summary_json_is_read_and_replaced(tmp_path: pathlib.Path) -> None:
    made = write_output(tmp_path)
    out = made["out"]
    (out / OLD_SUMMARY_FILE).write_text(json.dumps({"images": 10, "ok": 9}))
    assert open_results(str(out)).summary == {"images": 10, "ok": 9}
    assert build_report(str(out), str(tmp_path / "r.html"), gallery=0)["summary_found"]
    OutputDir(str(out)).write_summary({"images": 10, "ok": 10})
    assert not (out / OLD_SUMMARY_FILE).exists()
    assert open_results(str(out)).summary == {"images": 10, "ok": 10}


def test_a_shard_made_with_other_settings_is_reported_by_verify_and_redone_by_the_rerun(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """#25: a job started over with --overwrite --score-threshold 0.7 while a 0.3 job still wrote shards
    kept them, and verify said OK. Each record carries its job's settings; here shard 1's came from a job
    of another score threshold, as the stray job's processor would have written it."""
    made = write_output(tmp_path)
    out = made["out"]
    job = json.loads((out / JOB_FILE).read_text())
    assert {r.settings for r in OutputDir(str(out)).records()} == {settings_of(job)}
    stray = out / shard_record(1)
    stray.write_text(
        json.dumps(json.loads(stray.read_text()) | {"settings": settings_of(job | {"score_threshold": 0.7})})
    )
    code, lines = run_verify(out, capsys)
    assert (code, lines[1:]) == (
        1,
        [
            f"  part-000001: made with other settings than {JOB_FILE} records (another job wrote this "
            "output): rerun segment to redo it"
        ],
    )
    resume = OutputDir(str(out)).resume(made["plan"].shard_fingerprints, settings_of(job))
    assert (resume.kept, resume.redone) == ({0, 2}, (1,))
    assert not stray.exists() and not (out / shard_object(1)).exists()  # forgotten, to be written again


def test_a_shard_rewritten_to_the_same_size_is_caught_by_verify_and_redone_by_the_rerun(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """#25: verify passed a shard rewritten to the same size with other content. Here the Parquet footer's
    provenance says another model: a valid object of the same size, rows and ids."""
    made = write_output(tmp_path)
    out = made["out"]
    path = out / shard_object(2)
    data = path.read_bytes()
    assert data.count(b'"model": "m"') == 1
    path.write_bytes(data.replace(b'"model": "m"', b'"model": "x"'))
    assert pq.read_table(path).num_rows == 2 and path.stat().st_size == len(data)
    code, lines = run_verify(out, capsys)
    assert (code, lines[1:]) == (
        1,
        [
            "  part-000002: part-000002.parquet is not what its completion record says (its MD5 differs): "
            "it was changed",
            "  1 of the manifest's shards are not done (part-000002): rerun segment",
        ],
    )
    resume = OutputDir(str(out)).resume(made["plan"].shard_fingerprints)
    assert (resume.kept, resume.redone) == ({0, 1}, (2,))


def test_records_of_older_batchseg_without_settings_or_md5_are_accepted(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Outputs made before records carried settings and an MD5 stay whole: checked by size, as then."""
    made = write_output(tmp_path)
    out = made["out"]
    for index in range(3):
        path = out / shard_record(index)
        path.write_text(
            json.dumps(
                {k: v for k, v in json.loads(path.read_text()).items() if k not in ("settings", "md5")}
            )
        )
    code, lines = run_verify(out, capsys)
    assert code == 0 and lines[0].startswith("OK:")
    resume = OutputDir(str(out)).resume(made["plan"].shard_fingerprints, "another job's settings")
    assert resume.kept == {0, 1, 2}
