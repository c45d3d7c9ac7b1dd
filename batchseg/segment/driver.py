"""The Ray layer of the segmentation job (the only module of it that imports Ray): SegmentationActors,
each holding a model, fed shard by shard by the driver.

The driver streams shard descriptors (image ids and URIs, never image bytes) to the actors, keeps
two shards queued per actor so none waits between shards, replaces actors that die, and retries
their shards: a shard is redone whole and rewritten under the same name, so rows stay exactly once.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from batchseg import log
from batchseg.errors import BatchsegError
from batchseg.format.output import OutputDir
from batchseg.io import storage
from batchseg.io.manifest import Shard, iter_shards
from batchseg.segment.job import Job, SegmentConfig, prepare_job, summarize
from batchseg.segment.processor import ShardProcessor
from batchseg.segment.scheduling import ActorPool, Progress, ScalingPolicy, Work, Worker, WorkQueue


@ray.remote(concurrency_groups={"report": 1})  # type: ignore[call-overload]
class SegmentationActor:
    """One model in one worker process (one GPU on a cluster); processes the shards it is given in order."""

    def __init__(self, job: Job, device: str, threads: int) -> None:
        import torch

        storage.apply_environment(job.environment)
        torch.set_num_threads(threads)
        self.processor = ShardProcessor(job, device)

    def ready(self) -> bool:
        return True

    def process(self, shard: Shard, attempt: int) -> dict[str, Any]:
        return self.processor.process(shard, attempt)

    @ray.method(concurrency_group="report")
    def images_done(self) -> int:
        return self.processor.images_done


def run_segment(config: SegmentConfig) -> dict[str, Any]:
    """Run (or resume) a segmentation job; returns its summary, which is also written to summary.json."""
    started = time.time()
    job = prepare_job(config)
    plan = job.plan
    todo = plan.num_shards - len(job.done)
    log.info(
        f"{plan.num_rows} images in {plan.num_shards} shards of up to {plan.shard_size}; "
        f"{len(job.done)} shards already done, {todo} to do"
    )
    if job.weights.source == "none":
        log.warning("--weights none: the model has RANDOM weights; its detections and masks are meaningless")
    run: dict[str, Any] = {"shards_failed": [], "images_this_run": 0, "shards_this_run": 0, "retries": 0}
    if todo:
        init_ray(config.address)
        run = Driver(job).run()
    output = OutputDir(config.output, config.storage_options)
    wall = time.time() - started
    run |= {
        "shards_skipped": len(job.done),
        "wall_seconds": round(wall, 2),
        "images_per_second": round(run["images_this_run"] / wall, 3),
    }
    summary = summarize(output.records(), job, run)
    summary["status"] = "complete" if summary["shards_done"] == plan.num_shards else "incomplete"
    output.write_summary(summary)
    return summary


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
    """Feeds a job's shards to a pool of SegmentationActors and survives their deaths.

    The bookkeeping lives in :mod:`batchseg.segment.scheduling`; this class makes the Ray calls: start
    actors, hand them shards, wait on the results, kill and replace the dead. :meth:`run` always kills
    its actors when it returns or raises (Ctrl-C, an error), so a process whose Ray lives on (a notebook)
    gets their CPUs and GPUs back.
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
        self.threads = max(1, int(cpus))
        self.work = WorkQueue(iter_shards(job.plan, job.done, config.storage_options), config.max_attempts)
        self.pool = ActorPool()
        self.scaling = ScalingPolicy(*config.actors)
        self.progress = Progress(job.plan.num_rows - job.plan.rows_in(job.done))
        self.start_failures: list[str] = []

    def run(self) -> dict[str, Any]:
        """Process every shard left; returns this run's counts (``shards_failed``, ``images_this_run``,
        ``shards_this_run``, ``retries``)."""
        try:
            self._run()
        finally:
            self.shutdown()
        return {
            "shards_failed": self.work.given_up,
            "images_this_run": self.progress.images,
            "shards_this_run": self.progress.shards,
            "retries": self.work.retries,
        }

    def shutdown(self) -> None:
        for worker in list(self.pool.workers):
            self.pool.remove(worker)
            ray.kill(worker.actor, no_restart=True)

    def _run(self) -> None:
        log.info(
            f"starting {self.scaling.low} actor(s), up to {self.scaling.high}, with {self.options['num_cpus']:g} "
            f"CPU and {self.options['num_gpus']:g} GPU each, on {self.device}"
        )
        for _ in range(self.scaling.low):
            self._start_actor()
        while self.pool.busy() or self.work:
            pending = self.pool.pending()
            if not pending:
                raise BatchsegError(
                    f"no actor could start: {self.start_failures[-1] if self.start_failures else '?'}"
                )
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                self._handle(ref, pending[ref])
            starting = self.pool.starting()
            for _ in range(self.scaling.to_start(len(self.pool), starting, bool(self.work))):
                self._start_actor()
            if self.progress.due():
                self._report()
        self._report()

    def _start_actor(self) -> None:
        actor = SegmentationActor.options(**self.options).remote(self.job, self.device, self.threads)  # type: ignore[attr-defined]
        self.pool.add(actor, actor.ready.remote())

    def _feed(self, worker: Worker) -> None:
        for _ in range(self.pool.room(worker)):
            work = self.work.next()
            if work is None:
                return
            worker.queue.append((worker.actor.process.remote(*work), work))

    def _handle(self, ref: Any, worker: Worker) -> None:
        if not worker.up:
            try:
                ray.get(ref)
                worker.up = True
                self._feed(worker)
            except Exception as e:
                self._replace(worker, f"an actor failed to start: {_reason(e)}")
            return
        work = self.pool.finished(worker, ref)
        try:
            self.progress.shard_done(ray.get(ref))
        except RayTaskError as e:  # the shard's code raised; the actor lives on
            self._failed(work, _reason(e))
        except Exception as e:
            # The worker process died (OOM, killed, node lost): everything queued on it goes back.
            self._failed(work, _reason(e))
            self._replace(worker, None)
            return
        self._feed(worker)

    def _failed(self, work: Work, reason: str) -> None:
        shard, attempt = work
        log.info(f"shard {shard.index} failed on attempt {attempt}: {reason}")
        if not self.work.failed(work, reason):
            log.info(f"shard {shard.index} failed {attempt} times; giving up on it (a rerun retries it)")

    def _replace(self, worker: Worker, start_failure: str | None) -> None:
        for work in self.pool.remove(worker):
            self.work.put_back(work)
        ray.kill(worker.actor, no_restart=True)
        if start_failure is not None:
            self.start_failures.append(start_failure)
            log.info(start_failure)
            if self.scaling.gives_up(len(self.start_failures)):
                return  # stop restarting an actor that cannot start; _run() reports it
        self._start_actor()

    def _report(self) -> None:
        partial = 0
        calls = [w.actor.images_done.remote() for w in self.pool.workers if w.up and w.queue]
        with contextlib.suppress(GetTimeoutError, RayActorError):
            partial = sum(ray.get(calls, timeout=2.0))
        if not any(w.up for w in self.pool.workers) and time.time() - self.progress.start > 30:
            log.info(
                f"waiting for an actor to start ({self.options['num_cpus']:g} CPU, {self.options['num_gpus']:g} GPU "
                f"each; the cluster has {ray.available_resources()} available)"
            )
        log.info(self.progress.line(partial))


def _reason(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(e, RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
