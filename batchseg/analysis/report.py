"""One self-contained HTML page about a segmentation output: totals, errors, charts and a gallery of overlays;
with ``compare``, also how it differs from an older output of the same images (``batchseg diff``)."""

from __future__ import annotations

import base64
import html
import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from string import Template
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from batchseg import __version__
from batchseg.analysis.diff import Diff, ImageDiff, diff_outputs
from batchseg.analysis.render import DEFAULT_MAX_SIDE, View, draw_overlay, read_picture
from batchseg.analysis.results import Results
from batchseg.errors import BatchsegError, job_errors
from batchseg.format.output import SHARD_NAMES, SUMMARY_FILE
from batchseg.format.records import error_kind
from batchseg.format.rle import decode_rle, encode_rle
from batchseg.io import atomic, storage
from batchseg.io.images import decode_image

log = logging.getLogger(__name__)

BATCH_ROWS = 4096
EXAMPLES_PER_KIND = 3
TOP_CATEGORIES = 40
SCORE_BINS = np.linspace(0.0, 1.0, 21)
# Gallery images are drawn at the size they are shown (CSS pixels), so labels keep their 10 px font.
TILE_WIDTH, TILE_HEIGHT, TILE_MAX_UPSCALE = 320, 480, 4.0
CHART_WIDTH_INCHES, CHART_DPI = 4.0, 200  # shown 400 CSS px wide
_Pair = tuple[ImageDiff, bytes, bytes]  # an image, drawn with its old and its new instances (PNG)
# The page (HTML and CSS) with $placeholders, filled in by _page with values already escaped.
PAGE = Template((resources.files("batchseg.analysis") / "report.html").read_text(encoding="utf-8"))


@dataclass
class _Stats:
    """What one pass over the rows gathers; mask strings are only turned into Python for gallery rows."""

    gallery_wanted: int
    images: int = 0
    ok: int = 0
    instances: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    categories: Counter[str] = field(default_factory=Counter)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_BINS) - 1, dtype=np.int64))
    per_image: Counter[int] = field(default_factory=Counter)  # instances in an ok image -> images
    gallery: list[dict[str, Any]] = field(default_factory=list)

    def add(self, batch: pa.RecordBatch) -> None:
        ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
        instances = batch.column("instances")
        self.images += batch.num_rows
        self.ok += int(pc.sum(ok).as_py() or 0)
        failed = batch.filter(pc.invert(ok)).select(["uri", "error"]).to_pylist()
        for row in failed:
            error = row["error"] or "unknown: (no message)"
            kind = error_kind(error)
            self.errors[kind] += 1
            examples = self.examples.setdefault(kind, [])
            if len(examples) < EXAMPLES_PER_KIND:
                examples.append((row["uri"], error[len(kind) + 1 :].strip() if ":" in error else error))
        counts = pc.fill_null(pc.list_value_length(instances), 0).to_numpy(zero_copy_only=False)
        ok_rows = ok.to_numpy(zero_copy_only=False)
        self.per_image.update(Counter(int(n) for n in counts[ok_rows]))
        flat = pc.list_flatten(instances)  # null lists (error rows) contribute nothing
        self.instances += len(flat)
        if len(flat):
            names = pc.coalesce(
                pc.struct_field(flat, "category"),
                pc.binary_join_element_wise(
                    "class ", pc.cast(pc.struct_field(flat, "category_id"), pa.string()), ""
                ),
            )
            for item in pc.value_counts(names).to_pylist():
                self.categories[item["values"] or "(unnamed)"] += item["counts"]
            scores = pc.drop_null(pc.struct_field(flat, "score")).to_numpy(zero_copy_only=False)
            scores = np.clip(scores[np.isfinite(scores)], 0.0, 1.0)
            self.scores += np.histogram(scores, bins=SCORE_BINS)[0]
        wanted = self.gallery_wanted - len(self.gallery)
        if wanted > 0:
            picks = np.flatnonzero(ok_rows & (counts > 0))[:wanted]
            self.gallery.extend(batch.take(pa.array(picks, type=pa.int64())).to_pylist())

    def totals(self) -> dict[str, int]:
        return {
            "images": self.images,
            "ok": self.ok,
            "error": sum(self.errors.values()),
            "instances": self.instances,
        }


