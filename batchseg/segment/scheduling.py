"""The driver's bookkeeping, without Ray: which shards are left and retried, which actor holds what, how
many actors to run, and the progress line. The Ray driver (``driver.py``) only makes the calls.

As in Ray Data's own actor pool, each concern is its own small class, testable without a cluster:
``WorkQueue`` (shards to hand out, attempts, retries, give-ups), ``ActorPool`` (actors, what each has
queued), ``ScalingPolicy`` (how many actors) and ``Progress`` (counts, rate, ETA).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from batchseg.io.manifest import Shard

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


@dataclass
class Worker:
    """One actor as the driver sees it. ``actor`` and the refs are opaque here (Ray handles and ObjectRefs
    in the driver, anything in tests)."""

    actor: Any
    started: Any  # the ref that resolves when the actor is up
    up: bool = False
    queue: list[tuple[Any, Work]] = field(default_factory=list)  # (ref, work), oldest first


class ActorPool:
    """The actors, which are up, and what each has queued; the refs the driver waits on."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []

    def __len__(self) -> int:
        return len(self.workers)

    def add(self, actor: Any, started: Any) -> Worker:
        worker = Worker(actor, started)
        self.workers.append(worker)
        return worker

    def remove(self, worker: Worker) -> list[Work]:
        """Take ``worker`` out of the pool; returns the work it still had queued, oldest first."""
        self.workers.remove(worker)
        queued = [work for _, work in worker.queue]
        worker.queue.clear()
        return queued

    def starting(self) -> int:
        return sum(not w.up for w in self.workers)

    def busy(self) -> bool:
        return any(w.queue for w in self.workers)

    def pending(self) -> dict[Any, Worker]:
        """Every ref the driver waits on (actor starts and queued shards), with the worker it belongs to."""
        refs = {w.started: w for w in self.workers if not w.up}
        refs.update({ref: w for w in self.workers for ref, _ in w.queue})
        return refs

    def room(self, worker: Worker) -> int:
        """How many more shards ``worker`` should be given now."""
        return QUEUE_PER_ACTOR - len(worker.queue) if worker.up else 0

    def finished(self, worker: Worker, ref: Any) -> Work:
        """The work whose result ``ref`` is, taken off ``worker``'s queue."""
        index = next(i for i, (r, _) in enumerate(worker.queue) if r == ref)
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

    def shard_done(self, record: dict[str, Any]) -> None:
        self.images += record["rows"]
        self.errors += sum(record["errors"].values())
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
