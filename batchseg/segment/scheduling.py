"""The driver's scheduling, without Ray: which shards are left and retried, which actor holds what, how
many actors to run, the progress line, and the loop that uses them. The Ray driver (``driver.py``) only
answers the loop's calls (start an actor, queue a shard, wait, kill), through a :class:`Backend`.

As in Ray Data's own actor pool, each concern is its own small class, testable without a cluster:
``WorkQueue`` (shards to hand out, attempts, retries, give-ups), ``WorkerPool`` (actors, what each has
queued), ``ScalingPolicy`` (how many actors), ``Progress`` (counts, rate, ETA), and ``Scheduler`` (the
loop). ``bench/scheduler.py`` runs it with a thousand simulated actors.

A failing actor is kept away from the work: the fastest actor at taking shards is one that fails at once (a
GPU with a sticky fault), so a failed shard goes to another actor, and an actor that fails
``REPLACE_AFTER_FAILURES`` shards in a row is replaced by a fresh process.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from batchseg.errors import BatchsegError
from batchseg.format.output import ShardRecord
from batchseg.io.manifest import Shard

log = logging.getLogger(__name__)

QUEUE_PER_ACTOR = 2  # shards queued on each actor, so none waits for the driver between two shards
# Shards an actor fails in a row (a success resets the count) before it is replaced by a fresh one.
REPLACE_AFTER_FAILURES = 2
PROGRESS_EVERY_S = 5.0

Work = tuple[Shard, int]  # a shard and which attempt at it this is (1 = the first)


class WorkQueue:
    """The shards still to hand out: those to retry first, then the manifest's, streamed with one shard of
    lookahead (so it is known when the last one has been handed out).

    A failed attempt goes back for another try until ``max_attempts``; then the shard is given up and
    listed in :attr:`given_up` (a rerun of the job retries it). The queue remembers which actors failed
    each shard (opaque, hashable; ``None`` for none), so that another actor takes the next attempt.
    """

    def __init__(self, shards: Iterator[Shard], max_attempts: int) -> None:
        self.shards = shards
        self.max_attempts = max_attempts
        self.upcoming = next(shards, None)
        self.retry: deque[Work] = deque()
        self.failed_by: dict[int, list[Any]] = {}  # shard index -> the actors that failed it, while retried
        self.retries = 0
        self.given_up: list[dict[str, Any]] = []

    def __bool__(self) -> bool:
        """Whether any shard is still to be handed out."""
        return bool(self.retry) or self.upcoming is not None

    def next(self, taker: Any = None, up: Collection[Any] = ()) -> Work | None:
        """The next work for actor ``taker``: the oldest retry it has not failed, else the manifest's next
        shard. A retry goes back to an actor that failed it only when every actor in ``up`` (the actors
        that can take work, ``taker`` among them) failed it too: one bad actor must not eat the retries."""
        for i, (shard, _) in enumerate(self.retry):
            failed = self.failed_by.get(shard.index, ())
            if taker not in failed or sum(actor in up for actor in failed) >= len(up):
                work = self.retry[i]
                del self.retry[i]
                return work
        if self.upcoming is None:
            return None
        shard, self.upcoming = self.upcoming, next(self.shards, None)
        return shard, 1

    def failed(self, work: Work, reason: str, actor: Any = None) -> bool:
        """Attempt ``work`` failed on ``actor``: queue the next attempt, or give the shard up. True if it will
        be retried."""
        shard, attempt = work
        self.retries += 1
        if attempt >= self.max_attempts:
            self.given_up.append({"shard": shard.index, "error": reason})
            self.failed_by.pop(shard.index, None)
            return False
        self.failed_by.setdefault(shard.index, []).append(actor)
        self.retry.append((shard, attempt + 1))
        return True

    def done(self, work: Work) -> None:
        """Attempt ``work`` succeeded: who failed the shard before no longer matters."""
        self.failed_by.pop(work[0].index, None)

    def put_back(self, work: Work) -> None:
        """Work that was queued on an actor that died before starting it: the attempt does not count."""
        self.retry.append(work)


@dataclass(eq=False)
class Worker:
    """One actor as the driver sees it. ``actor`` and the refs are opaque here (Ray handles and ObjectRefs
    in the driver, anything in tests)."""

    actor: Any
    started: Any  # the ref that resolves when the actor is up
    since: float  # when it was asked to start (the scheduler's clock)
    up: bool = False
    queue: list[tuple[Any, Work]] = field(default_factory=list)  # (ref, work), oldest first
    failures_in_row: int = 0  # shards it failed since its last success


class WorkerPool:
    """The actors, which are up, and what each has queued; the refs the driver waits on.

    Every change is O(1) (O(queue) at most), so the driver's cost per shard does not grow with the number
    of actors: the refs to wait on are kept up to date, not rebuilt.
    """

    def __init__(self) -> None:
        self.workers: dict[Worker, None] = {}  # insertion-ordered set
        self.up: dict[Worker, None] = {}  # the workers that are up
        self.hungry: dict[Worker, None] = {}  # up workers left with room when no work fitted them
        self.refs: dict[Any, Worker] = {}  # every ref the driver waits on, with its worker
        self.not_up: dict[Worker, None] = {}  # the workers still starting, oldest first

    def __len__(self) -> int:
        return len(self.workers)

    def add(self, actor: Any, started: Any, since: float = 0.0) -> Worker:
        worker = Worker(actor, started, since)
        self.workers[worker] = None
        self.refs[started] = worker
        self.not_up[worker] = None
        return worker

    def mark_up(self, worker: Worker) -> None:
        worker.up = True
        self.up[worker] = None
        self.refs.pop(worker.started, None)
        del self.not_up[worker]

    def queue(self, worker: Worker, ref: Any, work: Work) -> None:
        worker.queue.append((ref, work))
        self.refs[ref] = worker

    def remove(self, worker: Worker) -> list[Work]:
        """Take ``worker`` out of the pool; returns the work it still had queued, oldest first."""
        del self.workers[worker]
        self.up.pop(worker, None)
        self.hungry.pop(worker, None)
        if not worker.up:
            self.refs.pop(worker.started, None)
            del self.not_up[worker]
        for ref, _ in worker.queue:
            self.refs.pop(ref, None)
        queued = [work for _, work in worker.queue]
        worker.queue.clear()
        return queued

    def starting(self) -> int:
        return len(self.not_up)

    def waited_longest(self) -> Worker | None:
        """The worker that has been starting the longest, if any is."""
        return next(iter(self.not_up), None)

    def busy(self) -> bool:
        return len(self.refs) > len(self.not_up)

    def pending(self) -> dict[Any, Worker]:
        """Every ref the driver waits on (actor starts and queued shards), with the worker it belongs to."""
        return self.refs

    def room(self, worker: Worker) -> int:
        """How many more shards ``worker`` should be given now."""
        return QUEUE_PER_ACTOR - len(worker.queue) if worker.up else 0

    def note_room(self, worker: Worker) -> None:
        """After ``worker`` was fed: if it still has room (no work fitted it), it is fed when work comes."""
        if self.room(worker):
            self.hungry[worker] = None
        else:
            self.hungry.pop(worker, None)

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
    """What this run has finished and what failed on the way, and the progress line printed every ``every``
    seconds: ``120/5000 images (2.4%) | 3.10 img/s | 2 errors | ETA 26m14s``, with the failures when there
    are any (``... | 2 errors | 3 shard failures, 1 actor replaced | ETA ...``).

    ``shard_failures`` counts attempts whose code raised on a live actor, ``actors_lost`` actors whose
    process ended while they held work (each costs its running shard an attempt), ``actors_replaced``
    actors killed for failing ``REPLACE_AFTER_FAILURES`` shards in a row; both kinds of actor are replaced.
    """

    def __init__(
        self, total_images: int, clock: Callable[[], float] = time.time, every: float = PROGRESS_EVERY_S
    ):
        self.total = total_images
        self.clock = clock
        self.every = every
        self.start = self.last = clock()
        self.images = self.errors = self.shards = 0
        self.shard_failures = self.actors_lost = self.actors_replaced = 0

    def shard_done(self, record: ShardRecord) -> None:
        self.images += record.rows
        self.errors += sum(record.errors.values())
        self.shards += 1

    def due(self) -> bool:
        return self.clock() - self.last >= self.every

    def line(self, partial: float = 0) -> str:
        """The progress line; ``partial`` counts images of shards still in progress (a tiled image by its
        share of tiles done: shown to a tenth of an image)."""
        self.last = self.clock()
        done = self.images + round(partial, 1)
        elapsed = self.last - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = duration((self.total - done) / rate) if rate > 0 else "?"
        failures = ", ".join(
            f"{n} {one if n == 1 else many}"
            for n, one, many in (
                (self.shard_failures, "shard failure", "shard failures"),
                (self.actors_lost, "actor lost", "actors lost"),
                (self.actors_replaced, "actor replaced", "actors replaced"),
            )
            if n
        )
        return (
            f"{f'{done:.1f}'.removesuffix('.0')}/{self.total} images ({100 * done / max(1, self.total):.1f}%) | {rate:.2f} img/s | "
            f"{self.errors} errors | {failures + ' | ' if failures else ''}ETA {eta}"
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

    def in_progress(self, actors: list[Any]) -> float:
        """Images started so far in the shards ``actors`` are working on (a tiled image by its share of
        tiles done), for the progress line (0 if unknown)."""

    def idle_message(self) -> str:
        """What to say while no actor has started (e.g. the resources a cluster lacks)."""


class Scheduler:
    """Hands a job's shards to a pool of actors through a :class:`Backend`, and survives their deaths.

    Each actor is kept ``QUEUE_PER_ACTOR`` shards ahead; a shard whose code raised is retried up to
    ``max_attempts``, on another actor when one is up; the shards of an actor that died go back to the
    queue (the one it was running counts as an attempt) and a new actor takes its place, as it does for an
    actor that failed ``REPLACE_AFTER_FAILURES`` shards in a row (killed: its queued shards cost no
    attempt). When no actor has started for ``start_timeout`` seconds, the job ends with one line saying
    what each actor needs and what the cluster has. :meth:`run` always kills its actors when it returns or
    raises (Ctrl-C, an error).
    """

    def __init__(
        self,
        backend: Backend,
        shards: Iterator[Shard],
        *,
        max_attempts: int,
        scaling: ScalingPolicy,
        total_images: int,
        start_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.work = WorkQueue(shards, max_attempts)
        self.pool = WorkerPool()
        self.scaling = scaling
        self.progress = Progress(total_images, clock)
        self.start_timeout = start_timeout
        self.clock = clock
        self.start_failures: list[str] = []
        self.said_fewer = False
        self.failure_kinds: set[str] = set()  # the kinds of shard failure said in full so far

    def run(self) -> dict[str, Any]:
        """Process every shard; returns this run's counts (see :func:`run_counts`)."""
        try:
            self._run()
        finally:
            self.shutdown()
        return run_counts(self.progress, self.work)

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
            self._feed_hungry()
            self._check_start_timeout()
            for _ in range(self.scaling.to_start(len(self.pool), self.pool.starting(), bool(self.work))):
                self._start_actor()
            if self.progress.due():
                self._report()
        self._report()

    def _start_actor(self) -> None:
        self.pool.add(*self.backend.start_actor(), since=self.clock())

    def _feed(self, worker: Worker) -> None:
        for _ in range(self.pool.room(worker)):
            work = self.work.next(worker, self.pool.up)
            if work is None:
                break
            self.pool.queue(worker, self.backend.submit(worker.actor, work), work)
        self.pool.note_room(worker)

    def _feed_hungry(self) -> None:
        """Work that came back (a failed shard another actor must take, the queue of a replaced actor) goes
        to the actors that were left with room."""
        if not (self.work and self.pool.hungry):
            return
        for worker in list(self.pool.hungry):
            self._feed(worker)
            if not self.work:
                return

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
            record = self.backend.result(ref)
        except ShardFailed as e:  # the shard's code raised; the actor lives on, unless it keeps failing
            self.progress.shard_failures += 1
            self._failed(work, str(e), worker)
            worker.failures_in_row += 1
            if worker.failures_in_row >= REPLACE_AFTER_FAILURES:
                self.progress.actors_replaced += 1
                log.info(
                    f"an actor failed {worker.failures_in_row} shards in a row; replacing it with a fresh one"
                )
                self._replace(worker, None)
                return
        except ActorLost as e:  # everything queued on it goes back
            self.progress.actors_lost += 1
            self._failed(work, str(e), worker)
            self._replace(worker, None)
            return
        else:
            worker.failures_in_row = 0
            self.work.done(work)
            self.progress.shard_done(record)
        self._feed(worker)

    def _failed(self, work: Work, reason: str, worker: Worker) -> None:
        shard, attempt = work
        # Each kind of failure is said in full once: expired credentials or a storage outage fail every
        # shard alike, and the progress line counts them; --verbose shows every one.
        kind = reason.partition(":")[0]
        said = log.debug if kind in self.failure_kinds else log.info
        self.failure_kinds.add(kind)
        said(f"shard {shard.index} failed on attempt {attempt}: {reason}")
        if not self.work.failed(work, reason, worker):
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
        if self.work:  # else the scaling policy starts one if work comes back
            self._start_actor()

    def _check_start_timeout(self) -> None:
        """End the job when an actor has waited ``start_timeout`` seconds to start and none is up: one that
        cannot be placed would otherwise be waited for forever. When some are up, the job goes on with them
        and says so once: they make progress, and the actors still waiting keep asking the cluster for room
        (an autoscaler still sees them, and they join when they start), where failing would throw away the
        running actors' work and make the user start over on the same cluster."""
        oldest = self.pool.waited_longest()
        if oldest is None or self.clock() - oldest.since < self.start_timeout:
            return
        if not self.pool.up:
            raise BatchsegError(
                f"no actor could start in {self.start_timeout:g} s: {self.backend.idle_message()}"
            )
        if not self.said_fewer:
            self.said_fewer = True
            up = len(self.pool.up)
            log.warning(
                f"{len(self.pool) - up} of {len(self.pool)} actors could not start in {self.start_timeout:g} s: "
                f"going on with {up}; the others join when the cluster has room ({self.backend.idle_message()})"
            )

    def _report(self) -> None:
        partial = self.backend.in_progress([w.actor for w in self.pool.up if w.queue])
        if self.work and not self.pool.up and self.clock() - self.progress.start > 30:
            log.info(f"waiting for an actor to start ({self.backend.idle_message()})")
        log.info(self.progress.line(partial))


def run_counts(progress: Progress, work: WorkQueue) -> dict[str, Any]:
    """A run's counts, which ``job.finish`` merges into ``_summary.json``: the shards given up
    (``shards_failed``), images and shards done, ``retries`` (attempts that failed: ``shard_failures`` +
    ``actors_lost``), and ``actors_replaced`` (see :class:`Progress`)."""
    return {
        "shards_failed": work.given_up,
        "images_this_run": progress.images,
        "shards_this_run": progress.shards,
        "retries": work.retries,
        "shard_failures": progress.shard_failures,
        "actors_lost": progress.actors_lost,
        "actors_replaced": progress.actors_replaced,
    }


def empty_run() -> dict[str, Any]:
    """The counts of a run that had nothing to do."""
    return run_counts(Progress(0), WorkQueue(iter(()), 1))