def build_report(
    output: str,
    out: str,
    storage_options: dict[str, Any] | None = None,
    gallery: int = 12,
    compare: str | None = None,
) -> dict[str, Any]:
    """Write one static HTML page about the segmentation output at ``output`` to ``out`` (fsspec URIs).

    The page needs no network: charts (matplotlib) and up to ``gallery`` overlays (``render.draw_overlay``
    of ok images with instances, the first in output order, shown at most 320 px wide) are embedded as
    base64 PNG data URIs, and the CSS is inline. Totals, model and throughput come from ``_summary.json``;
    without one, totals are computed from the shards and the page says so. The shards are read once,
    in record batches.

    With ``compare`` (an older output of the same images), a section shows ``diff_outputs(compare, output)``:
    its image counts, a per-category table (instances old and new, matched, mean IoU, added, removed) and
    the ``gallery`` most changed images drawn side by side, old | new.

    Returns what the page shows: ``totals`` (images, ok, error, instances, as displayed), ``table_totals``
    (counted in the shards), ``summary_found``, ``errors_by_kind``, ``categories`` (name -> instances,
    most first), ``score_histogram`` (counts in 20 bins over [0, 1]), ``instances_per_image``
    (instances -> ok images), ``gallery`` (images shown), ``out``, and with ``compare`` also ``compare``
    (``Diff.summary()`` and ``pairs``, the changed images drawn).
    Raises ``BatchsegError`` when ``output`` holds no shards and no summary, or a file cannot be read or written.
    """
    results = Results(output, storage_options, allow_empty=True)
    output_uri = results.uri
    summary = results.summary
    if not results.files and summary is None:
        raise BatchsegError(
            f"output {output_uri} holds no {SHARD_NAMES} files and no {SUMMARY_FILE}: not a segment output"
        )
    diff = None
    if compare is not None:
        diff = diff_outputs(
            compare, output, top=max(0, gallery), storage_options=storage_options, keep_rows=True
        )
    stats = _Stats(max(0, gallery))
    for batch in results.batches(batch_size=BATCH_ROWS):
        stats.add(batch)
    provenance = results.provenance
    tiles: list[tuple[dict[str, Any], bytes]] = []
    failures: Counter[str] = Counter()
    for row in stats.gallery:
        tile = _tile(row, storage_options)
        if isinstance(tile, str):
            failures[tile] += 1
        else:
            tiles.append((row, tile))
    if failures:
        log.warning(f"report: {sum(failures.values())} gallery images could not be drawn: {dict(failures)}")
    totals = {k: summary.get(k, v) for k, v in stats.totals().items()} if summary else stats.totals()
    comparison = ""
    if diff:
        pairs, left_out = _pairs(diff, storage_options)
        comparison = _comparison(diff, pairs, left_out)
    page = _page(output_uri, summary, provenance, stats, totals, tiles, failures, comparison)
    out_fs, out_path = storage.filesystem(out, storage_options)
    with job_errors(f"cannot write report {out}"):
        atomic.write(out_fs, out_path, page.encode("utf-8"))
    compared = {"compare": {**diff.summary(), "pairs": len(pairs)}} if diff else {}
    return {
        "out": out,
        "summary_found": summary is not None,
        "totals": totals,
        "table_totals": stats.totals(),
        "errors_by_kind": dict(stats.errors.most_common()),
        "categories": dict(stats.categories.most_common()),
        "score_histogram": stats.scores.tolist(),
        "instances_per_image": dict(sorted(stats.per_image.items())),
        "gallery": len(tiles),
        **compared,
    }


_Picture = tuple[np.ndarray, View | None]  # an image whole at full size (no view), or a picture of it


def _tile(row: dict[str, Any], storage_options: dict[str, Any] | None) -> bytes | str:
    """One gallery image as PNG bytes, drawn at the size it is shown; or why it could not be."""
    picture = _picture(row, storage_options)
    return picture if isinstance(picture, str) else _drawn(picture, row)


def _tile_size(width: int, height: int) -> tuple[int, int]:
    """The ``(width, height)`` a ``width x height`` image is shown at in the gallery."""
    scale = min(TILE_WIDTH / width, TILE_HEIGHT / height, TILE_MAX_UPSCALE)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _picture(row: dict[str, Any], storage_options: dict[str, Any] | None) -> _Picture | str:
    """A row's image as displayed (``height x width x 3`` uint8, no view); or, for an image larger than
    ``render.DEFAULT_MAX_SIDE`` (a slide, a satellite scene), a picture at its tile's size, read from a
    pyramid level where the file has one, and the view it shows; or why it cannot be drawn."""
    width, height = row["width"], row["height"]
    if max(width, height) > DEFAULT_MAX_SIDE:
        size = _tile_size(width, height)
        picture = read_picture(row, storage_options, max(size))
        if isinstance(picture, str):
            return picture.split(":", 1)[0]  # "unreadable", "size differs"
        pixels, view = picture
        if (pixels.shape[1], pixels.shape[0]) != size:  # the preview's rounding of the shorter side
            pixels = np.array(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))
        return pixels, view
    try:
        pixels = decode_image(storage.read_bytes(row["uri"], storage_options))
    except Exception as e:
        return f"unreadable ({type(e).__name__})"
    if (pixels.shape[1], pixels.shape[0]) != (width, height):
        return "size differs from its row"
    return pixels, None


