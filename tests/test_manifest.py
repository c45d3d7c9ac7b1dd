"""Manifests of every format stream the same rows; bad manifests fail before any work with one message."""

from __future__ import annotations

import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchseg.errors import BatchsegError
from batchseg.io.manifest import default_image_id, iter_manifest, iter_shards, plan_shards

URIS = [f"/data/img-{i}.jpg" for i in range(7)]


def rows(manifest: str) -> list[tuple[str, str]]:
    return [pair for ids, uris in iter_manifest(manifest) for pair in zip(ids, uris, strict=True)]


def write(tmp_path: pathlib.Path, kind: str, uris: list[str], ids: list[str] | None = None) -> str:
    path = tmp_path / f"manifest.{kind}"
    if kind == "parquet":
        columns = {"uri": uris} | ({"image_id": ids} if ids else {})
        pq.write_table(pa.table(columns), path)
    elif kind == "csv":
        header = "uri,image_id\n" if ids else "uri\n"
        body = "".join(f"{u},{i}\n" if ids else f"{u}\n" for u, i in zip(uris, ids or uris, strict=True))
        path.write_text(header + body)
    elif kind == "jsonl":
        lines = [
            json.dumps({"uri": u} | ({"image_id": i} if ids else {}))
            for u, i in zip(uris, ids or uris, strict=True)
        ]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text("# one URI per line\n" + "\n".join(uris) + "\n\n")
    return str(path)


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl", "txt"])
def test_every_format_gives_the_same_rows(tmp_path: pathlib.Path, kind: str) -> None:
    assert rows(write(tmp_path, kind, URIS)) == [(default_image_id(u), u) for u in URIS]


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl"])
def test_image_id_column_is_used_as_text(tmp_path: pathlib.Path, kind: str) -> None:
    ids = [str(100 + i) for i in range(len(URIS))]  # numeric-looking ids stay strings
    assert rows(write(tmp_path, kind, URIS, ids)) == list(zip(ids, URIS, strict=True))


def test_default_image_id_is_stable() -> None:
    assert default_image_id("s3://bucket/a.jpg") == default_image_id("s3://bucket/a.jpg")
    assert default_image_id("s3://bucket/a.jpg") != default_image_id("s3://bucket/b.jpg")
    assert len(default_image_id("x")) == 16


def test_relative_uris_resolve_against_the_manifest_folder(tmp_path: pathlib.Path) -> None:
    manifest = write(tmp_path, "csv", ["images/a.jpg", "/abs/b.jpg", "s3://bucket/c.jpg"])
    uris = [u for _, u in rows(manifest)]
    assert uris == [str(tmp_path / "images/a.jpg"), "/abs/b.jpg", "s3://bucket/c.jpg"]


