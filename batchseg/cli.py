"""The ``batchseg`` command line: argument parsing and wiring only; the work lives in the modules."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from batchseg import __version__, log, options
from batchseg.errors import BatchsegError, stop_on_signals, stopped_by
from batchseg.segment.config import SegmentConfig
from batchseg.train.config import TrainConfig


def _at_least(minimum: int) -> Any:
    """An argparse type: a whole number no smaller than ``minimum``."""
    return options.checked(int, options.at_least(minimum))


# An argparse type: a number more than 0 and at most 1 (NaN is neither).
_fraction = options.checked(
    float, lambda v: None if 0 < v <= 1 else f"must be more than 0 and at most 1, not {v}"
)


def _region(text: str) -> tuple[int, int, int, int]:
    """An argparse type: ``LEFT,TOP,WIDTH,HEIGHT`` in image pixels (``render.check_picture_options``)."""
    from batchseg.analysis.render import check_picture_options

    region = options.numbers(int, "LEFT,TOP,WIDTH,HEIGHT e.g. 0,0,2048,2048")(text)
    try:
        check_picture_options(1, region)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return (region[0], region[1], region[2], region[3])


def cmd_segment(args: argparse.Namespace) -> int:
    from batchseg.segment.config import SegmentConfig
    from batchseg.segment.driver import run_segment

    summary = run_segment(options.from_args(SegmentConfig, args))
    print(json.dumps(summary, indent=2))
    return 0 if summary["status"] == "complete" else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from batchseg.demo import run_demo

    return run_demo(args.output, args.images)


def cmd_synth(args: argparse.Namespace) -> int:
    from batchseg.train.synth import write_dataset

    data = write_dataset(
        args.output, args.images, seed=args.seed, size=args.size, storage_options=args.storage_options
    )
    print(
        json.dumps(
            {
                "images": data.images,
                "annotations": data.annotations,
                "manifest": data.manifest,
                "count": len(data.uris),
            },
            indent=2,
        )
    )
    return 0


def _not_over_the_output(output: str, **targets: str | None) -> None:
    """Refuse a file to write that would replace one of batchseg's own files in ``output``."""
    from batchseg.format.output import owned_by

    for option, target in targets.items():
        if target and owned_by(output, target):
            raise BatchsegError(f"--{option} {target} would overwrite batchseg's own file in {output}")


def _say(text: str, *targets: str | None) -> None:
    """Print ``text`` for the user: on stderr where one of ``targets`` (the files a command writes) is
    ``-``, stdout, whose file the text would corrupt."""
    from batchseg.io.storage import STDOUT

    print(text, file=sys.stderr if STDOUT in targets else sys.stdout)