def _drawn(picture: _Picture, row: dict[str, Any]) -> bytes | str:
    """``row``'s instances drawn over the ``picture`` (``render.draw_overlay``) at the size a tile is shown,
    as PNG bytes; or why they could not be."""
    pixels, view = picture
    height, width = pixels.shape[:2]
    try:
        if view is not None:  # already at the tile's size: masks decoded for its pixels only
            image = draw_overlay(pixels, row["instances"], view=view)
        else:
            size = _tile_size(width, height)
            instances = [_scaled(i, height, width, size) for i in row["instances"]]
            small = np.array(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))
            image = draw_overlay(small, instances)
    except ValueError:
        return "instances do not fit the image"
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _scaled(instance: dict[str, Any], height: int, width: int, size: tuple[int, int]) -> dict[str, Any]:
    """``instance`` of a ``height x width`` image, moved to an image of ``size`` (width, height)."""
    sx, sy = size[0] / width, size[1] / height
    scaled = dict(instance)
    if instance.get("rle") is not None:
        mask = Image.fromarray(decode_rle(instance["rle"], height, width).astype(np.uint8) * 255)
        # Bilinear resampling averages (down) or interpolates (up); half coverage decides membership.
        scaled["rle"] = encode_rle(np.asarray(mask.resize(size, Image.Resampling.BILINEAR)) >= 128)
    if instance.get("bbox") is not None:
        x, y, w, h = instance["bbox"]
        scaled["bbox"] = [x * sx, y * sy, w * sx, h * sy]
    if instance.get("keypoints") is not None:
        points = np.asarray(instance["keypoints"], dtype=np.float64).reshape(-1, 3) * [sx, sy, 1.0]
        scaled["keypoints"] = points.ravel().tolist()
    return scaled


def _pairs(diff: Diff, storage_options: dict[str, Any] | None) -> tuple[list[_Pair], Counter[str]]:
    """The most changed images drawn old | new, each image read once; and why the others could not be."""
    pairs: list[_Pair] = []
    failures: Counter[str] = Counter()
    for image in diff.top:
        old_row, new_row = _matched_first(image)
        picture = _picture(new_row, storage_options)
        old = picture if isinstance(picture, str) else _drawn(picture, old_row)
        new = picture if isinstance(picture, str) else _drawn(picture, new_row)
        if isinstance(old, bytes) and isinstance(new, bytes):
            pairs.append((image, old, new))
        else:
            failures[old if isinstance(old, str) else str(new)] += 1
    return pairs, failures


def _matched_first(image: ImageDiff) -> tuple[dict[str, Any], dict[str, Any]]:
    """The image's two rows with their matched instances first, in pair order: ``draw_overlay`` colours
    the i-th instance alike on both sides, so a matched instance keeps its colour from old to new."""
    rows = []
    for side, row in enumerate((image.old_row, image.new_row)):
        assert row is not None  # diff_outputs(keep_rows=True)
        instances = row["instances"] or []
        matched = [int(pair[side]) for pair in image.pairs]
        rest = sorted(set(range(len(instances))) - set(matched))
        rows.append({**row, "instances": [instances[i] for i in matched + rest]})
    return rows[0], rows[1]


