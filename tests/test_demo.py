"""The README's first command: the shipped small model segments unseen images at segment's own score threshold
with segm AP >= 0.75, and the demo draws its results (overlay PNGs, an HTML report) and says where they are."""

from __future__ import annotations

import pathlib

import pytest
from PIL import Image

from batchseg.analysis.results import Results
from batchseg.cli import main
from batchseg.demo import MIN_SEGM_AP, OVERLAYS, SHAPES_MODEL


def test_shipped_checkpoint_is_small_and_self_describing() -> None:
    import torch

    assert pathlib.Path(str(SHAPES_MODEL)).stat().st_size <= 20 * 2**20
    saved = torch.load(str(SHAPES_MODEL), weights_only=True)
    assert saved["model_name"] == "maskrcnn_small"
    assert saved["categories"] == ["__background__", "circle", "square", "triangle"]
    assert "optimizer" not in saved and "scheduler" not in saved  # model.pt keeps what segment needs
    recipe = {k: saved["config"][k] for k in ("iterations", "workers", "batch_size", "min_sizes")}
    assert recipe == {
        "iterations": 1000,
        "workers": 2,
        "batch_size": 4,
        "min_sizes": (112, 128, 144),
    }  # BENCHMARKS
    assert (saved["min_size"], saved["max_size"]) == (144, 256)  # segment resizes as it was evaluated


def test_demo_prints_rows_an_ap_over_its_promise_and_where_its_pictures_are(
    ray_address: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "50 rows in" in out and "  image   1  " in out
    ap = float(out.split("segm AP ")[1].split()[0])
    assert ap >= MIN_SEGM_AP >= 0.75
    assert Results(str(tmp_path / "results")).provenance["score_threshold"] == 0.5  # segment's default

    listed = out.split("pictures of the results")[1].splitlines()[1:]
    report = tmp_path / "report.html"
    overlays = [tmp_path / "overlays" / f"{image_id}.png" for image_id in range(1, OVERLAYS + 1)]
    assert [line.strip() for line in listed[: OVERLAYS + 1]] == [str(p) for p in (report, *overlays)]
    assert sorted((tmp_path / "overlays").iterdir()) == sorted(overlays)
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('src="data:image/png;base64,') >= 12  # the gallery's overlays, and the charts
    for image_id, overlay in enumerate(overlays, start=1):
        with Image.open(overlay) as png:
            assert png.format == "PNG"
            png.verify()
        with Image.open(tmp_path / "held-out" / "images" / f"img-{image_id - 1:06d}.jpg") as jpeg:
            assert Image.open(overlay).size == jpeg.size
