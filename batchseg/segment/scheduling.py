"""The driver's scheduling, without Ray: which shards are left and retried, which actor holds what, how
many actors to run, the progress line, and the loop that uses them. The Ray driver (``driver.py``) only
answers the loop's calls (start an actor, queue a shard, wait, kill), through a :class:`Backend`.

As in Ray Data's own actor pool, each concern is its own small class, testable without a cluster:
``WorkQueue`` (shards to hand out, attempts, retries, give-ups), ``WorkerPool`` (actors, what each has
queued), ``ScalingPolicy`` (how many actors), ``Progress`` (counts, rate, ETA), and ``Scheduler`` (the
loop). ``bench/scheduler.py`` runs it with a thousand simulated actors.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from batchseg.errors import BatchsegError
from batchseg.format.output import ShardRecord
from batchseg.io.manifest import Shard

log = logging.getLogger(__name__)

QUEUE_PER_ACTOR = 2  # shards queued on each actor, so none waits for the driver between two shards
PROGRESS_EVERY_S = 5.0

Work = tuple[Shard, int]  # a shard and which attempt at it this is (1 = the first)


class WorkQueue:
    """The shards still to hand out: those to retry first, then the manifest's, streamed with one shard of
    lookahead (so it is known when the last one has been handed out).

    A failed attempt goes back for another try until ``max_attempts``; then the shard is given up and
    listed in :attr:`given_up` (a rerun of the job retries it).
    """

    def __init__(self, shards: Iterator[Shard], max_attempts: int) -> None:
        self.shards = shards
        self.max_attempts = max_attempts
        self.upcoming = next(shards, None)
        self.retry: deque[Work] = deque()
        self.retries = 0
        self.given_up: list[dict[str, Any]] = []

    def __bool__(self) -> bool:
        """Whether any shard is still to be handed out."""
        return bool(self.retry) or self.upcoming is not None

    def next(self) -> Work | None:
        if self.retry:
            return self.retry.popleft()
        if self.upcoming is None:
            return None
        shard, self.upcoming = self.upcoming, next(self.shards, None)
        return shard, 1

    def failed(self, work: Work, reason: str) -> bool:
        """Attempt ``work`` failed: queue the next attempt, or give the shard up. True if it will be retried."""
        shard, attempt = work
        self.retries += 1
        if attempt >= self.max_attempts:
            self.given_up.append({"shard": shard.index, "error": reason})
            return False
        self.retry.append((shard, attempt + 1))
        return True

    def put_back(self, work: Work) -> None:
        """Work that was queued on an actor that died before starting it: the attempt does not count."""
        self.retry.append(work)


@dataclass(eq=False)
class Worker:
    """One actor as the driver sees it. ``actor`` and the refs are opaque here (Ray handles and ObjectRefs
    in the driver, anything in tests)."""

    actor: Any
    started: Any  # the ref that resolves when the actor is up
    up: bool = False
    queue: list[tuple[Any, Work]] = field(default_factory=list)  # (ref, work), oldest first


class WorkerPool:
    """The actors, which are up, and what each has queued; the refs the driver waits on.

    Every change is O(1) (O(queue) at most), so the driver's cost per shard does not grow with the number
    of actors: the refs to wait on are kept up to date, not rebuilt.
    """

    def __init__(self) -> None:
        self.workers: dict[Worker, None] = {}  # insertion-ordered set
        self.refs: dict[Any, Worker] = {}  # every ref the driver waits on, with its worker
        self.starting_count = 0

    def __len__(self) -> int:
        return len(self.workers)

    def add(self, actor: Any, started: Any) -> Worker:
        worker = Worker(actor, started)
        self.workers[worker] = None
        self.refs[started] = worker
        self.starting_count += 1
        return worker

    def mark_up(self, worker: Worker) -> None:
        worker.up = True
        self.refs.pop(worker.started, None)
        self.starting_count -= 1

    def queue(self, worker: Worker, ref: Any, work: Work) -> None:
        worker.queue.append((ref, work))
        self.refs[ref] = worker

    def remove(self, worker: Worker) -> list[Work]:
        """Take ``worker`` out of the pool; returns the work it still had queued, oldest first."""
        del self.workers[worker]
        if not worker.up:
            self.refs.pop(worker.started, None)
            self.starting_count -= 1
        for ref, _ in worker.queue:
            self.refs.pop(ref, None)
        queued = [work for _, work in worker.queue]
        worker.queue.clear()
        return queued

    def starting(self) -> int:
        return self.starting_count

    def busy(self) -> bool:
        return len(self.refs) > self.starting_count

    def pending(self) -> dict[Any, Worker]:
        """Every ref the driver waits on (actor starts and queued shards), with the worker it belongs to."""
        return self.refs

    def room(self, worker: Worker) -> int:
        """How many more shards ``worker`` should be given now."""
        return QUEUE_PER_ACTOR - len(worker.queue) if worker.up else 0

    def finished(self, worker: Worker, ref: Any) -> Work:
        """The work whose result ``ref`` is, taken off ``worker``'s queue."""
        index = next(i for i, (r, _) in enumerate(worker.queue) if r == ref)
        del self.refs[ref]
        return worker.queue.pop(index)[1]


@dataclass(frozen=True)
class ScalingPolicy:
    """``--actors MIN,MAX``: MIN actors at once; then, once none is still starting and shards wait, start
    as many again (doubling) up to MAX, so a small job stays small and a cluster's autoscaler sees the
    demand as it grows. An actor that cannot start is retried, up to ``3 * MAX`` start failures."""

    low: int
    high: int

    def to_start(self, running: int, starting: int, work_waiting: bool) -> int:
        if starting or not work_waiting:
            return 0
        return min(self.high - running, max(1, running))

    def gives_up(self, start_failures: int) -> bool:
        return start_failures >= 3 * self.high