def _comparison(diff: Diff, pairs: list[_Pair], failures: Counter[str]) -> str:
    """The page's section on ``diff``: image counts, the per-category table, the changed images."""
    e = html.escape
    n = diff.images
    facts = [("old", f"<code>{e(diff.old)}</code>")]
    facts += [
        (k, f"<code>{e(repr(o))}</code> &rarr; <code>{e(repr(v))}</code>")
        for k, (o, v) in diff.settings.items()
    ]
    facts_html = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in facts)
    total = diff.total()
    cards = [
        ("images in both", f"{n['in_both']:,}"),
        ("compared", f"{n['compared']:,}"),
        ("changed", f"{n['changed']:,}"),
        ("only in old", f"{n['only_in_old']:,}"),
        ("only in new", f"{n['only_in_new']:,}"),
        ("matched mean IoU", _iou(total.mean_iou)),
    ]
    cards_html = "".join(
        f'<div class="card"><div class="value">{e(v)}</div><div class="label">{e(k)}</div></div>'
        for k, v in cards
    )
    notes = [
        f"Instances of the {n['compared']:,} images that both outputs hold as ok rows of the same size, matched "
        f"within a category at IoU &ge; {diff.iou_threshold:g} (masks; boxes for instances without one). "
        f"Error rows: old {n['old_error_rows']:,}, new {n['new_error_rows']:,}."
    ]
    rows = [(e(name), c) for name, c in diff.ordered_categories()] + [("<b>all</b>", total)]
    body = "".join(
        f"<tr><td>{name}</td>"
        + "".join(
            f"<td>{v}</td>"
            for v in (c.old, c.new, _change(c.new - c.old), c.matched, _iou(c.mean_iou), c.added, c.removed)
        )
        + "</tr>"
        for name, c in rows
    )
    heads = "".join(
        f"<th>{h}</th>"
        for h in ("category", "old", "new", "change", "matched", "mean IoU", "added", "removed")
    )
    table = f'<table class="diff"><thead><tr>{heads}</tr></thead><tbody>{body}</tbody></table>'
    figures = []
    for image, old, new in pairs:
        tiles = "".join(
            f'<div><img alt="{side} {e(image.image_id)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
            f'<div class="side">{side}: {count} instance{"s" if count != 1 else ""}</div></div>'
            for side, png, count in (("old", old, image.old_instances), ("new", new, image.new_instances))
        )
        figures.append(
            f'<figure><div class="pair">{tiles}</div><figcaption><b>{e(image.image_id)}</b> &middot; change '
            f"{image.change_score:.2f}: {image.added} added, {image.removed} removed, {image.matched} matched"
            f" (mean IoU {_iou(image.mean_iou)})<br><code>{e(image.uri)}</code></figcaption></figure>"
        )
    if failures:
        skipped = ", ".join(f"{k} {why}" for why, k in failures.most_common())
        notes.append(f"Left out of the changed images: {e(skipped)}.")
    shown = (
        f'<div class="pairs">{"".join(figures)}</div>'
        if figures
        else '<p class="note">No changed image to show.</p>'
    )
    return (
        f'<h2>Compared with the old output <span class="sub">batchseg diff OLD NEW, NEW being this output</span></h2>'
        f'<table class="facts">{facts_html}</table><div class="cards">{cards_html}</div>'
        + "".join(f'<p class="note">{note}</p>' for note in notes)
        + table
        + f'<h3>The {len(figures)} images that changed most <span class="sub">change score: added + removed + '
        "sum of 1 &minus; IoU over matched pairs; old | new</span></h3>" + shown
    )


def _change(value: int) -> str:
    return f"{value:+,}" if value else "0"


def _iou(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.3f}"


def _png(figure: Figure) -> str:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    # Twice the CSS size the page shows (CHART_DPI / 2 pixels per inch): sharp on high-density screens.
    figure.savefig(buffer, format="png", dpi=CHART_DPI, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _axes(title: str, height: float) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(CHART_WIDTH_INCHES, height), layout="constrained")
    ax = figure.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    return figure, ax


def _category_chart(categories: Counter[str]) -> str:
    top = categories.most_common(TOP_CATEGORIES)
    title = "Instances per category"
    if len(categories) > len(top):
        title += f" (top {len(top)} of {len(categories)})"
    figure, ax = _axes(title, max(2.6, 0.8 + 0.2 * len(top)))
    if top:
        top.reverse()  # barh draws bottom up: the most common at the top
        bars = ax.barh([name for name, _ in top], [n for _, n in top], color="#4c72b0")
        ax.bar_label(bars, labels=[f"{n:,}" for _, n in top], padding=2, fontsize=7)
        ax.margins(x=0.15)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("instances", fontsize=9)
    else:
        _no_data(ax)
    return _png(figure)


def _score_chart(scores: np.ndarray) -> str:
    figure, ax = _axes("Detection scores", 2.6)
    if scores.sum():
        ax.bar(
            SCORE_BINS[:-1],
            scores,
            width=np.diff(SCORE_BINS),
            align="edge",
            color="#55a868",
            edgecolor="white",
        )
        ax.set_xlim(0, 1)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("score", fontsize=9)
        ax.set_ylabel("instances", fontsize=9)
    else:
        _no_data(ax)
    return _png(figure)


def _per_image_chart(per_image: Counter[int]) -> str:
    figure, ax = _axes("Instances per image (ok images)", 2.6)
    if per_image:
        counts = sorted(per_image.items())
        ax.bar([k for k, _ in counts], [n for _, n in counts], width=0.8, color="#c44e52")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("instances in the image", fontsize=9)
        ax.set_ylabel("images", fontsize=9)
    else:
        _no_data(ax)
    return _png(figure)


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no instances", ha="center", va="center", fontsize=10, color="#777777")
    ax.set_axis_off()


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