def cmd_train(args: argparse.Namespace) -> int:
    from batchseg.train.config import TrainConfig
    from batchseg.train.trainer import run_training

    metrics = run_training(options.from_args(TrainConfig, args))
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def cmd_coco_to_parquet(args: argparse.Namespace) -> int:
    from batchseg.train.parquet import coco_to_parquet

    record = coco_to_parquet(args.images, args.annotations, args.output, args.storage_options)
    print(
        f"{record['instances']} instances of {record['images']} images written to {args.output} "
        f"({record['files']} Parquet file{'' if record['files'] == 1 else 's'}); train on it with "
        f"--annotations {args.output}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from batchseg.analysis.evaluate import evaluate_output, format_table
    from batchseg.errors import job_errors
    from batchseg.io import atomic, storage
    from batchseg.io.manifest import absolute_uri

    if args.json and absolute_uri(args.json) == absolute_uri(args.annotations):
        raise BatchsegError(f"--json {args.json} is also --annotations: it would overwrite them")
    _not_over_the_output(args.predictions, json=args.json)
    results = evaluate_output(args.predictions, args.annotations, args.storage_options)
    _say(format_table(results), args.json)
    if args.json:
        with job_errors(f"cannot write {args.json}"):
            fs, path = storage.filesystem(args.json, args.storage_options)
            atomic.write(fs, path, json.dumps(results, indent=2).encode())
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from batchseg.analysis.query import run_query

    _not_over_the_output(args.output, out=args.out)
    _say(run_query(args.output, args.sql, args.format, args.out, args.storage_options), args.out)
    return 0


def cmd_export_coco(args: argparse.Namespace) -> int:
    from batchseg.analysis.export import export_coco

    _not_over_the_output(args.output, out=args.out, images=args.images)
    counts = export_coco(args.output, args.out, args.images, args.storage_options)
    _say(
        f"{counts['instances']} instances of {counts['images']} images written to {args.out}"
        f"{f' (images and categories: {args.images})' if args.images else ''}; "
        f"{counts['skipped_rows']} error rows left out",
        args.out,
        args.images,
    )
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from batchseg.analysis.query import ok_images
    from batchseg.analysis.render import render_rows

    rows = ok_images(args.output, args.where, args.limit, args.storage_options)
    written = render_rows(rows, args.out, args.style, args.storage_options, args.max_side, args.region)
    print(f"{len(written)} images rendered to {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from batchseg.analysis.report import build_report

    for output in filter(None, (args.output, args.compare)):
        _not_over_the_output(output, out=args.out)
    build_report(args.output, args.out, args.storage_options, args.gallery, compare=args.compare)
    _say(f"report written to {args.out}", args.out)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from batchseg.analysis.diff import check_diff_options, diff_outputs
    from batchseg.errors import job_errors
    from batchseg.io import atomic, storage
    from batchseg.io.manifest import absolute_uri

    check_diff_options(args.iou, args.top, args.out)
    if args.out and args.json and absolute_uri(args.out) == absolute_uri(args.json):
        raise BatchsegError(f"--json {args.json} is also --out")
    for output in (args.old, args.new):
        _not_over_the_output(output, out=args.out, json=args.json)
    diff = diff_outputs(
        args.old,
        args.new,
        iou_threshold=args.iou,
        top=args.top,
        out=args.out,
        storage_options=args.storage_options,
    )
    _say(diff.format(), args.out, args.json)
    if args.out:
        _say(
            f"\nper-image table ({diff.images['in_both']:,} images in both) written to {args.out}"
            f"{diff.kept_note()}",
            args.out,
            args.json,
        )
    if args.json:
        with job_errors(f"cannot write {args.json}"):
            fs, path = storage.filesystem(args.json, args.storage_options)
            atomic.write(fs, path, json.dumps(diff.summary(), indent=2).encode())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from batchseg.analysis.verify import verify

    verdict = verify(args.output, args.manifest, args.storage_options)
    print(verdict.line())
    for problem in verdict.problems[: args.show]:
        print(f"  {problem}")
    if len(verdict.problems) > args.show:
        print(f"  ... and {len(verdict.problems) - args.show:,} more")
    return 0 if verdict.ok else 1


RERUN_RESUMES = "finished shards are kept, and rerunning the same command resumes"


def _command(
    sub: Any, name: str, help: str, run: Any, interrupted: str = "it may have written part of its output"
) -> argparse.ArgumentParser:
    """A subcommand with the options every command takes (``--verbose``)."""
    command: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    command.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="on an error, also show its causes and traceback (or set BATCHSEG_DEBUG=1)",
    )
    command.set_defaults(run=run, interrupted=interrupted)
    return command


def _storage_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--storage-options",
        type=options.json_object,
        default={},
        help=options.STORAGE_OPTIONS_HELP,
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line like every other error (``--help`` has the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from batchseg.analysis.render import DEFAULT_MAX_SIDE

    parser = _Parser(prog="batchseg", description="Mask R-CNN over large image archives, on Ray.")
    parser.add_argument("--version", action="version", version=f"batchseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    segment = _command(
        sub, "segment", "segment every image of a manifest into Parquet shards", cmd_segment, RERUN_RESUMES
    )
    options.add_arguments(segment, SegmentConfig)

    synth = _command(
        sub, "synth", "write a synthetic shapes data set: images, COCO annotations, manifest", cmd_synth
    )
    synth.add_argument(
        "--output", required=True, type=options.uri, help="folder/prefix to write to (any fsspec URI)"
    )
    synth.add_argument("--images", type=_at_least(1), required=True, help="how many images")
    synth.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes")
    synth.add_argument("--size", type=_at_least(16), default=128, help="approximate image side in pixels")
    _storage_options(synth)

    train = _command(
        sub,
        "train",
        "train or fine-tune Mask R-CNN on COCO-format data with Ray Train",
        cmd_train,
        "checkpoints are kept, and rerunning the same command resumes from the last",
    )
    options.add_arguments(train, TrainConfig)

    convert = _command(
        sub,
        "coco-to-parquet",
        "convert a COCO instances JSON once into a Parquet training set (train --annotations takes it): "
        "rows of a segment output's columns, masks as RLE, streamed in row groups",
        cmd_coco_to_parquet,
    )
    convert.add_argument(
        "--images",
        required=True,
        type=options.uri,
        help="folder/prefix the JSON's file names are relative to",
    )
    convert.add_argument("--annotations", required=True, type=options.uri, help="COCO instances JSON")
    convert.add_argument(
        "--output", required=True, type=options.uri, help="new folder for the training set (any fsspec URI)"
    )
    _storage_options(convert)

    evaluation = _command(
        sub, "eval", "COCO box and mask AP of a segment output against annotations", cmd_eval
    )
    evaluation.add_argument(
        "--predictions", required=True, type=options.uri, help="output folder of batchseg segment"
    )
    evaluation.add_argument("--annotations", required=True, type=options.uri, help="COCO instances JSON")
    evaluation.add_argument(
        "--json", type=options.uri, default=None, help='also write {"bbox": {"AP": ...}, "segm": {...}} here'
    )
    _storage_options(evaluation)

    query = _command(
        sub, "query", "SQL over an output: views images (one row per image) and instances", cmd_query
    )
    query.add_argument("output", type=options.uri, help="output folder of batchseg segment (any fsspec URI)")
    query.add_argument("sql", help='e.g. "SELECT category, count(*) FROM instances GROUP BY 1"')
    query.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    query.add_argument(
        "--out",
        type=options.uri,
        default=None,
        help="write all rows here instead of printing the first ones (in --format, else as its name "
        "says: .csv, .jsonl, .parquet)",
    )
    _storage_options(query)

    export = _command(
        sub, "export-coco", "write the detections in COCO results format (loadRes)", cmd_export_coco
    )
    export.add_argument("output", type=options.uri, help="output folder of batchseg segment")
    export.add_argument("--out", required=True, type=options.uri, help="COCO results JSON to write")
    export.add_argument(
        "--images",
        type=options.uri,
        default=None,
        help="also write the matching COCO images and categories here",
    )
    _storage_options(export)

    render = _command(
        sub, "render", "draw masks, boxes, labels (and keypoints) over the images, as PNG", cmd_render
    )
    render.add_argument("output", type=options.uri, help="output folder of batchseg segment")
    render.add_argument("--out", required=True, type=options.uri, help="folder for the PNG files")
    render.add_argument("--limit", type=_at_least(1), default=None, help="at most this many images")
    render.add_argument(
        "--where", default=None, help="SQL condition on the images view, e.g. \"uri LIKE '%%cat%%'\""
    )
    render.add_argument(
        "--style",
        choices=["overlay", "splash"],
        default="overlay",
        help="splash: objects keep their colour, the rest turns grey",
    )
    render.add_argument(
        "--max-side",
        type=_at_least(1),
        default=DEFAULT_MAX_SIDE,
        metavar="PIXELS",
        help=f"draw a larger image (or region) scaled down to this many pixels on its longer side, read from "
        f"a pyramid level where the file has one (default {DEFAULT_MAX_SIDE})",
    )
    render.add_argument(
        "--region",
        type=_region,
        default=None,
        metavar="LEFT,TOP,WIDTH,HEIGHT",
        help="draw only this part of each image (in its full-size pixels; instances outside it are left out)",
    )
    _storage_options(render)

    report = _command(sub, "report", "one static HTML report: totals, errors, charts, a gallery", cmd_report)
    report.add_argument("output", type=options.uri, help="output folder of batchseg segment")
    report.add_argument("--out", required=True, type=options.uri, help="HTML file to write")
    report.add_argument(
        "--gallery", type=_at_least(0), default=12, help="how many rendered images to include"
    )
    report.add_argument(
        "--compare",
        type=options.uri,
        default=None,
        help="an older output of the same images: adds batchseg diff's figures and its most changed "
        "images side by side (old | new), as many as --gallery",
    )
    _storage_options(report)

    diff = _command(
        sub,
        "diff",
        "compare two outputs of the same images (other model, weights or thresholds): instances per "
        "category, matched by IoU, added and removed, and the images that changed most",
        cmd_diff,
    )
    diff.add_argument(
        "old", type=options.uri, help="output folder of batchseg segment: the one compared against"
    )
    diff.add_argument("new", type=options.uri, help="output folder of batchseg segment")
    diff.add_argument(
        "--iou",
        type=_fraction,
        default=0.5,
        help="instances of a category match when their mask IoU (box IoU without masks) is at least this "
        "(default 0.5)",
    )
    diff.add_argument(
        "--top",
        type=_at_least(1),
        default=10,
        help="how many of the most changed images to print (default 10)",
    )
    diff.add_argument(
        "--out",
        type=options.uri,
        default=None,
        help="also write the per-image table here, in the format its name says (.csv, .jsonl, .parquet)",
    )
    diff.add_argument("--json", type=options.uri, default=None, help="also write the figures as JSON here")
    _storage_options(diff)

    check = _command(
        sub,
        "verify",
        "check an output fully: every shard against its record, its rows against the manifest (exit 1 "
        "when anything is wrong)",
        cmd_verify,
    )
    check.add_argument("output", type=options.uri, help="output folder of batchseg segment")
    check.add_argument(
        "--manifest",
        type=options.uri,
        default=None,
        help="the manifest to check against (default: the job's)",
    )
    check.add_argument("--show", type=_at_least(0), default=20, help="how many problems to print")
    _storage_options(check)

    demo = _command(
        sub,
        "demo",
        "segment a generated held-out archive with the shipped small model, show AP",
        cmd_demo,
        RERUN_RESUMES,
    )
    demo.add_argument(
        "--output", type=options.uri, default="demo-output", help="folder for the demo's images and results"
    )
    demo.add_argument("--images", type=_at_least(1), default=50, help="how many images to generate")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    stop_on_signals()  # first: a SIGTERM or SIGHUP while torch or Ray start is handled too
    log.to_stderr()
    args = build_parser().parse_args(argv)
    if args.verbose:
        log.set_verbose()
    try:
        return int(args.run(args))
    except BatchsegError as e:
        log.error(e)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP: 128 + its number, as a shell reports it
        signum = stopped_by(e)
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        log.logger.info(f"{how}; {args.interrupted}")
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
