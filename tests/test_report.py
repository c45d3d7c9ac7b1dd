"""The HTML report: its numbers, its escaping, that it is self-contained, and that a real browser draws it."""

from __future__ import annotations

import base64
import html
import io
import pathlib
import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from batchseg.analysis.render import instance_colour
from batchseg.analysis.report import build_report
from batchseg.errors import BatchsegError
from tests.test_diff import write_output
from tests.test_render import (
    BACKGROUND,
    ERROR_URI_SUFFIX,
    FAR_APART,
    Output,
    blend,
    write_huge_images,
    write_segment_output,
)

CHART = re.compile(r'<img class="chart" alt="[^"]*" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}">')
TILE = re.compile(r'<figure><img alt="[^"]*" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}">')
CHROMIUM_INSTALL = "apt-get update && apt-get install -y --no-install-recommends chromium"


@pytest.fixture
def output(tmp_path: pathlib.Path) -> Output:
    return write_segment_output(tmp_path)


def card(value: str, label: str) -> str:
    return f'<div class="value">{value}</div><div class="label">{label}</div>'


def test_report_shows_totals_errors_charts_and_gallery(output: Output, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "report" / "report.html"
    result = build_report(output.uri, str(out))
    page = out.read_text(encoding="utf-8")
    ok = [r for r in output.rows if r["status"] == "ok"]
    shown = [r for r in ok if r["instances"]]
    categories = Counter(i["category"] for r in ok for i in r["instances"])
    totals = {"images": len(output.rows), "ok": len(ok), "error": 2, "instances": sum(categories.values())}
    assert result["totals"] == result["table_totals"] == totals
    assert result["summary_found"] and result["gallery"] == len(shown)
    assert result["categories"] == dict(categories.most_common())
    assert result["errors_by_kind"] == {"not_found": 1, "corrupt_image": 1}
    assert sum(result["score_histogram"]) == totals["instances"]
    assert result["instances_per_image"][0] == 1 and sum(result["instances_per_image"].values()) == len(ok)

    for label, value in totals.items():
        assert card(str(value), "errors" if label == "error" else label) in page
    assert card("12.35", "images / s") in page and card("12 min 34 s", "wall time") in page
    assert output.uri in page and "maskrcnn_small" in page and "ground-truth" in page
    # error kinds, counts and examples, escaped: a URI or message is text, never markup
    assert "<code>not_found</code>" in page and "<code>corrupt_image</code>" in page
    assert html.escape(ERROR_URI_SUFFIX) in page and "cannot decode image: broken data stream" in page
    assert "<b>&" not in page and "&lt;b&gt;&amp;" in page
    assert len(CHART.findall(page)) == 3
    assert len(TILE.findall(page)) == len(shown)
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3 + len(shown)
    # offline: no references to anything on a network, no scripts
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()


def test_report_without_summary_counts_from_the_shards_and_says_so(
    output: Output, tmp_path: pathlib.Path
) -> None:
    pathlib.Path(output.uri, "_summary.json").unlink()
    out = tmp_path / "report.html"
    result = build_report(output.uri, str(out), gallery=2)
    page = out.read_text(encoding="utf-8")
    assert not result["summary_found"]
    assert result["totals"] == result["table_totals"]
    assert result["totals"]["images"] == len(output.rows)
    assert "No _summary.json in this output" in page
    assert "maskrcnn_small" in page, "the model comes from the shards' provenance"
    assert "images / s" not in page
    assert result["gallery"] == 2 and len(TILE.findall(page)) == 2


def test_report_notes_a_summary_that_disagrees_with_the_shards(
    output: Output, tmp_path: pathlib.Path
) -> None:
    summary = pathlib.Path(output.uri, "_summary.json")
    summary.write_text(summary.read_text().replace(f'"images": {len(output.rows)}', '"images": 3'))
    result = build_report(output.uri, str(tmp_path / "r.html"), gallery=0)
    page = (tmp_path / "r.html").read_text()
    assert result["totals"]["images"] == 3 and result["table_totals"]["images"] == len(output.rows)
    assert f"The shards now hold {len(output.rows)} images" in page
    assert "No ok image with instances to show." in page


def test_report_of_a_folder_that_is_not_an_output(tmp_path: pathlib.Path) -> None:
    with pytest.raises(BatchsegError, match="no part-"):
        build_report(str(tmp_path), str(tmp_path / "r.html"))


def test_report_opens_offline_in_headless_chromium(output: Output, tmp_path: pathlib.Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(f"chromium is not installed: install Debian's chromium package ({CHROMIUM_INSTALL})")
    page = tmp_path / "report.html"
    build_report(output.uri, str(page))
    shot = tmp_path / "shot.png"
    args = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2000",
        f"--screenshot={shot}",
        page.as_uri(),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert shot.exists(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (2000, 1280, 3)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 500, "charts and photos drawn, not just text"
    assert pixels.std() > 20
    assert (pixels < 200).any(axis=2).mean() > 0.05, "a good part of the page is not white"


def pictures(page: str, alt: str) -> list[np.ndarray]:
    """The page's embedded PNGs whose alt text starts with ``alt``, decoded."""
    found = re.findall(rf'<img alt="{alt}[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))) for data in found]


def test_report_draws_a_huge_image_at_its_tile_size_and_compares_it(tmp_path: pathlib.Path) -> None:
    """A 6000 x 4000 TIFF in the gallery and in the compared pairs, drawn from a picture of the tile's
    size: masks decoded for its pixels only, each instance at its scaled place."""
    new_row = write_huge_images(tmp_path, ("tif",))["tif"]
    old_row = new_row | {"instances": new_row["instances"][:2]}  # instance 2 added in new
    new = write_output(tmp_path / "new", [[new_row]], 0.5)
    old = write_output(tmp_path / "old", [[old_row]], 0.5)
    out = tmp_path / "report.html"
    result = build_report(new, str(out), gallery=1, compare=old)
    assert result["gallery"] == 1 and result["compare"]["pairs"] == 1
    page = out.read_text(encoding="utf-8")
    (tile,) = pictures(page, new_row["image_id"])
    (before,) = pictures(page, "old ")
    (after,) = pictures(page, "new ")
    scale = 320 / 6000  # the tile's 320 px width
    for picture in (tile, before, after):
        assert picture.shape == (213, 320, 3)
        x, y, w, h = FAR_APART[1]
        col, row = round((x + w / 2) * scale), round((y + 3 * h / 4) * scale)
        assert np.abs(picture[row, col].astype(int) - blend(1)).max() <= 1
        # Instance 0 is 21 x 16 px here, mostly under its label: its colour shows inside its box.
        assert (picture[5:22, 5:27] == instance_colour(0)).all(axis=2).sum() > 20
    x, y, w, h = FAR_APART[2]
    col, row = round((x + w / 2) * scale), round((y + h / 2) * scale)
    assert np.abs(after[row, col].astype(int) - blend(2)).max() <= 1
    assert np.abs(before[row, col].astype(int) - BACKGROUND).max() <= 1