def _page(
    uri: str,
    summary: dict[str, Any] | None,
    provenance: dict[str, Any],
    stats: _Stats,
    totals: dict[str, int],
    tiles: list[tuple[dict[str, Any], bytes]],
    failures: Counter[str],
    comparison: str = "",
) -> str:
    e = html.escape
    about = summary or provenance
    facts = [("output", uri), ("model", about.get("model")), ("weights", about.get("weights"))]
    if summary:
        facts.append(("status", summary.get("status")))
        if "shards_total" in summary:
            facts.append(("shards", f"{summary.get('shards_done')} of {summary['shards_total']} done"))
    facts_html = "".join(
        f"<tr><th>{e(k)}</th><td><code>{e(str(v))}</code></td></tr>" for k, v in facts if v is not None
    )

    cards = [
        ("images", f"{totals['images']:,}"),
        ("ok", f"{totals['ok']:,}"),
        ("errors", f"{totals['error']:,}"),
        ("instances", f"{totals['instances']:,}"),
    ]
    notes = []
    if summary and summary.get("images_per_second") is not None:
        cards.append(("images / s", f"{summary['images_per_second']:,.2f}"))
    if summary and summary.get("wall_seconds") is not None:
        cards.append(("wall time", _duration(float(summary["wall_seconds"]))))
        notes.append(
            f"Throughput and wall time are those of the run that wrote {SUMMARY_FILE}"
            + (f" ({summary['images_this_run']:,} images)." if "images_this_run" in summary else ".")
        )
    if summary is None:
        notes.append(
            f"No {SUMMARY_FILE} in this output (the run has not finished, or was stopped): totals "
            "are counted from the Parquet shards, and throughput is not known."
        )
    elif totals != stats.totals():
        counted = ", ".join(f"{v:,} {k}" for k, v in stats.totals().items())
        notes.append(f"The shards now hold {counted}; {SUMMARY_FILE} was written when its run ended.")
    cards_html = "".join(
        f'<div class="card"><div class="value">{e(v)}</div><div class="label">{e(k)}</div></div>'
        for k, v in cards
    )
    notes_html = "".join(f'<p class="note">{e(n)}</p>' for n in notes)

    if stats.errors:
        rows = []
        for kind, count in stats.errors.most_common():
            examples = "".join(
                f'<li><code>{e(u)}</code><span class="message">{e(m)}</span></li>'
                for u, m in stats.examples.get(kind, [])
            )
            rows.append(
                f'<tr><td><code>{e(kind)}</code></td><td class="num">{count:,}</td>'
                f'<td><ul class="examples">{examples}</ul></td></tr>'
            )
        errors_html = (
            '<table class="errors"><thead><tr><th>kind</th><th>images</th><th>examples</th></tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table>"
        )
    else:
        errors_html = '<p class="note">No error rows.</p>'

    charts = [
        ("instances per category", _category_chart(stats.categories)),
        ("score histogram", _score_chart(stats.scores)),
        ("instances per image", _per_image_chart(stats.per_image)),
    ]
    charts_html = "".join(
        f'<img class="chart" alt="{e(alt)}" src="data:image/png;base64,{data}">' for alt, data in charts
    )

    figures = []
    for row, png in tiles:
        n = len(row["instances"])
        data = base64.b64encode(png).decode("ascii")
        figures.append(
            f'<figure><img alt="{e(str(row["image_id"]))}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{e(str(row['image_id']))}</b> &middot; {n} instance{'s' if n != 1 else ''}"
            f" &middot; {row['width']}&times;{row['height']}<br><code>{e(row['uri'])}</code></figcaption></figure>"
        )
    if failures:
        skipped = ", ".join(f"{n} {why}" for why, n in failures.most_common())
        figures_note = f'<p class="note">Left out of the gallery: {e(skipped)}.</p>'
    else:
        figures_note = ""
    gallery_html = (
        f'<div class="gallery">{"".join(figures)}</div>'
        if figures
        else '<p class="note">No ok image with instances to show.</p>'
    )

    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return PAGE.substitute(
        uri=e(uri),
        facts=facts_html,
        cards=cards_html,
        notes=notes_html,
        errors=errors_html,
        charts=charts_html,
        shown=len(tiles),
        gallery_note=figures_note,
        gallery=gallery_html,
        compare=comparison,
        version=e(__version__),
        generated=e(generated),
    )
