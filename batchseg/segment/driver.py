"""The thin Ray layer: a pool of SegmentationActors, each holding a model, fed shard by shard by the driver.

The driver streams shard descriptors (image ids and URIs, never image bytes) to the actors, keeps
two shards queued per actor so none waits between shards, replaces actors that die, and retries
their shards: a shard is redone whole and rewritten under the same name, so rows stay exactly once.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
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

QUEUE_PER_ACTOR = 2
PROGRESS_EVERY_S = 5.0


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


@dataclass
class _Worker:
    actor: Any
    started: Any  # the ObjectRef of ready(), until the actor is up
    up: bool = False
    queue: list[tuple[Any, Shard, int]] = field(default_factory=list)  # (ref, shard, attempt), oldest first


def run_segment(config: SegmentConfig) -> dict[str, Any]:
    """Run (or resume) a segmentation job; returns its summary, which is also written to summary.json."""
    started = time.time()
    job = prepare_job(config)
    plan = job.plan
    todo = plan.num_shards - len(job.done)
    log.info(f"{plan.num_rows} images in {plan.num_shards} shards of up to {plan.shard_size}; "
        f"{len(job.done)} shards already done, {todo} to do")  # fmt: skip
    if job.weights.source == "none":
        log.warning("--weights none: the model has RANDOM weights; its detections and masks are meaningless")
    run: dict[str, Any] = {"shards_failed": [], "images_this_run": 0, "shards_this_run": 0, "retries": 0}
    if todo:
        init_ray(config.address)
        run = _Scheduler(job).run()
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
        ray.init(address=address, include_dashboard=False, configure_logging=False,
                 logging_config=ray.LoggingConfig(log_level="ERROR"))  # fmt: skip


class _Scheduler:
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
        self.shards: Iterator[Shard] = iter_shards(job.plan, job.done, config.storage_options)
        self.upcoming = next(self.shards, None)  # one shard of lookahead tells when all were handed out
        self.retry: deque[tuple[Shard, int]] = deque()
        self.workers: list[_Worker] = []
        self.failed: list[dict[str, Any]] = []
        self.start_failures: list[str] = []
        self.images = 0
        self.shards_done = 0
        self.errors = 0
        self.retries = 0
        self.todo_images = job.plan.num_rows - self._done_rows()
        self.min_actors, self.max_actors = config.actors
        log.info(f"starting {self.min_actors} actor(s), up to {self.max_actors}, with {cpus:g} CPU and {gpus:g} GPU "
            f"each, on {self.device}")  # fmt: skip
        for _ in range(self.min_actors):
            self._start_actor()

    def _done_rows(self) -> int:
        plan = self.job.plan
        last = plan.num_shards - 1
        return sum(
            plan.num_rows - last * plan.shard_size if i == last else plan.shard_size for i in self.job.done
        )

    def _start_actor(self) -> None:
        actor = SegmentationActor.options(**self.options).remote(self.job, self.device, self.threads)  # type: ignore[attr-defined]
        self.workers.append(_Worker(actor, actor.ready.remote()))

    def _next(self) -> tuple[Shard, int] | None:
        if self.retry:
            return self.retry.popleft()
        shard, self.upcoming = self.upcoming, next(self.shards, None) if self.upcoming is not None else None
        return (shard, 1) if shard is not None else None

    def _undispatched(self) -> bool:
        return bool(self.retry) or self.upcoming is not None

    def _scale_up(self) -> None:
        """Between --actors MIN and MAX: once no actor is pending and shards still wait, start more
        (doubling), so a small job stays small and a cluster's autoscaler sees demand as it grows."""
        if any(not w.up for w in self.workers) or not self._undispatched():
            return
        for _ in range(min(self.max_actors - len(self.workers), max(1, len(self.workers)))):
            self._start_actor()

    def _feed(self, worker: _Worker) -> None:
        while worker.up and len(worker.queue) < QUEUE_PER_ACTOR:
            work = self._next()
            if work is None:
                return
            shard, attempt = work
            worker.queue.append((worker.actor.process.remote(shard, attempt), shard, attempt))

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:  # also on Ctrl-C or an error: a process whose Ray lives on must get the resources back
            self.shutdown()

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w.actor, no_restart=True)
        self.workers.clear()

    def _run(self) -> dict[str, Any]:
        start = last_report = time.time()
        while True:
            waiting = {w.started: w for w in self.workers if not w.up}
            waiting |= {ref: w for w in self.workers for ref, _, _ in w.queue}
            if not any(w.queue for w in self.workers) and not self._undispatched():
                break
            if not waiting:
                raise BatchsegError(
                    f"no actor could start: {self.start_failures[-1] if self.start_failures else '?'}"
                )
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=1.0)
            for ref in ready:
                self._handle(ref, waiting[ref])
            self._scale_up()
            if time.time() - last_report >= PROGRESS_EVERY_S:
                self._report(start)
                last_report = time.time()
        self._report(start)
        return {"shards_failed": self.failed, "images_this_run": self.images, "shards_this_run": self.shards_done,
                "retries": self.retries}  # fmt: skip

    def _handle(self, ref: Any, worker: _Worker) -> None:
        if not worker.up:
            try:
                ray.get(ref)
                worker.up = True
                self._feed(worker)
            except Exception as e:
                self._replace(worker, f"an actor failed to start: {_reason(e)}")
            return
        index = next(i for i, (r, _, _) in enumerate(worker.queue) if r == ref)
        _, shard, attempt = worker.queue.pop(index)
        try:
            record = ray.get(ref)
            self.images += record["rows"]
            self.shards_done += 1
            self.errors += sum(record["errors"].values())
        except RayTaskError as e:  # the shard's code raised; the actor lives on
            self._requeue(shard, attempt + 1, _reason(e))
        except Exception as e:
            # The worker process died (OOM, killed, node lost): everything queued on it goes back.
            self._requeue(shard, attempt + 1, _reason(e))
            for _, queued, queued_attempt in worker.queue:
                self._requeue(queued, queued_attempt, None)
            worker.queue.clear()
            self._replace(worker, None)
            return
        self._feed(worker)

    def _requeue(self, shard: Shard, attempt: int, reason: str | None) -> None:
        if reason is not None:
            self.retries += 1
            log.info(f"shard {shard.index} failed on attempt {attempt - 1}: {reason}")
        if attempt > self.job.config.max_attempts:
            self.failed.append({"shard": shard.index, "error": reason})
            log.info(f"shard {shard.index} failed {attempt - 1} times; giving up on it (a rerun retries it)")
        else:
            self.retry.append((shard, attempt))

    def _replace(self, worker: _Worker, start_failure: str | None) -> None:
        self.workers.remove(worker)
        ray.kill(worker.actor, no_restart=True)
        if start_failure is not None:
            self.start_failures.append(start_failure)
            log.info(start_failure)
            if len(self.start_failures) >= 3 * self.max_actors:
                return  # stop restarting an actor that cannot start; run() reports it
        self._start_actor()

    def _report(self, start: float) -> None:
        partial = 0
        calls = [w.actor.images_done.remote() for w in self.workers if w.up and w.queue]
        with contextlib.suppress(GetTimeoutError, RayActorError):
            partial = sum(ray.get(calls, timeout=2.0))
        if not any(w.up for w in self.workers) and time.time() - start > 30:
            log.info(f"waiting for an actor to start ({self.options['num_cpus']:g} CPU, {self.options['num_gpus']:g} GPU "
                f"each; the cluster has {ray.available_resources()} available)")  # fmt: skip
        done = self.images + partial
        elapsed = time.time() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        left = self.todo_images - done
        eta = _duration(left / rate) if rate > 0 else "?"
        log.info(f"{done}/{self.todo_images} images ({100 * done / max(1, self.todo_images):.1f}%) | "
            f"{rate:.2f} img/s | {self.errors} errors | ETA {eta}")  # fmt: skip


def _reason(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(e, RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
