"""``batchseg train``'s options, each declared once: :class:`TrainConfig` is the Python API, and the command
line, ``--help``, the checks and README's table are made from it. No torch here."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from batchseg.inference.registry import (
    MODELS,
    PRECISIONS,
    RESNET_STAGES,
    TRAINABLE,
    TRAINABLE_BACKBONE_LAYERS,
    ModelSpec,
    resize_order,
    resize_problem,
)
from batchseg.log import redact
from batchseg.options import (
    STORAGE_OPTIONS_HELP,
    at_least,
    between,
    json_object,
    not_empty,
    numbers,
    option,
    positive,
    ray_share,
    uri,
    zero_or_positive,
)

ADAMW_BETAS: tuple[float, float] = (0.9, 0.999)  # torch's own; SGD has a momentum of 0.9 instead
ADAMW_LR = 1e-3


def check_betas(betas: tuple[float, ...]) -> str | None:
    if len(betas) == 2 and all(0 <= b < 1 for b in betas):
        return None
    return f"must be two numbers from 0 to under 1, not {','.join(map(str, betas))}"


def check_gpus(gpus: float) -> str | None:
    """A worker's GPUs are whole: DDP's NCCL refuses two ranks on one GPU, and a share above one is no
    more use to a worker than the one GPU it trains on."""
    if gpus == int(gpus):
        return None
    return f"must be 0 (CPU) or a whole number: two training workers cannot share a GPU, not {gpus:g}"


def worker_count(text: str) -> int | tuple[int, ...]:
    """``N`` (a fixed number of workers) or ``MIN,MAX`` (elastic)."""
    counts = numbers(int, "2 or 2,8")(text)
    return counts[0] if len(counts) == 1 else counts


def worker_range(workers: int | tuple[int, ...]) -> tuple[int, int]:
    """``--workers`` as (MIN, MAX): a fixed N is (N, N)."""
    low, high = (workers, workers) if isinstance(workers, int) else workers
    return low, high


def check_workers(workers: int | tuple[int, ...]) -> str | None:
    counts = (workers,) if isinstance(workers, int) else tuple(workers)
    if len(counts) in (1, 2) and 1 <= counts[0] <= counts[-1]:
        return None
    return f"must be N or MIN,MAX with 1 <= MIN <= MAX, not {','.join(map(str, counts))}"


def check_min_sizes(sizes: tuple[int, ...]) -> str | None:
    return resize_problem(sizes) if sizes else "must name at least one size"


@dataclass(frozen=True, kw_only=True)  # keyword-only: the required --output follows options with defaults
class TrainConfig:
    """Everything ``batchseg train`` is told; see ``batchseg train --help`` for each option."""

    images: str | None = option(
        None,
        "folder/prefix a COCO JSON's file names are relative to (a Parquet training set has URIs)",
        parse=uri,
    )
    annotations: str | None = option(
        None,
        "training data (any fsspec URI): a COCO instances JSON, or a Parquet training set (a file or folder: "
        "batchseg coco-to-parquet's, a run's data/, or any Parquet of a segment output's columns)",
        parse=uri,
        group="data",
    )
    from_results: str | None = option(
        None,
        "train on a segment output's instances (any fsspec URI), written once as a Parquet training set "
        "into the run folder's data/ (a rerun reuses it)",
        parse=uri,
        group="data",
    )
    where: str | None = option(
        None,
        "with --from-results: SQL condition on the instances view (batchseg query) choosing the instances "
        'to learn from, e.g. "score >= 0.9"; images left with none are left out',
        parse=str,
        default_text="every instance with a mask",
    )
    output: str = option(
        help="run folder (any fsspec URI): checkpoints, then model.pt; rerunning resumes", parse=uri
    )
    model: str = option("maskrcnn_small", "the model to train", choices=TRAINABLE)
    weights: str = option(
        "none",
        "none (from scratch), DEFAULT (torchvision's COCO weights, heads replaced), or a checkpoint",
        check=not_empty("none, DEFAULT or a checkpoint"),
    )
    trainable_backbone_layers: int | None = option(
        None,
        "with pretrained --weights: how many backbone stages train, counted from the last "
        f"({', '.join(RESNET_STAGES)}), as torchvision fine-tunes: the others are frozen, and BatchNorm in "
        "all (maskrcnn_small's backbone ends at layer3)",
        parse=int,
        check=between(0, len(RESNET_STAGES)),
        default_text=str(TRAINABLE_BACKBONE_LAYERS),
    )
    sync_batchnorm: bool = option(
        False,
        "from scratch (--weights none), on GPUs: BatchNorm statistics computed over every worker's batch "
        "(SyncBatchNorm), not each worker's own",
    )
    workers: int | tuple[int, int] = option(
        1,
        "data-parallel (DDP) workers: N, or MIN,MAX for elastic training (Ray Train starts with as many as "
        "the cluster has room for, at least MIN, and restarts from the last checkpoint with more or fewer as "
        "workers come and go)",
        parse=worker_count,
        check=check_workers,
        metavar="N or MIN,MAX",
    )
    gpus_per_worker: float = option(
        0.0, "whole GPUs per worker (0: CPU)", check=(ray_share("GPUs", zero=True), check_gpus)
    )
    cpus_per_worker: float | None = option(
        None,
        "CPUs per worker (also its torch threads)",
        parse=float,
        check=ray_share("CPUs", zero=False),
        default_text="1",
    )
    iterations: int | None = option(
        None,
        "the run's length in optimizer steps at MAX workers: it ends after this x --batch-size x MAX images "
        "(MAX of the first run, kept by its checkpoint), however many workers train them",
        parse=int,
        check=at_least(1),
        group="length",
    )
    epochs: int | None = option(
        None, "passes over the data set", parse=int, check=at_least(1), group="length"
    )
    batch_size: int = option(8, "images per step per worker", check=at_least(1))
    optimizer: str = option("adamw", "adamw or sgd", choices=("adamw", "sgd"))
    lr: float | None = option(
        None,
        "learning rate",
        parse=float,
        check=positive(),
        default_text=f"{ADAMW_LR} (AdamW), 0.02 x total batch (at MAX workers) / 16 (SGD)",
    )
    weight_decay: float = option(1e-4, "AdamW's or SGD's weight decay", check=zero_or_positive())
    betas: tuple[float, float] = option(
        ADAMW_BETAS,
        "AdamW's decay rates of the gradient's moving averages, B1,B2 (a B2 of 0.99 suits runs of a few "
        "thousand steps)",
        parse=numbers(float, "0.9,0.99"),
        check=check_betas,
        metavar="B1,B2",
    )
    schedule: str = option("cosine", "the learning rate after warmup", choices=("cosine", "step"))
    warmup_iterations: int | None = option(
        None,
        "linear warmup, in steps at MAX workers as --iterations counts them",
        parse=int,
        check=at_least(0),
        default_text="min(100, a tenth of the run)",
    )
    min_sizes: tuple[int, ...] | None = option(
        None,
        "multi-scale training: shorter sides, comma-separated, one drawn per batch; the last is used for "
        "validation",
        parse=numbers(int, "640,672,704"),
        check=check_min_sizes,
        default_text=f"the model's: {','.join(map(str, ModelSpec.train_sizes))}, or "
        f"{','.join(map(str, MODELS['maskrcnn_small'].train_sizes))} for maskrcnn_small",
    )
    max_size: int | None = option(
        None,
        "longer side's cap",
        parse=int,
        check=resize_problem,
        default_text=f"the model's: {ModelSpec.max_size}, or {MODELS['maskrcnn_small'].max_size} for maskrcnn_small",
    )
    rois_per_image: int | None = option(
        None,
        "proposals per image the box and mask heads learn from, a quarter at most positive; fewer make a "
        "step cheaper",
        parse=int,
        check=at_least(1),
        default_text="the model's, 512, or 64 for maskrcnn_small",
    )
    grad_clip: float = option(10.0, "max gradient norm", check=zero_or_positive("0 (off)"))
    precision: str = option(
        "auto",
        "mixed precision, boxes always in fp32 (auto: on GPU bf16 where the GPU has it natively, else "
        "fp16; on CPU fp32). bf16 on CPU: faster where the CPU has bf16 units (AMX, AVX512-BF16), slower "
        "elsewhere",
        choices=PRECISIONS,
    )
    checkpoint_every: int | None = option(
        None, "iterations between checkpoints", parse=int, check=at_least(1), default_text="an epoch"
    )
    validation_images: str | None = option(None, "validation images", parse=uri)
    validation_annotations: str | None = option(
        None, "validation COCO JSON: COCO AP is computed at each checkpoint", parse=uri
    )
    max_failures: int = option(
        2,
        "worker failures survived (resume from checkpoint); -1: no limit",
        check=at_least(-1),
    )
    prefetch: int = option(
        64,
        "image reads in flight per worker, ahead of the step: enough to hide storage latency (100 ms at "
        "dozens of images/s per GPU); at most this many encoded images wait in memory",
        check=at_least(1),
    )
    loader_workers: int = option(
        4, "threads per worker decoding images and building their masks ahead of the step", check=at_least(1)
    )
    seed: int = option(
        0, "seeds the weights, the data order and the augmentation", check=between(0, 2**32 - 1)
    )
    address: str | None = option(
        None, "Ray cluster address", parse=str, default_text="RAY_ADDRESS, else local Ray"
    )
    storage_options: dict[str, Any] = option(help=STORAGE_OPTIONS_HELP, parse=json_object, factory=dict)

    def relations(self) -> list[tuple[bool, str]]:
        return [
            (
                (self.iterations is None) != (self.epochs is None),
                "give --iterations or --epochs (exactly one)",
            ),
            (
                (self.annotations is None) != (self.from_results is None),
                "give --annotations or --from-results (exactly one)",
            ),
            (
                self.where is None or self.from_results is not None,
                "--where selects instances of --from-results",
            ),
            (
                self.images is None or self.from_results is None,
                "--images is for a COCO JSON --annotations: --from-results has each image's URI",
            ),
            (
                self.optimizer == "adamw" or tuple(self.betas) == ADAMW_BETAS,
                "--betas are AdamW's: --optimizer sgd has a momentum of 0.9 instead",
            ),
            resize_order(self.min_sizes or (), self.max_size, "--min-sizes"),
            (
                self.precision != "fp16" or self.gpus_per_worker > 0,
                "--precision fp16 needs --gpus-per-worker: on CPUs, mixed precision is bf16",
            ),
            (
                self.trainable_backbone_layers is None or not self.from_scratch,
                "--trainable-backbone-layers is for pretrained --weights: from scratch every layer trains",
            ),
            (
                not self.sync_batchnorm or self.from_scratch,
                "--sync-batchnorm is for training from scratch (--weights none): with pretrained weights "
                "the backbone's BatchNorm is frozen",
            ),
            (
                not self.sync_batchnorm or self.gpus_per_worker > 0,
                "--sync-batchnorm needs --gpus-per-worker: torch synchronises BatchNorm on GPUs only",
            ),
            (
                bool(self.validation_images) == bool(self.validation_annotations),
                "give both --validation-images and --validation-annotations, or neither",
            ),
        ]

    @property
    def from_scratch(self) -> bool:
        """``--weights none``: random initial weights (anything else is pretrained)."""
        return self.weights.lower() == "none"

    @property
    def learning_rate(self) -> float:
        """SGD's default follows the total batch at the most workers (``--workers``' MAX): the run as
        planned. A checkpoint keeps the rate, so a resume with other workers keeps it too."""
        if self.lr is not None:
            return self.lr
        total_batch = self.batch_size * worker_range(self.workers)[1]
        return 0.02 * total_batch / 16 if self.optimizer == "sgd" else ADAMW_LR


def public_config(config: TrainConfig) -> dict[str, Any]:
    """The config as saved in checkpoints and logs: storage options (credentials) left out, and the URIs'
    credentials redacted (:func:`~batchseg.log.redact`)."""
    return {
        k: redact(v) if isinstance(v, str) else v
        for k, v in asdict(config).items()
        if k not in ("storage_options", "address")
    }
