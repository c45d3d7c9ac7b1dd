"""The README's first command: the shipped small model segments unseen images with segm AP >= 0.5."""

from __future__ import annotations

import pathlib

import pytest

from batchseg.cli import main
from batchseg.demo import SHAPES_MODEL


def test_shipped_checkpoint_is_small_and_self_describing() -> None:
    import torch

    assert pathlib.Path(str(SHAPES_MODEL)).stat().st_size <= 20 * 2**20
    saved = torch.load(str(SHAPES_MODEL), weights_only=True)
    assert saved["model_name"] == "maskrcnn_small"
    assert saved["categories"] == ["__background__", "circle", "square", "triangle"]
    assert saved["config"]["iterations"] == 240


def test_demo_prints_rows_and_an_ap_over_half(
    ray_address: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "50 rows in" in out and "  image   1  " in out
    ap = float(out.split("segm AP ")[1].split()[0])
    assert ap >= 0.5
