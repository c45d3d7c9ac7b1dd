"""The Ray layer of the segmentation job (the only module of it that imports Ray): SegmentationActors,
each holding a model, fed shard by shard by the driver.

The driver streams shard descriptors (image ids and URIs, never image bytes) to the actors, keeps
two shards queued per actor so none waits between shards, replaces actors that die or keep failing, and
retries their shards on other actors: a shard is redone whole and rewritten under the same name, so rows
stay exactly once.
Each actor is given the job's settings and weights once (an :class:`ActorSetup` in Ray's object store,
which carries it to each node once), never the job's plan.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from batchseg.errors import STOP_SIGNALS, BatchsegError, DeviceError, Stopped
from batchseg.format.output import ShardRecord
from batchseg.io import storage
from batchseg.io.manifest import Shard, iter_shards
from batchseg.log import to_stderr, unless_configured
from batchseg.segment.job import Job, SegmentConfig, finish, prepare_job, record_device
from batchseg.segment.processor import ActorSetup, ShardProcessor
from batchseg.segment.scheduling import (
    QUEUE_PER_ACTOR,
    ActorLost,
    ScalingPolicy,
    Scheduler,
    ShardFailed,
    Work,
    empty_run,
)

log = logging.getLogger(__name__)


# The shards queued on an actor run at once: the next one's reads, and the last one's writes, overlap the
# model's work (ShardProcessor.process takes the model in turns).
@ray.remote(concurrency_groups={"report": 1, "shards": QUEUE_PER_ACTOR})  # type: ignore[call-overload]
class SegmentationActor:
    """One model in one worker process (one GPU, or ``gpus`` of one, on a cluster); processes the shards it
    is given, the model taking them in turn."""

    def __init__(self, setup: ActorSetup, device: str, threads: int, gpus: float) -> None:
        import torch

        to_stderr()  # a retry's warning reaches the driver's terminal, which Ray copies this stderr to
        storage.apply_environment(setup.environment)
        torch.set_num_threads(threads)
        limit_gpu_memory(gpus, device)
        self.processor = ShardProcessor.for_setup(setup, device)

    def ready(self) -> bool:
        return True

    @ray.method(concurrency_group="shards")
    def process(self, shard: Shard, attempt: int) -> ShardRecord:
        try:
            return self.processor.process(shard, attempt)
        except DeviceError as e:
            # A CUDA context that met such an error cannot be trusted again: this process ends (the shard's
            # call fails as the actor's death), and the driver starts a fresh one and retries the shard.
            log.error(f"shard {shard.index}: {e}; ending this actor so that a fresh process replaces it")
            ray.actor.exit_actor()
            raise  # not reached: exit_actor raises

    @ray.method(concurrency_group="report")
    def images_started(self) -> float:
        return self.processor.images_in_progress


def gpu_memory_share(gpus: float, device: str) -> float | None:
    """The share of its GPU's memory an actor given ``gpus`` GPUs may take: ``gpus`` itself under one GPU
    (``--gpus-per-actor 0.5``: two actors on each GPU, neither able to starve the other), else None (no
    cap: a whole GPU, or the CPU)."""
    return gpus if device.startswith("cuda") and 0 < gpus < 1 else None


def limit_gpu_memory(gpus: float, device: str) -> None:
    """Cap this process's share of its GPU's memory (:func:`gpu_memory_share`), before the model is on it."""
    share = gpu_memory_share(gpus, device)
    if share is not None:
        import torch

        torch.cuda.set_per_process_memory_fraction(share)


def run_segment(config: SegmentConfig) -> dict[str, Any]:
    """Run (or resume) a segmentation job; returns its summary, which is also written to _summary.json."""
    started = time.time()
    unless_configured()  # long work shows its progress, in a notebook too
    check_ray_address(config.address)
    with prepare_job(config) as job:  # the output's lease, held until the summary is written
        plan = job.plan
        todo = plan.num_shards - len(job.done)
        log.info(
            f"{plan.num_rows} images in {plan.num_shards} shards of up to {plan.shard_size}: "
            f"{job.resume.line()}; {todo} to do"
        )
        if job.weights.source == "none":
            log.warning(
                "--weights none: the model has RANDOM weights; its detections and masks are meaningless"
            )
        run = empty_run()
        if todo:
            with ray_session(config.address):
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


def joined_cluster(address: str | None) -> bool:
    """Whether the job runs on a Ray cluster it was pointed at (``address``, else ``RAY_ADDRESS``), which
    may have an autoscaler, rather than on a Ray of this machine's own."""
    address = address or os.environ.get("RAY_ADDRESS")
    return bool(address) and address != "local"


