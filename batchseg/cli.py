"""The ``batchseg`` command line: argument parsing and wiring only; the work lives in the modules."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from batchseg import __version__, log
from batchseg.errors import BatchsegError
from batchseg.inference.registry import DEFAULT_MODEL, MODELS, TRAINABLE


def _actors(text: str) -> tuple[int, int]:
    try:
        low, _, high = text.partition(",")
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, not {text!r}") from None


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 640,672,704, not {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.9,0.99, not {text!r}") from None


def _uri(text: str) -> str:
    """A path or fsspec URI: an empty one would silently mean the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path or URI, not an empty string")
    return text


def _at_least(minimum: int) -> Any:
    """An argparse type: a whole number no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    """An argparse type: a number more than 0 and at most 1 (NaN is neither)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, not {text}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _keep_columns(text: str) -> Any:
    if text.strip() == "all":
        return "all"
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected 'all' or column names separated by commas, not {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"names a column twice: {text!r}")
    return names


def add_segment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--manifest",
        required=True,
        type=_uri,
        help="Parquet/CSV/JSONL file with a 'uri' column (optional 'image_id'), a text file of URIs, "
        "or a folder/prefix of images; any fsspec URI",
    )
    p.add_argument(
        "--output", required=True, type=_uri, help="output folder/prefix for Parquet shards (any fsspec URI)"
    )
    p.add_argument(
        "--model",
        choices=list(MODELS),
        default=None,
        help=f"detection model (default: the checkpoint's, else {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--weights",
        default="DEFAULT",
        help="DEFAULT (torchvision's COCO weights), a torchvision weights name, a checkpoint path or "
        "URI (state_dict or batchseg training checkpoint), or 'none' for random weights",
    )
    p.add_argument("--score-threshold", type=float, default=0.5, help="drop instances scoring below this")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="mask probability threshold")
    p.add_argument("--min-size", type=int, default=None, help="model's resize: shorter side (default 800)")
    p.add_argument(
        "--max-size", type=int, default=None, help="model's resize: longer side cap (default 1333)"
    )
    p.add_argument(
        "--max-instances", type=int, default=100, help="keep at most this many instances per image"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="images with more pixels become 'too_large' error rows (decompression bombs)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per model call")
    p.add_argument(
        "--shard-size", type=int, default=1000, help="images per output file (unit of retry/resume)"
    )
    p.add_argument("--actors", type=_actors, default=(1, 1), help="model actors: N, or MIN,MAX to autoscale")
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="default: 1 when the cluster has GPUs, else 0 (CPU)",
    )
    p.add_argument(
        "--cpus-per-actor",
        type=float,
        default=None,
        help="default: 2 with GPUs; else the cluster's CPUs / max actors (also torch threads)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="auto: bf16 autocast on GPU, fp32 on CPU",
    )
    p.add_argument(
        "--decode",
        choices=["auto", "pil", "torchvision"],
        default="auto",
        help="JPEG decoding: torchvision decodes batches on the model's device (nvJPEG on GPU); "
        "auto: torchvision on GPU, PIL on CPU",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        default=64,
        help="image reads in flight per actor, ahead of the model: hides storage latency: give it twice "
        "img/s x seconds per GET (64 feeds 130 img/s behind up to 0.25 s); at most this many encoded images wait in memory",
    )
    p.add_argument(
        "--io-threads",
        type=int,
        default=4,
        help="threads per actor checking and decoding fetched images (and encoding masks on a GPU)",
    )
    p.add_argument("--max-attempts", type=int, default=3, help="tries per shard before it is reported failed")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        help="seconds to wait for a connection to storage before trying again (default 10)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=None,
        help="seconds to wait for storage's next bytes before trying again (default 30); an image read "
        "as a whole gets connect + 2 x read timeout",
    )
    p.add_argument(
        "--keep-columns",
        type=_keep_columns,
        default=None,
        metavar="A,B,C|all",
        help="manifest columns to carry into each output row (typed from Parquet/JSONL, text from CSV); "
        "'all': every column but uri and image_id",
    )
    p.add_argument("--overwrite", action="store_true", help="discard an existing output and start over")
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local Ray)"
    )
    _storage_options(p)


