"""The Ray layer of the segmentation job (the only module of it that imports Ray): SegmentationActors,
each holding a model, fed shard by shard by the driver.

The driver streams shard descriptors (image ids and URIs, never image bytes) to the actors, keeps
two shards queued per actor so none waits between shards, replaces actors that die, and retries
their shards: a shard is redone whole and rewritten under the same name, so rows stay exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from batchseg.errors import BatchsegError
from batchseg.format.output import ShardRecord
from batchseg.io import storage
from batchseg.io.manifest import Shard, iter_shards
from batchseg.log import to_stderr, unless_configured
from batchseg.segment.job import Job, SegmentConfig, finish, prepare_job, record_device
from batchseg.segment.processor import ShardProcessor
from batchseg.segment.scheduling import ActorLost, ScalingPolicy, Scheduler, ShardFailed, Work

log = logging.getLogger(__name__)


@ray.remote(concurrency_groups={"report": 1})  # type: ignore[call-overload]
class SegmentationActor:
    """One model in one worker process (one GPU on a cluster); processes the shards it is given in order."""

    def __init__(self, job: Job, device: str, threads: int) -> None:
        import torch

        to_stderr()  # a retry's warning reaches the driver's terminal, which Ray copies this stderr to
        storage.apply_environment(job.environment)
        torch.set_num_threads(threads)
        self.processor = ShardProcessor.for_job(job, device)

    def ready(self) -> bool:
        return True

    def process(self, shard: Shard, attempt: int) -> ShardRecord:
        return self.processor.process(shard, attempt)

    @ray.method(concurrency_group="report")
    def images_started(self) -> int:
        return self.processor.images_started


def run_segment(config: SegmentConfig) -> dict[str, Any]:
    """Run (or resume) a segmentation job; returns its summary, which is also written to summary.json."""
    started = time.time()
    unless_configured()  # long work shows its progress, in a notebook too
    check_ray_address(config.address)
    job = prepare_job(config)
    plan = job.plan
    todo = plan.num_shards - len(job.done)
    log.info(
        f"{plan.num_rows} images in {plan.num_shards} shards of up to {plan.shard_size}: "
        f"{job.resume.line()}; {todo} to do"
    )
    if job.weights.source == "none":
        log.warning("--weights none: the model has RANDOM weights; its detections and masks are meaningless")
    run: dict[str, Any] = {"shards_failed": [], "images_this_run": 0, "shards_this_run": 0, "retries": 0}
    if todo:
        init_ray(config.address)
        run = Driver(job).run()
    return finish(job, run, started)


def check_ray_address(address: str | None, timeout: float = 10.0) -> None:
    """One line, before anything is written, when the Ray cluster at ``address`` (or ``RAY_ADDRESS``) does
    not answer: ``ray.init`` would retry for minutes. ``auto``/``local`` (and no address) start or find a
    Ray on this machine, and are left to ``ray.init``."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise BatchsegError(
            f"cannot reach the Ray cluster at {address} (expected HOST:PORT of its head node; "
            f"{type(e).__name__}: {e}); is it up? (ray status)"
        ) from e


def init_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local Ray. Ray's own workers log
    errors only: batchseg prints its own progress, and Ray's warnings here are mostly about the state
    API, which needs the dashboard that a local run does not start."""
    if not ray.is_initialized():
        ray.init(
            address=address,
            include_dashboard=False,
            configure_logging=False,
            logging_config=ray.LoggingConfig(log_level="ERROR"),
        )


class Driver:
    """Runs a job's shards on SegmentationActors: the :class:`~batchseg.segment.scheduling.Scheduler`
    decides, this class answers its calls with Ray (its :class:`~batchseg.segment.scheduling.Backend`).
    Actors are always killed when :meth:`run` returns or raises (Ctrl-C, an error), so a process whose
    Ray lives on (a notebook) gets their CPUs and GPUs back.
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        config = job.config
        resources = ray.cluster_resources()
        gpus = config.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        cpus = config.cpus_per_actor or (
            2.0 if gpus else max(1.0, float(resources.get("CPU", 1) // config.actors[1]))
        )
        self.options = {"num_cpus": cpus, "num_gpus": gpus, "max_concurrency": 1}
        self.device = "cuda" if gpus else "cpu"
        record_device(job, self.device)
        self.threads = max(1, int(cpus))
        self.scheduler = Scheduler(
            self,
            iter_shards(job.plan, job.done, config.io_options),
            max_attempts=config.max_attempts,
            scaling=ScalingPolicy(*config.actors),
            total_images=job.plan.num_rows - job.plan.rows_in(job.done),
        )

    def run(self) -> dict[str, Any]:
        """Process every shard left; returns this run's counts (see :meth:`Scheduler.run`)."""
        low, high = self.job.config.actors
        log.info(
            f"starting {low} actor(s), up to {high}, with {self.options['num_cpus']:g} "
            f"CPU and {self.options['num_gpus']:g} GPU each, on {self.device}"
        )
        return self.scheduler.run()

    # The Backend the scheduler calls.

    def start_actor(self) -> tuple[Any, Any]:
        actor = SegmentationActor.options(**self.options).remote(self.job, self.device, self.threads)  # type: ignore[attr-defined]
        return actor, actor.ready.remote()

    def submit(self, actor: Any, work: Work) -> Any:
        return actor.process.remote(*work)

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        return ready

    def result(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except RayTaskError as e:  # the code raised; its actor lives on
            raise ShardFailed(_reason(e)) from e
        except Exception as e:  # the worker process died (OOM, killed, node lost)
            raise ActorLost(_reason(e)) from e

    def kill(self, actor: Any) -> None:
        ray.kill(actor, no_restart=True)

    def in_progress(self, actors: list[Any]) -> int:
        calls = [actor.images_started.remote() for actor in actors]
        with contextlib.suppress(GetTimeoutError, RayActorError):
            return int(sum(ray.get(calls, timeout=2.0)))
        return 0

    def idle_message(self) -> str:
        return (
            f"{self.options['num_cpus']:g} CPU, {self.options['num_gpus']:g} GPU each; the cluster has "
            f"{ray.available_resources()} available"
        )


def _reason(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(e, RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