def init_ray(address: str | None) -> bool:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local Ray; returns whether this call
    connected (False: Ray was already up in this process). Ray's own workers log errors only: batchseg
    prints its own progress, and Ray's warnings here are mostly about the state API, which needs the
    dashboard that a local run does not start.

    ``ray.init`` replaces the process's SIGTERM handler (first with its own ``sys.exit(15)``, then with a
    C++ one that prints a stack dump and aborts, exit 134): the handlers from before are put back, so that
    a SIGTERM or SIGHUP (:func:`~batchseg.errors.stop_on_signals`) ends the job as Ctrl-C does. One that
    comes while ``ray.init`` runs, Ctrl-C's too, is held until it returns, then sent again to the handler
    from before (a second one of the same kind is not held; Ray's own Python SIGTERM handler is kept out):
    raised inside it, its exception left Ray's state accessor half made, and the process hung destroying it
    (seen with SIGHUP on a loaded machine). The C++ handler, from the moment Ray's core worker installs it
    until ``ray.init`` returns, is not Python's to hold."""
    if ray.is_initialized():
        return False
    main = threading.current_thread() is threading.main_thread()  # (ray.init, too, sets them only there)
    handlers = _handlers()
    held: list[int] = []

    def hold(signum: int, _: object) -> None:
        if signum in held:  # asked twice: at once, whatever Ray is doing
            raise Stopped(signum)
        held.append(signum)

    ray_utils = ray._private.utils
    sets_its_handler = getattr(ray_utils, "set_sigterm_handler", None)  # (a Ray's own, not its API)
    if main:
        for signum in handlers:
            signal.signal(signum, hold)
        if sets_its_handler is not None:
            ray_utils.set_sigterm_handler = lambda handler: None  # its sys.exit, raised anywhere in ray.init
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            configure_logging=False,
            logging_config=ray.LoggingConfig(log_level="ERROR"),
        )
    except SystemExit as e:
        if e.code == signal.SIGTERM:  # Ray's own handler, while Ray starts
            raise Stopped(signal.SIGTERM) from e
        raise
    finally:
        if sets_its_handler is not None:
            ray_utils.set_sigterm_handler = sets_its_handler
        _put_back(handlers)
    for received in held:  # now it does what it was set to: batchseg's Stopped, a KeyboardInterrupt, the end
        if handlers[signal.Signals(received)] not in (signal.SIG_IGN, None):
            shutdown_ray()
            signal.raise_signal(received)
    return True


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for one job (:func:`init_ray`). When the job is stopped (Ctrl-C, SIGTERM, SIGHUP), a Ray this
    call connected is shut down on the way out: a local Ray's processes end with the job rather than
    minutes after it, and a cluster sees its driver go at once."""
    connected = init_ray(address)
    try:
        yield
    except KeyboardInterrupt:
        if connected:
            shutdown_ray()
        raise


def shutdown_ray() -> None:
    """``ray.shutdown()``, the signal handlers kept: it leaves SIGTERM's default behind it (seen), and a
    second SIGTERM while a stopped job cleans up would end it without a word."""
    handlers = _handlers()
    ray.shutdown()
    _put_back(handlers)


def _handlers() -> dict[signal.Signals, Any]:
    """The handlers of Ctrl-C and the stop signals now."""
    return {signum: signal.getsignal(signum) for signum in (signal.SIGINT, *STOP_SIGNALS)}


def _put_back(handlers: dict[signal.Signals, Any]) -> None:
    """Put back the ``handlers`` :func:`_handlers` gave, from the main thread (Python sets them only there)."""
    if threading.current_thread() is threading.main_thread():
        for signum, handler in handlers.items():
            if handler is not None:  # None: a handler not set from Python, which Python cannot put back
                signal.signal(signum, handler)


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
            if not gpus and joined_cluster(config.address):
                log.info(
                    "no GPU in the cluster now: actors run on the CPU; pass --gpus-per-actor 1 to wait for "
                    "GPU nodes an autoscaler adds"
                )
        cpus = config.cpus_per_actor or (
            2.0 if gpus else max(1.0, float(resources.get("CPU", 1) // config.actors[1]))
        )
        self.options = {"num_cpus": cpus, "num_gpus": gpus, "max_concurrency": 1}
        self.device = "cuda" if gpus else "cpu"
        record_device(job, self.device)
        self.threads = max(1, int(cpus))
        self.setup = ray.put(ActorSetup.of(job))  # the weights loaded once, here, for every actor
        self.scheduler = Scheduler(
            self,
            iter_shards(job.plan, job.done, config.io_options),
            max_attempts=config.max_attempts,
            scaling=ScalingPolicy(*config.actors),
            total_images=job.plan.num_rows - job.plan.rows_in(job.done),
            start_timeout=config.actor_start_timeout,
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
        actor = SegmentationActor.options(**self.options).remote(  # type: ignore[attr-defined]
            self.setup, self.device, self.threads, self.options["num_gpus"]
        )
        return actor, actor.ready.remote()

    def submit(self, actor: Any, work: Work) -> Any:
        if self.job.lease is not None:
            self.job.lease.check()  # another job took the output: hand out nothing more
        return actor.process.remote(*work)

    @staticmethod
    def wait(refs: list[Any], timeout: float) -> list[Any]:
        """Every ref of ``refs`` that is ready once one is (or ``timeout`` passes): with a thousand actors,
        one ref per wait would leave the driver behind."""
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
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

    def in_progress(self, actors: list[Any]) -> float:
        calls = [actor.images_started.remote() for actor in actors]
        with contextlib.suppress(GetTimeoutError, RayActorError):
            return float(sum(ray.get(calls, timeout=2.0)))
        return 0

    def idle_message(self) -> str:
        """What an actor needs and what the cluster has: ``each needs 1 GPU and 2 CPU; the cluster has 0 GPU
        and 2 CPU in all, 0 GPU and 2 CPU free``."""
        needs = {"GPU": self.options["num_gpus"], "CPU": self.options["num_cpus"]}
        needs = {name: amount for name, amount in needs.items() if amount}
        total, free = ray.cluster_resources(), ray.available_resources()

        def amounts(resources: dict[str, float]) -> str:
            return " and ".join(f"{resources.get(name, 0):g} {name}" for name in needs)

        return f"each needs {amounts(needs)}; the cluster has {amounts(total)} in all, {amounts(free)} free"


def _reason(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(e, RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
