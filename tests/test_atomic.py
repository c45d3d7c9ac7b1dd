"""Files written whole (io/atomic.py), and what every command's ``--out`` does with what is already there: a
link is written through to its target (the link stays), a FIFO or a device is streamed into, ``-`` is
stdout; a failed write leaves no temporary behind."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import threading
from typing import Any

import pytest
from fsspec.implementations.local import LocalFileSystem

from batchseg.cli import main
from batchseg.io import atomic
from tests.diskfull import fill_the_disk
from tests.test_output import write_output

QUERY = "SELECT image_id FROM images ORDER BY image_id"


def commands(out: str, target: str) -> dict[str, list[str]]:
    """Each command that writes a file, writing ``target``, from the output at ``out``."""
    return {
        "query": ["query", out, QUERY, "--format", "csv", "--out", target],
        "export-coco": ["export-coco", out, "--out", target],
        "diff": ["diff", out, out, "--out", target],
        "diff --json": ["diff", out, out, "--json", target],
        "report": ["report", out, "--out", target, "--gallery", "0"],
    }


def check_written(command: str, data: bytes, ids: list[str]) -> None:
    """``data`` is what ``command`` writes for test_output's output, whose images are ``ids``: whole."""
    if command == "query":
        assert data.decode() == '"image_id"\n' + "".join(f'"{i}"\n' for i in sorted(ids))
    elif command == "export-coco":
        assert len(json.loads(data)) == len(ids)  # an instance each
    elif command == "diff":
        assert len(data.decode().splitlines()) == len(ids) + 1  # a header and a row per image
    elif command == "diff --json":
        assert json.loads(data)["images"]["in_both"] == len(ids)
    else:
        assert data.decode().rstrip().endswith("</html>")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """test_output's output of 10 images (``out``), with their ``ids``."""
    made = write_output(tmp_path_factory.mktemp("output"))
    return made | {"out": str(made["out"])}


def no_temporaries(*folders: pathlib.Path) -> None:
    assert not [p.name for folder in folders for p in folder.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("command", ["query", "export-coco", "diff", "diff --json", "report"])
def test_out_through_a_symlink_writes_its_target_and_keeps_the_link(
    made: dict[str, Any], tmp_path: pathlib.Path, command: str
) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "file"
    target.write_text("what was there")
    link = tmp_path / "link.csv"  # diff takes the format from the name
    link.symlink_to(target)
    assert main(commands(made["out"], str(link))[command]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    check_written(command, target.read_bytes(), made["ids"])
    no_temporaries(tmp_path, tmp_path / "real")


def test_a_link_to_nothing_yet_is_written_through(tmp_path: pathlib.Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "later" / "file.json")
    atomic.write(LocalFileSystem(), str(link), b"{}")
    assert link.is_symlink() and (tmp_path / "later" / "file.json").read_bytes() == b"{}"


def read_in_background(fifo: pathlib.Path) -> tuple[threading.Thread, list[bytes]]:
    """A reader of ``fifo`` in a thread, as another process would read it; what it read, once it ends."""
    got: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as f:  # waits for a writer
            got.append(f.read())

    reader = threading.Thread(target=read, daemon=True)  # a replaced FIFO would leave it waiting for good
    reader.start()
    return reader, got


@pytest.mark.parametrize("command", ["query", "export-coco", "diff"])
def test_out_into_a_fifo_streams_to_its_reader(
    made: dict[str, Any], tmp_path: pathlib.Path, command: str
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader, got = read_in_background(fifo)
    target = tmp_path / "table.csv" if command == "diff" else fifo
    if command == "diff":  # diff takes the format from --out's name: a link so named leads to the FIFO
        target.symlink_to(fifo)
    assert main(commands(made["out"], str(target))[command]) == 0
    reader.join(timeout=30)
    assert not reader.is_alive(), "its reader got no end of file: the FIFO was replaced"
    assert stat.S_ISFIFO(os.stat(target).st_mode)
    check_written(command, got[0], made["ids"])
    no_temporaries(tmp_path)


def test_out_dash_writes_to_stdout(
    made: dict[str, Any],
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["query", made["out"], QUERY, "--format", "csv", "--out", "-"]) == 0
    captured = capsysbinary.readouterr()
    check_written("query", captured.out, made["ids"])  # the rows alone: the line saying so is on stderr
    assert f"{len(made['ids'])} rows written to -" in captured.err.decode()
    assert main(["export-coco", made["out"], "--out", "-"]) == 0
    check_written("export-coco", capsysbinary.readouterr().out, made["ids"])
    assert list(tmp_path.iterdir()) == []  # no file named "-"


def test_a_character_device_is_written_not_replaced(made: dict[str, Any], tmp_path: pathlib.Path) -> None:
    """Through a link of the test's own to /dev/null: run as root before the fix, a test naming /dev/null
    itself would have replaced the machine's /dev/null with a regular file."""
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    assert main(commands(made["out"], str(link))["export-coco"]) == 0
    atomic.write(LocalFileSystem(), str(link), b"into nothing")
    assert link.is_symlink() and stat.S_ISCHR(os.stat(link).st_mode)
    no_temporaries(tmp_path, pathlib.Path("/dev"))


def test_a_write_that_fails_removes_its_temporary(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill_the_disk(monkeypatch)
    fs = LocalFileSystem()
    with pytest.raises(OSError, match="No space left"):
        atomic.write(fs, str(tmp_path / "a.json"), b"{}")
    with pytest.raises(OSError, match="No space left"), atomic.open_whole(fs, str(tmp_path / "b.csv")) as f:
        f.write(b"a,b\n")
    assert list(tmp_path.iterdir()) == []


def test_a_link_into_the_output_is_refused_as_its_target_would_be(
    made: dict[str, Any], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "link.csv"
    link.symlink_to(pathlib.Path(made["out"], "part-000000.parquet"))
    before = link.read_bytes()
    for command in ("query", "export-coco", "diff", "report"):
        assert main(commands(made["out"], str(link))[command]) == 2
        assert "would overwrite batchseg's own file" in capsys.readouterr().err
    assert link.read_bytes() == before