def segment_config(args: argparse.Namespace) -> Any:
    from batchseg.segment.job import SegmentConfig

    names = SegmentConfig.__dataclass_fields__
    # An option left unset takes SegmentConfig's default (the CLI does not import the image code for it).
    return SegmentConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def cmd_segment(args: argparse.Namespace) -> int:
    from batchseg.segment.driver import run_segment

    summary = run_segment(segment_config(args))
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


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--images", required=True, type=_uri, help="folder/prefix the annotations' file names are relative to"
    )
    p.add_argument("--annotations", required=True, type=_uri, help="COCO instances JSON (any fsspec URI)")
    p.add_argument(
        "--output",
        required=True,
        type=_uri,
        help="run folder (any fsspec URI): checkpoints, then model.pt; rerunning resumes",
    )
    p.add_argument("--model", default="maskrcnn_small", choices=TRAINABLE)
    p.add_argument(
        "--weights",
        default="none",
        help="none (from scratch), DEFAULT (torchvision's COCO weights, heads replaced), or a checkpoint",
    )
    p.add_argument("--workers", type=int, default=1, help="data-parallel (DDP) workers")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=float, default=None, help="also torch threads (default 1)")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--iterations", type=int, help="optimizer steps in all")
    length.add_argument("--epochs", type=int, help="passes over the data set")
    p.add_argument("--batch-size", type=int, default=8, help="images per step per worker")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument(
        "--lr", type=float, default=None, help="default: 1e-3 (AdamW), 0.02 x total batch / 16 (SGD)"
    )
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument(
        "--betas",
        type=_floats,
        default=(0.9, 0.999),
        help="AdamW's decay rates of the gradient's moving averages, B1,B2 (default 0.9,0.999; a B2 of "
        "0.99 suits runs of a few thousand steps)",
    )
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine")
    p.add_argument(
        "--warmup-iterations", type=int, default=None, help="default: min(100, a tenth of the run)"
    )
    p.add_argument(
        "--min-sizes",
        type=_sizes,
        default=None,
        help="multi-scale training: shorter sides, comma-separated, one drawn per batch; the last is "
        "used for validation (default: the model's, e.g. 640..800, or 112,144,128 for maskrcnn_small)",
    )
    p.add_argument("--max-size", type=int, default=None, help="longer side cap (default: the model's)")
    p.add_argument(
        "--rois-per-image",
        type=int,
        default=None,
        help="proposals per image the box and mask heads learn from, a quarter at most positive (default: "
        "the model's, 512, or 64 for maskrcnn_small); fewer make a step cheaper",
    )
    p.add_argument("--grad-clip", type=float, default=10.0, help="max gradient norm (0: off)")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="mixed precision (auto: on GPU bf16 where supported, else fp16; on CPU fp32). bf16 on CPU: "
        "faster where the CPU has bf16 units (AMX, AVX512-BF16), slower elsewhere",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="iterations between checkpoints (default: an epoch)",
    )
    p.add_argument("--validation-images", type=_uri, default=None)
    p.add_argument(
        "--validation-annotations", type=_uri, default=None, help="COCO AP is computed at each checkpoint"
    )
    p.add_argument(
        "--max-failures", type=int, default=2, help="worker failures survived (resume from checkpoint)"
    )
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local Ray)"
    )
    _storage_options(p)


def _not_over_the_output(output: str, **targets: str | None) -> None:
    """Refuse a file to write that would replace one of batchseg's own files in ``output``."""
    from batchseg.format.output import owned_by

    for option, target in targets.items():
        if target and owned_by(output, target):
            raise BatchsegError(f"--{option} {target} would overwrite batchseg's own file in {output}")


def cmd_train(args: argparse.Namespace) -> int:
    from batchseg.train.trainer import TrainConfig, run_training

    names = TrainConfig.__dataclass_fields__
    metrics = run_training(TrainConfig(**{k: v for k, v in vars(args).items() if k in names}))
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from batchseg.analysis.evaluate import evaluate, format_table
    from batchseg.errors import job_errors
    from batchseg.io import storage
    from batchseg.io.manifest import absolute_uri

    if args.json and absolute_uri(args.json) == absolute_uri(args.annotations):
        raise BatchsegError(f"--json {args.json} is also --annotations: it would overwrite them")
    _not_over_the_output(args.predictions, json=args.json)
    results = evaluate(args.predictions, args.annotations, args.storage_options)
    print(format_table(results))
    if args.json:
        with job_errors(f"cannot write {args.json}"):
            fs, path = storage.filesystem(args.json, args.storage_options)
            fs.pipe_file(path, json.dumps(results, indent=2).encode())
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from batchseg.analysis.query import run_query

    _not_over_the_output(args.output, out=args.out)
    print(run_query(args.output, args.sql, args.format, args.out, args.storage_options))
    return 0