class Progress:
    """What this run has finished, and the progress line printed every ``every`` seconds:
    ``120/5000 images (2.4%) | 3.10 img/s | 2 errors | ETA 26m14s``."""

    def __init__(
        self, total_images: int, clock: Callable[[], float] = time.time, every: float = PROGRESS_EVERY_S
    ):
        self.total = total_images
        self.clock = clock
        self.every = every
        self.start = self.last = clock()
        self.images = self.errors = self.shards = 0

    def shard_done(self, record: ShardRecord) -> None:
        self.images += record.rows
        self.errors += sum(record.errors.values())
        self.shards += 1

    def due(self) -> bool:
        return self.clock() - self.last >= self.every

    def line(self, partial: int = 0) -> str:
        """The progress line; ``partial`` counts images of shards still in progress."""
        self.last = self.clock()
        done = self.images + partial
        elapsed = self.last - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = duration((self.total - done) / rate) if rate > 0 else "?"
        return (
            f"{done}/{self.total} images ({100 * done / max(1, self.total):.1f}%) | {rate:.2f} img/s | "
            f"{self.errors} errors | ETA {eta}"
        )


def duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ShardFailed(Exception):
    """A shard's code raised on a live actor (the actor takes more work)."""


class ActorLost(Exception):
    """An actor's process is gone (killed, out of memory, node lost), or it could not start."""


class Backend(Protocol):
    """What the scheduler asks of a cluster; :class:`~batchseg.segment.driver.Driver` answers with Ray, a
    simulation with anything. Handles and refs are opaque to the scheduler."""

    def start_actor(self) -> tuple[Any, Any]:
        """Start an actor; returns its handle and a ref that resolves once it is up."""

    def submit(self, actor: Any, work: Work) -> Any:
        """Queue ``work`` on ``actor``; returns the ref of its result (the shard's record)."""

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        """Some of ``refs`` that are ready (none if ``timeout`` seconds pass first)."""

    def result(self, ref: Any) -> Any:
        """The value behind a ready ref; raises :class:`ShardFailed` or :class:`ActorLost`."""

    def kill(self, actor: Any) -> None: ...

    def in_progress(self, actors: list[Any]) -> int:
        """Images started so far in the shards ``actors`` are working on, for the progress line (0 if
        unknown)."""

    def idle_message(self) -> str:
        """What to say while no actor has started (e.g. the resources a cluster lacks)."""


class Scheduler:
    """Hands a job's shards to a pool of actors through a :class:`Backend`, and survives their deaths.

    Each actor is kept ``QUEUE_PER_ACTOR`` shards ahead; a shard whose code raised is retried up to
    ``max_attempts``; the shards of an actor that died go back to the queue (the one it was running
    counts as an attempt) and a new actor takes its place. :meth:`run` always kills its actors when it
    returns or raises (Ctrl-C, an error).
    """

    def __init__(
        self,
        backend: Backend,
        shards: Iterator[Shard],
        *,
        max_attempts: int,
        scaling: ScalingPolicy,
        total_images: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.work = WorkQueue(shards, max_attempts)
        self.pool = WorkerPool()
        self.scaling = scaling
        self.progress = Progress(total_images, clock)
        self.clock = clock
        self.start_failures: list[str] = []

    def run(self) -> dict[str, Any]:
        """Process every shard; returns this run's counts (``shards_failed``, ``images_this_run``,
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
            self.backend.kill(worker.actor)

    def _run(self) -> None:
        for _ in range(self.scaling.low):
            self._start_actor()
        while self.pool.busy() or self.work:
            pending = self.pool.pending()
            if not pending:
                raise BatchsegError(
                    f"no actor could start: {self.start_failures[-1] if self.start_failures else '?'}"
                )
            for ref in self.backend.wait(list(pending), timeout=1.0):
                if ref in pending:  # not taken out by an earlier one (its actor replaced)
                    self._handle(ref, pending[ref])
            for _ in range(self.scaling.to_start(len(self.pool), self.pool.starting(), bool(self.work))):
                self._start_actor()
            if self.progress.due():
                self._report()
        self._report()

    def _start_actor(self) -> None:
        self.pool.add(*self.backend.start_actor())

    def _feed(self, worker: Worker) -> None:
        for _ in range(self.pool.room(worker)):
            work = self.work.next()
            if work is None:
                return
            self.pool.queue(worker, self.backend.submit(worker.actor, work), work)

    def _handle(self, ref: Any, worker: Worker) -> None:
        if not worker.up:
            try:
                self.backend.result(ref)
            except (ShardFailed, ActorLost) as e:
                self._replace(worker, f"an actor failed to start: {e}")
                return
            self.pool.mark_up(worker)
            self._feed(worker)
            return
        work = self.pool.finished(worker, ref)
        try:
            self.progress.shard_done(self.backend.result(ref))
        except ShardFailed as e:  # the shard's code raised; the actor lives on
            self._failed(work, str(e))
        except ActorLost as e:  # everything queued on it goes back
            self._failed(work, str(e))
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
        self.backend.kill(worker.actor)
        if start_failure is not None:
            self.start_failures.append(start_failure)
            log.info(start_failure)
            if self.scaling.gives_up(len(self.start_failures)):
                return  # stop restarting an actor that cannot start; _run() reports it
        self._start_actor()

    def _report(self) -> None:
        partial = self.backend.in_progress([w.actor for w in self.pool.workers if w.up and w.queue])
        if not any(w.up for w in self.pool.workers) and self.clock() - self.progress.start > 30:
            log.info(f"waiting for an actor to start ({self.backend.idle_message()})")
        log.info(self.progress.line(partial))
