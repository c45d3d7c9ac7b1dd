"""The segmentation job: every check that can fail it, run before any work starts (the options' own are
declared with them in ``config.py``), and the totals of a run."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from batchseg import __version__
from batchseg.errors import BatchsegError
from batchseg.format.lease import Lease
from batchseg.format.output import OutputDir, Resume, ShardRecord, settings_of
from batchseg.format.records import name_clashes
from batchseg.inference.models import WeightsInfo, resolve_weights
from batchseg.io import storage
from batchseg.io.manifest import Plan, plan_shards
from batchseg.log import redact
from batchseg.options import check
from batchseg.segment.config import ON_DEVICE, SegmentConfig


@dataclass(frozen=True)
class Job:
    """A checked job: what to run, with what, and which shards earlier runs finished that still hold the
    manifest's rows (``resume.kept``). It holds the output's ``lease`` until :meth:`release` (a context
    manager: released when the block ends)."""

    config: SegmentConfig
    weights: WeightsInfo
    plan: Plan
    provenance: dict[str, Any]
    resume: Resume
    environment: dict[str, str] = field(default_factory=storage.forwarded_environment, repr=False)
    lease: Lease | None = field(default=None, repr=False, compare=False)

    @property
    def done(self) -> frozenset[int]:
        return self.resume.kept

    def release(self) -> None:
        """Let go of the output: the next job may take it."""
        if self.lease is not None:
            self.lease.release()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def __getstate__(self) -> dict[str, Any]:
        """A copy elsewhere (pickled) holds no lease: the lease is this process's, its heartbeat a thread."""
        return {k: v for k, v in self.__dict__.items() if k != "lease"}  # unpickled: the class's None


def prepare_job(config: SegmentConfig) -> Job:
    """Every check that can fail the job runs here, before any work starts; then the job takes the
    output's lease (refused while another job holds it), before it writes anything there. The caller
    releases it (:meth:`Job.release`, or ``with prepare_job(config) as job:``)."""
    check(config)
    plan = plan_shards(config.manifest, config.shard_size, config.io_options, config.keep_columns)
    clashes = name_clashes(plan.keep)
    if clashes:  # only --keep-columns all gets here: named columns were checked before the manifest was read
        raise BatchsegError(
            f"--keep-columns all: the manifest's column(s) {clashes}; rename them in the manifest, or name "
            "the columns to keep"
        )
    weights = resolve_weights(config.weights, config.model, config.io_options)
    provenance = {
        "batchseg_version": __version__,
        "model": weights.model,
        "weights": weights.identity,
        "weights_uri": redact(weights.uri),  # recorded without credentials, as are the manifest's
        "categories": list(weights.categories),
        "score_threshold": config.score_threshold,
        "mask_threshold": config.mask_threshold,
        "min_size": config.min_size,
        "max_size": config.max_size,
        "max_instances": config.instances_per_image(tiled=False),
        "tile": config.tile,
        "tile_overlap": config.overlap if config.tile else None,
        "max_pixels": config.max_pixels,
        "shard_size": config.shard_size,
        "manifest": redact(plan.manifest),
        "manifest_rows": plan.num_rows,
        "manifest_fingerprint": plan.fingerprint,
        "keep_columns": {f.name: str(f.type) for f in plan.columns},
        # as given (but for decode's older name): with the device kind (record_device) they decide the
        # autocast dtype and the decoder
        "precision": config.precision,
        "decode": "device" if config.decode in ON_DEVICE else config.decode,
    }
    output = OutputDir(config.output, config.io_options)
    lease = Lease(output)
    lease.take()
    try:
        output.prepare(provenance, config.overwrite)
        resume = output.resume(plan.shard_fingerprints, settings_of(provenance))
    except BaseException:
        lease.release()
        raise
    return Job(config, weights, plan, provenance, resume, lease=lease)


def record_device(job: Job, device: str) -> None:
    """Record the device kind the job runs on (``cpu`` or ``cuda``: the driver decides it from the cluster)
    in the output's job file, before any shard is written; a rerun of the output on the other kind is
    refused like other settings."""
    OutputDir(job.config.output, job.config.io_options).add_settings({"device": device})


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


def finish(job: Job, run: dict[str, Any], started: float) -> dict[str, Any]:
    """The summary of a run that started at ``started`` (``time.time()``) and did ``run`` (shards failed,
    images, shards and retries of this run): totals over every completed shard, written to _summary.json.
    Refused when another job has taken the output's lease meanwhile: the totals would be of a mix."""
    if job.lease is not None:
        job.lease.check()
    output = OutputDir(job.config.output, job.config.io_options)
    wall = time.time() - started
    run = run | {
        "shards_skipped": len(job.done),
        "wall_seconds": round(wall, 2),
        "images_per_second": round(run["images_this_run"] / wall, 3),
    }
    summary = summarize(output.records(), job, run)
    summary["status"] = "complete" if summary["shards_done"] == job.plan.num_shards else "incomplete"
    output.write_summary(summary)
    return summary