def test_folder_manifest_lists_images_recursively_in_order(tmp_path: pathlib.Path) -> None:
    for name in ["b.jpg", "a.PNG", "sub/c.webp", "notes.txt", "sub/d.json"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    uris = [u for _, u in rows(str(tmp_path))]
    assert uris == [str(tmp_path / n) for n in ["a.PNG", "b.jpg", "sub/c.webp"]]


def test_files_macos_and_windows_leave_in_a_folder_are_skipped_and_counted_in_one_line(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder copied from a Mac to a USB disk or a share holds an AppleDouble ``._name.jpg`` beside each
    image (not an image: an error row each, before), and ``.DS_Store``; Windows leaves ``Thumbs.db``."""
    names = ["a.jpg", "._a.jpg", ".DS_Store", "sub/b.png", "sub/._b.png", "sub/Thumbs.db", "desktop.ini"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"\x00\x05\x16\x07" if "._" in name else b"x")  # AppleDouble's magic
    plan = plan_shards(str(tmp_path), 10)
    assert plan.num_rows == 2
    assert [u for _, u in rows(str(tmp_path))] == [str(tmp_path / "a.jpg"), str(tmp_path / "sub/b.png")]
    assert capsys.readouterr().err.splitlines() == [
        f"batchseg: manifest {tmp_path}: skipped 5 file(s) that macOS and Windows leave beside images "
        "(._* AppleDouble files, .DS_Store, Thumbs.db, desktop.ini)"
    ]


def test_duplicate_image_ids_are_refused_with_examples(tmp_path: pathlib.Path) -> None:
    manifest = write(tmp_path, "csv", URIS, ["a", "b", "a", "c", "b", "d", "e"])
    with pytest.raises(BatchsegError, match=r"2 duplicate image_id value\(s\), e.g. 'a', 'b'"):
        plan_shards(manifest, 3)


def test_duplicate_uris_without_ids_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(BatchsegError, match="duplicate image_id"):
        plan_shards(write(tmp_path, "txt", [*URIS, URIS[0]]), 3)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("url\nx.jpg\n", "has no 'uri' column \\(it has: url\\)"),
        ("uri,image_id\na.jpg,1\n,2\n", r"rows with no uri \(rows \[2\]\)"),
        ("uri\n", "has no rows"),
    ],
)
def test_bad_manifests_fail_with_one_clear_message(
    tmp_path: pathlib.Path, content: str, message: str
) -> None:
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(BatchsegError, match=message):
        plan_shards(str(path), 10)


def test_missing_and_unparseable_manifests(tmp_path: pathlib.Path) -> None:
    with pytest.raises(BatchsegError, match="does not exist"):
        plan_shards(str(tmp_path / "nope.csv"), 10)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(BatchsegError, match=r"cannot read manifest .* as PARQUET"):
        plan_shards(str(tmp_path / "broken.parquet"), 10)


def test_shards_are_deterministic_and_skip_done_ones(tmp_path: pathlib.Path) -> None:
    manifest = write(tmp_path, "parquet", URIS)
    plan = plan_shards(manifest, 3)
    assert (plan.num_rows, plan.num_shards) == (7, 3)
    shards = list(iter_shards(plan))
    assert [(s.index, s.uris) for s in shards] == [(0, URIS[0:3]), (1, URIS[3:6]), (2, URIS[6:7])]
    assert [s.index for s in iter_shards(plan, skip=frozenset({0, 2}))] == [1]


def test_fingerprint_follows_the_rows(tmp_path: pathlib.Path) -> None:
    a = plan_shards(write(tmp_path, "csv", URIS), 3).fingerprint
    assert plan_shards(write(tmp_path, "parquet", URIS), 3).fingerprint == a
    assert plan_shards(write(tmp_path, "txt", URIS[::-1]), 3).fingerprint != a


def test_shard_fingerprints_change_only_with_their_shards_rows(tmp_path: pathlib.Path) -> None:
    """What an incremental rerun relies on: rows appended change only the last shard's fingerprint and add
    new ones; a row inserted in the middle changes its shard and every one after it."""
    before = plan_shards(write(tmp_path, "txt", URIS), 3)  # shards of 3, 3, 1
    grown = plan_shards(write(tmp_path, "txt", [*URIS, "/x/8.jpg", "/x/9.jpg", "/x/10.jpg"]), 3)
    assert len(before.shard_fingerprints) == 3 and len(grown.shard_fingerprints) == 4
    assert grown.shard_fingerprints[:2] == before.shard_fingerprints[:2]
    assert grown.shard_fingerprints[2] != before.shard_fingerprints[2]
    assert grown.shard_fingerprints == tuple(s.fingerprint for s in iter_shards(grown))
    inserted = plan_shards(write(tmp_path, "txt", [*URIS[:4], "/x/new.jpg", *URIS[4:]]), 3)
    assert inserted.shard_fingerprints[0] == before.shard_fingerprints[0]
    assert all(
        a != b for a, b in zip(inserted.shard_fingerprints[1:], before.shard_fingerprints[1:], strict=True)
    )
    renamed = plan_shards(write(tmp_path, "csv", URIS, ids=[f"id{i}" for i in range(len(URIS))]), 3)
    assert renamed.shard_fingerprints[0] != before.shard_fingerprints[0]  # same URIs, other ids


def test_shards_span_pyarrow_batches(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batchseg.io.manifest.TEXT_BATCH_ROWS", 4)
    uris = [f"/x/{i}.jpg" for i in range(23)]
    plan = plan_shards(write(tmp_path, "txt", uris), 5)
    shards = list(iter_shards(plan))
    assert [len(s) for s in shards] == [5, 5, 5, 5, 3]
    assert [u for s in shards for u in s.uris] == uris