def cmd_export_coco(args: argparse.Namespace) -> int:
    from batchseg.analysis.export import export_coco

    _not_over_the_output(args.output, out=args.out, images=args.images)
    counts = export_coco(args.output, args.out, args.images, args.storage_options)
    print(
        f"{counts['instances']} instances of {counts['images']} images written to {args.out}"
        f"{f' (images and categories: {args.images})' if args.images else ''}; "
        f"{counts['skipped_rows']} error rows left out"
    )
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from batchseg.analysis.query import ok_images
    from batchseg.analysis.render import render_rows

    rows = ok_images(args.output, args.where, args.limit, args.storage_options)
    written = render_rows(rows, args.out, args.style, args.storage_options)
    print(f"{len(written)} images rendered to {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from batchseg.analysis.report import build_report

    for output in filter(None, (args.output, args.compare)):
        _not_over_the_output(output, out=args.out)
    build_report(args.output, args.out, args.storage_options, args.gallery, compare=args.compare)
    print(f"report written to {args.out}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from batchseg.analysis.diff import check_options, diff_outputs
    from batchseg.errors import job_errors
    from batchseg.io import atomic, storage
    from batchseg.io.manifest import absolute_uri

    check_options(args.iou, args.top, args.out)
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
    print(diff.format())
    if args.out:
        print(
            f"\nper-image table ({diff.images['in_both']:,} images in both) written to {args.out}"
            f"{diff.kept_note()}"
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
        type=_json_object,
        default={},
        help='JSON passed to fsspec, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line like every other error (``--help`` has the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchseg", description="Mask R-CNN over large image archives, on Ray.")
    parser.add_argument("--version", action="version", version=f"batchseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    segment = _command(
        sub, "segment", "segment every image of a manifest into Parquet shards", cmd_segment, RERUN_RESUMES
    )
    add_segment_arguments(segment)

    synth = _command(
        sub, "synth", "write a synthetic shapes data set: images, COCO annotations, manifest", cmd_synth
    )
    synth.add_argument(
        "--output", required=True, type=_uri, help="folder/prefix to write to (any fsspec URI)"
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
    add_train_arguments(train)

    evaluation = _command(
        sub, "eval", "COCO box and mask AP of a segment output against annotations", cmd_eval
    )
    evaluation.add_argument(
        "--predictions", required=True, type=_uri, help="output folder of batchseg segment"
    )
    evaluation.add_argument("--annotations", required=True, type=_uri, help="COCO instances JSON")
    evaluation.add_argument(
        "--json", type=_uri, default=None, help='also write {"bbox": {"AP": ...}, "segm": {...}} here'
    )
    _storage_options(evaluation)

    query = _command(
        sub, "query", "SQL over an output: views images (one row per image) and instances", cmd_query
    )
    query.add_argument("output", type=_uri, help="output folder of batchseg segment (any fsspec URI)")
    query.add_argument("sql", help='e.g. "SELECT category, count(*) FROM instances GROUP BY 1"')
    query.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    query.add_argument(
        "--out",
        type=_uri,
        default=None,
        help="write all rows here instead of printing the first ones (in --format, else as its name "
        "says: .csv, .jsonl, .parquet)",
    )
    _storage_options(query)

    export = _command(
        sub, "export-coco", "write the detections in COCO results format (loadRes)", cmd_export_coco
    )
    export.add_argument("output", type=_uri, help="output folder of batchseg segment")
    export.add_argument("--out", required=True, type=_uri, help="COCO results JSON to write")
    export.add_argument(
        "--images", type=_uri, default=None, help="also write the matching COCO images and categories here"
    )
    _storage_options(export)

    render = _command(
        sub, "render", "draw masks, boxes, labels (and keypoints) over the images, as PNG", cmd_render
    )
    render.add_argument("output", type=_uri, help="output folder of batchseg segment")
    render.add_argument("--out", required=True, type=_uri, help="folder for the PNG files")
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
    _storage_options(render)

    report = _command(sub, "report", "one static HTML report: totals, errors, charts, a gallery", cmd_report)
    report.add_argument("output", type=_uri, help="output folder of batchseg segment")
    report.add_argument("--out", required=True, type=_uri, help="HTML file to write")
    report.add_argument(
        "--gallery", type=_at_least(0), default=12, help="how many rendered images to include"
    )
    report.add_argument(
        "--compare",
        type=_uri,
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
    diff.add_argument("old", type=_uri, help="output folder of batchseg segment: the one compared against")
    diff.add_argument("new", type=_uri, help="output folder of batchseg segment")
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
        type=_uri,
        default=None,
        help="also write the per-image table here, in the format its name says (.csv, .jsonl, .parquet)",
    )
    diff.add_argument("--json", type=_uri, default=None, help="also write the figures as JSON here")
    _storage_options(diff)

    check = _command(
        sub,
        "verify",
        "check an output fully: every shard against its record, its rows against the manifest (exit 1 "
        "when anything is wrong)",
        cmd_verify,
    )
    check.add_argument("output", type=_uri, help="output folder of batchseg segment")
    check.add_argument(
        "--manifest", type=_uri, default=None, help="the manifest to check against (default: the job's)"
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
        "--output", type=_uri, default="demo-output", help="folder for the demo's images and results"
    )
    demo.add_argument("--images", type=_at_least(1), default=50, help="how many images to generate")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    log.to_stderr()
    args = build_parser().parse_args(argv)
    if args.verbose:
        log.set_verbose()
    try:
        return int(args.run(args))
    except BatchsegError as e:
        log.error(e)
        return 2
    except KeyboardInterrupt:
        log.logger.info(f"interrupted; {args.interrupted}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
