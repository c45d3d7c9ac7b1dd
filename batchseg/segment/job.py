"""The segmentation job's settings and every check that can fail it, run before any work starts; and the
totals of a run."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from batchseg import __version__
from batchseg.errors import BatchsegError
from batchseg.format.output import OutputDir, Resume, ShardRecord
from batchseg.format.records import clashing
from batchseg.inference.models import WeightsInfo, resolve_weights
from batchseg.inference.registry import resize_checks
from batchseg.io import storage
from batchseg.io.images import DEFAULT_MAX_PIXELS
from batchseg.io.manifest import Keep, Plan, plan_shards

RAY_FRACTION = 1e-4  # the finest fraction of a CPU or GPU Ray takes


@dataclass(frozen=True)
class SegmentConfig:
    """Everything ``batchseg segment`` is told. See ``batchseg segment --help`` for each option."""

    manifest: str
    output: str
    model: str | None = None
    weights: str = "DEFAULT"
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    min_size: int | None = None
    max_size: int | None = None
    max_instances: int = 100
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 4
    shard_size: int = 1000
    actors: tuple[int, int] = (1, 1)
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    precision: str = "auto"
    decode: str = "auto"
    io_threads: int = 4
    prefetch: int = 64
    max_attempts: int = 3
    keep_columns: Keep = ()
    overwrite: bool = False
    address: str | None = None
    connect_timeout: float = storage.CONNECT_TIMEOUT
    read_timeout: float = storage.READ_TIMEOUT
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def io_options(self) -> dict[str, Any]:
        """``storage_options`` as the job's every read and write uses them: with ``--connect-timeout`` and
        ``--read-timeout`` (see :func:`batchseg.io.storage.with_timeouts`); timeouts set in
        ``storage_options`` win."""
        timeouts = {"connect_timeout": self.connect_timeout, "read_timeout": self.read_timeout}
        return timeouts | self.storage_options


@dataclass(frozen=True)
class Job:
    """A checked job: what to run, with what, and which shards earlier runs finished that still hold the
    manifest's rows (``resume.kept``)."""

    config: SegmentConfig
    weights: WeightsInfo
    plan: Plan
    provenance: dict[str, Any]
    resume: Resume
    environment: dict[str, str] = field(default_factory=storage.forwarded_environment, repr=False)

    @property
    def done(self) -> frozenset[int]:
        return self.resume.kept


def prepare_job(config: SegmentConfig) -> Job:
    """Every check that can fail the job runs here, before any work starts."""
    check_options(config)
    plan = plan_shards(config.manifest, config.shard_size, config.io_options, config.keep_columns)
    clashes = clashing(plan.keep)
    if clashes:  # only --keep-columns all gets here: named columns were checked before the manifest was read
        raise BatchsegError(
            f"--keep-columns all: the manifest's column(s) {', '.join(clashes)} clash with batchseg's own "
            "columns; rename them in the manifest, or name the columns to keep"
        )
    weights = resolve_weights(config.weights, config.model, config.io_options)
    provenance = {
        "batchseg_version": __version__,
        "model": weights.model,
        "weights": weights.identity,
        "weights_uri": weights.uri,
        "categories": list(weights.categories),
        "score_threshold": config.score_threshold,
        "mask_threshold": config.mask_threshold,
        "min_size": config.min_size,
        "max_size": config.max_size,
        "max_instances": config.max_instances,
        "max_pixels": config.max_pixels,
        "shard_size": config.shard_size,
        "manifest": plan.manifest,
        "manifest_rows": plan.num_rows,
        "manifest_fingerprint": plan.fingerprint,
        "keep_columns": {f.name: str(f.type) for f in plan.columns},
    }
    output = OutputDir(config.output, config.io_options)
    output.prepare(provenance, config.overwrite)
    return Job(config, weights, plan, provenance, output.resume(plan.shard_fingerprints))


def check_options(config: SegmentConfig) -> None:
    low, high = config.actors
    gpus, cpus = config.gpus_per_actor, config.cpus_per_actor
    keep = config.keep_columns
    checks = [
        (
            keep == "all" or (isinstance(keep, tuple) and all(isinstance(k, str) and k for k in keep)),
            f"--keep-columns must be 'all' or column names, not {keep!r}",
        ),
        (
            keep == "all" or not clashing(keep),
            f"--keep-columns: {', '.join(clashing(keep) if keep != 'all' else [])} clash with batchseg's own "
            "columns (the row's and the instances'); rename them in the manifest",
        ),
        (
            0 <= config.score_threshold <= 1,
            f"--score-threshold must be in [0, 1], not {config.score_threshold}",
        ),
        (0 <= config.mask_threshold < 1, f"--mask-threshold must be in [0, 1), not {config.mask_threshold}"),
        *resize_checks(() if config.min_size is None else (config.min_size,), config.max_size, "--min-size"),
        (config.batch_size >= 1, f"--batch-size must be at least 1, not {config.batch_size}"),
        (1 <= low <= high, f"--actors must be N or MIN,MAX with 1 <= MIN <= MAX, not {low},{high}"),
        (
            gpus is None or gpus == 0 or RAY_FRACTION <= gpus < math.inf,
            f"--gpus-per-actor must be 0 (CPU) or from {RAY_FRACTION} GPUs up, not {gpus}",
        ),
        (
            cpus is None or RAY_FRACTION <= cpus < math.inf,
            f"--cpus-per-actor must be from {RAY_FRACTION} CPUs up, not {cpus}",
        ),
        (config.precision in ("auto", "fp32", "bf16", "fp16"), f"unknown --precision {config.precision!r}"),
        (config.decode in ("auto", "pil", "torchvision"), f"unknown --decode {config.decode!r}"),
        (config.max_pixels >= 1, f"--max-pixels must be at least 1, not {config.max_pixels}"),
        (config.max_instances >= 1, f"--max-instances must be at least 1, not {config.max_instances}"),
        (config.io_threads >= 1, f"--io-threads must be at least 1, not {config.io_threads}"),
        (config.prefetch >= 1, f"--prefetch must be at least 1, not {config.prefetch}"),
        (config.max_attempts >= 1, f"--max-attempts must be at least 1, not {config.max_attempts}"),
        (
            bool(config.weights.strip()),
            "--weights must not be empty: DEFAULT, a weights name, a checkpoint or none",
        ),
        (
            0 < config.connect_timeout < math.inf,
            f"--connect-timeout must be positive seconds, not {config.connect_timeout}",
        ),
        (
            0 < config.read_timeout < math.inf,
            f"--read-timeout must be positive seconds, not {config.read_timeout}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise BatchsegError(message)


def summarize(records: list[ShardRecord], job: Job, run: dict[str, Any]) -> dict[str, Any]:
    """Totals over every completed shard (this run's and earlier ones'), plus this run's timing."""
    errors: Counter[str] = Counter()
    for r in records:
        errors.update(r.errors)
    return {
        "images": sum(r.rows for r in records),
        "ok": sum(r.ok for r in records),
        "error": sum(errors.values()),
        "errors_by_kind": dict(sorted(errors.items())),
        "instances": sum(r.instances for r in records),
        "storage_retries": sum(r.storage_retries for r in records),
        "shards_total": job.plan.num_shards,
        "shards_done": len(records),
        "shards_kept": len(job.resume.kept),
        "shards_redone": len(job.resume.redone),
        "shards_new": job.resume.new,
        "shards_removed": len(job.resume.removed),
        "manifest_rows": job.plan.num_rows,
        "model": job.weights.model,
        "weights": job.weights.identity,
        **run,
    }
