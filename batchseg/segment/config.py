"""``batchseg segment``'s options, each declared once: :class:`SegmentConfig` is the Python API, and the
command line, ``--help``, the checks, Ray Data's ``Segmenter`` and README's table are made from it. No
torch here: ``batchseg --help`` builds its parser from this module."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchseg.inference.registry import (
    DEFAULT_MODEL,
    MODELS,
    PRECISIONS,
    ModelSpec,
    resize_order,
    resize_problem,
)
from batchseg.io import storage
from batchseg.io.images import DEFAULT_MAX_PIXELS
from batchseg.options import (
    STORAGE_OPTIONS_HELP,
    at_least,
    between,
    json_object,
    not_empty,
    option,
    positive,
    ray_share,
    uri,
)

if TYPE_CHECKING:
    from batchseg.io.manifest import Keep

SMALL = MODELS["maskrcnn_small"]
MAX_INSTANCES = 100  # --max-instances' default for an image the model takes whole
MAX_TILED_INSTANCES = 10_000  # and for a tiled one, which can hold thousands (slides, scenes, mosaics)
MIN_TILE = 32  # the smallest --tile: below it the backbone's coarsest maps (stride 32) have no pixel  # the defaults' exception, named in the help
# "device" decodes JPEG batches with torchvision on the model's device; "torchvision" is its older name.
ON_DEVICE = ("device", "torchvision")
DECODERS = ("auto", "pil", *ON_DEVICE)


def parse_actors(text: str) -> tuple[int, int]:
    try:
        low, _, high = text.partition(",")
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, not {text!r}") from None


def check_actors(actors: tuple[int, int]) -> str | None:
    low, high = actors
    return None if 1 <= low <= high else f"must be N or MIN,MAX with 1 <= MIN <= MAX, not {low},{high}"


def parse_keep_columns(text: str) -> Keep:
    if text.strip() == "all":
        return "all"
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected 'all' or column names separated by commas, not {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"names a column twice: {text!r}")
    return names


def check_keep_columns(keep: Any) -> str | None:
    from batchseg.format.records import name_clashes  # Arrow: loaded when a job is checked, not for --help

    if keep == "all":
        return None
    if not (isinstance(keep, tuple) and all(isinstance(k, str) and k for k in keep)):
        return f"must be 'all' or column names, not {keep!r}"
    clashes = name_clashes(keep)
    return f": {clashes}; rename them in the manifest" if clashes else None


@dataclass(frozen=True)
class SegmentConfig:
    """Everything ``batchseg segment`` is told; see ``batchseg segment --help`` for each option."""

    manifest: str = option(
        help="Parquet/CSV/JSONL file with a 'uri' column (optional 'image_id'), a text file of URIs, or a "
        "folder/prefix of images; any fsspec URI",
        parse=uri,
    )
    output: str = option(help="output folder/prefix for Parquet shards (any fsspec URI)", parse=uri)
    model: str | None = option(
        None,
        "detection model",
        parse=str,
        choices=tuple(MODELS),
        default_text=f"the checkpoint's, else {DEFAULT_MODEL}",
    )
    weights: str = option(
        "DEFAULT",
        "DEFAULT (torchvision's COCO weights), a torchvision weights name, a checkpoint path or URI "
        "(state_dict or batchseg training checkpoint), or 'none' for random weights",
        check=not_empty("DEFAULT, a weights name, a checkpoint or none"),
    )
    score_threshold: float = option(0.5, "drop instances scoring below this", check=between(0, 1))
    mask_threshold: float = option(0.5, "mask probability threshold", check=between(0, 1, high_open=True))
    min_size: int | None = option(
        None,
        "the model's resize: shorter side, in pixels",
        parse=int,
        check=resize_problem,
        default_text="the size a batchseg checkpoint was trained at, else the model's own "
        f"({ModelSpec.min_size}, or {SMALL.min_size} for {SMALL.name})",
    )
    max_size: int | None = option(
        None,
        "the model's resize: longer side's cap, in pixels",
        parse=int,
        check=resize_problem,
        default_text=f"the checkpoint's, else the model's own ({ModelSpec.max_size}, or {SMALL.max_size} for "
        f"{SMALL.name})",
    )
    max_instances: int | None = option(
        None,
        "keep at most this many instances per image",
        parse=int,
        check=at_least(1),
        default_text=f"{MAX_INSTANCES}, or {MAX_TILED_INSTANCES} for a tiled image",
    )
    tile: int | None = option(
        None,
        "cut an image larger than SIZE x SIZE into overlapping tiles of this size, each given the model's usual "
        "resize (a tile near --min-size runs at native scale), tiles of one or many images sharing batches; "
        "each image is still one row, its instances stitched in its own pixels (see README: Huge images); "
        "tiled TIFFs are read window by window",
        parse=int,
        check=at_least(MIN_TILE),
        metavar="SIZE",
        default_text="off: every image resized whole",
    )
    tile_overlap: int | None = option(
        None,
        "pixels neighbouring tiles share; an object smaller than this is seen whole by some tile, a larger "
        "one is merged from its parts",
        parse=int,
        check=at_least(0),
        metavar="PIXELS",
        default_text="a quarter of --tile",
    )
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        "images with more pixels become 'too_large' error rows (decompression bombs)",
        check=at_least(1),
    )
    batch_size: int = option(4, "images per model call", check=at_least(1))
    shard_size: int = option(1000, "images per output file (the unit of retry and resume)", check=at_least(1))
    actors: tuple[int, int] = option(
        (1, 1),
        "model actors: N, or MIN,MAX to autoscale",
        parse=parse_actors,
        check=check_actors,
        metavar="N|MIN,MAX",
        default_text="1",
    )
    gpus_per_actor: float | None = option(
        None,
        "GPUs per actor",
        parse=float,
        check=ray_share("GPUs", zero=True),
        default_text="1 when the cluster has GPUs, else 0 (CPU)",
    )
    cpus_per_actor: float | None = option(
        None,
        "CPUs per actor (also its torch threads)",
        parse=float,
        check=ray_share("CPUs", zero=False),
        default_text="2 with GPUs; else the cluster's CPUs / the most actors",
    )
    precision: str = option(
        "auto",
        "mixed precision, boxes always in fp32; auto: bf16 autocast on a GPU that has it natively, else fp16; "
        "fp32 on CPU",
        choices=PRECISIONS,
    )
    decode: str = option(
        "auto",
        "JPEG decoding: device decodes batches with torchvision on the model's device (nvJPEG on GPU; "
        "'torchvision' is its older name); auto: device on GPU, PIL on CPU",
        choices=DECODERS,
    )
    io_threads: int = option(
        4,
        "threads per actor checking and decoding fetched images (and encoding masks on a GPU)",
        check=at_least(1),
    )
    prefetch: int = option(
        64,
        "image reads in flight per shard (an actor holds two), ahead of the model: hides storage latency: "
        "give it twice img/s x seconds per GET (64 feeds 130 img/s behind up to 0.25 s); at most this many "
        "encoded images wait in memory per shard",
        check=at_least(1),
    )
    max_attempts: int = option(3, "tries per shard before it is reported failed", check=at_least(1))
    actor_start_timeout: float = option(
        600.0,
        "seconds an actor may take to start (be placed on a node with its CPUs and GPUs, and load its "
        "model); if none has started by then, the job ends saying what the cluster lacks; if some have, "
        "it goes on with them",
        check=positive("positive seconds"),
    )
    keep_columns: Keep = option(
        (),
        "manifest columns to carry into each output row (typed from Parquet/JSONL, text from CSV); 'all': "
        "every column but uri and image_id",
        parse=parse_keep_columns,
        check=check_keep_columns,
        metavar="A,B,C|all",
        default_text="none",
    )
    overwrite: bool = option(False, "discard an existing output and start over")
    address: str | None = option(
        None, "Ray cluster address", parse=str, default_text="RAY_ADDRESS, else local Ray"
    )
    connect_timeout: float = option(
        storage.CONNECT_TIMEOUT,
        "seconds to wait for a connection to storage before trying again",
        check=positive("positive seconds"),
    )
    read_timeout: float = option(
        storage.READ_TIMEOUT,
        "seconds to wait for storage's next bytes before trying again; an image read as a whole gets "
        "connect + 2 x read timeout",
        check=positive("positive seconds"),
    )
    storage_options: dict[str, Any] = option(help=STORAGE_OPTIONS_HELP, parse=json_object, factory=dict)

    def relations(self) -> list[tuple[bool, str]]:
        return [
            resize_order(() if self.min_size is None else (self.min_size,), self.max_size, "--min-size"),
            (self.tile_overlap is None or self.tile is not None, "--tile-overlap needs --tile"),
            (
                self.tile is None or self.overlap < self.tile,
                f"--tile-overlap must be below --tile ({self.tile}), not {self.tile_overlap}",
            ),
        ]

    @property
    def overlap(self) -> int:
        """The pixels neighbouring tiles share: ``--tile-overlap``, else a quarter of ``--tile``."""
        if self.tile_overlap is not None:
            return self.tile_overlap
        return (self.tile or 0) // 4

    def instances_per_image(self, tiled: bool) -> int:
        """``--max-instances``, else its default for an image taken whole or tiled."""
        if self.max_instances is not None:
            return self.max_instances
        return MAX_TILED_INSTANCES if tiled else MAX_INSTANCES

    @property
    def io_options(self) -> dict[str, Any]:
        """``storage_options`` as the job's every read and write uses them: with ``--connect-timeout`` and
        ``--read-timeout`` (see :func:`batchseg.io.storage.with_timeouts`); timeouts set in
        ``storage_options`` win."""
        timeouts = {"connect_timeout": self.connect_timeout, "read_timeout": self.read_timeout}
        return timeouts | self.storage_options
