"""A simulated cluster for the scheduler (its ``Backend``): actors that start after a delay and run the
shards queued on them one after the other on a virtual clock, some shards raising and some actors dying
as told. Used by ``tests/test_scheduling.py`` and ``bench/scheduler.py``; no Ray, no sleeping."""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Any

from batchseg.format.output import ShardRecord
from batchseg.segment.scheduling import ActorLost, ShardFailed, Work


class SimulatedCluster:
    """Args:
    start_seconds: how long an actor takes to start.
    shard_seconds: how long a shard takes on an actor (virtual seconds).
    fail_every: every this many attempts raise in the shard's code (0: never).
    die_every: every this many attempts, the actor dies while running it (0: never).
    """

    def __init__(
        self, start_seconds: float = 5.0, shard_seconds: float = 10.0, fail_every: int = 0, die_every: int = 0
    ) -> None:
        self.start_seconds = start_seconds
        self.shard_seconds = shard_seconds
        self.fail_every = fail_every
        self.die_every = die_every
        self.now = 0.0
        self.events: list[tuple[float, int, Any]] = []  # (time, tie-break, ref)
        self.outcomes: dict[Any, tuple[str, Any]] = {}
        self.free_at: dict[int, float] = {}  # actor -> when its queue is done
        self.alive: set[int] = set()
        self.queued: dict[int, set[Any]] = {}  # actor -> refs of its start and shards, not yet taken
        self.owner: dict[Any, int] = {}  # ref -> actor
        self.actors = itertools.count()
        self.refs = itertools.count()
        self.attempts = 0
        self.done: list[int] = []  # shard indexes, one entry per successful attempt
        self.started = self.killed = self.failed = self.died = 0
        self.jitter = random.Random(0)

    def clock(self) -> float:
        return self.now

    def _schedule(self, actor: int, at: float, outcome: tuple[str, Any]) -> Any:
        ref = next(self.refs)
        self.outcomes[ref] = outcome
        self.owner[ref] = actor
        self.queued.setdefault(actor, set()).add(ref)
        heapq.heappush(self.events, (at, ref, ref))
        return ref

    def start_actor(self) -> tuple[Any, Any]:
        actor = next(self.actors)
        self.alive.add(actor)
        self.started += 1
        self.free_at[actor] = self.now + self.start_seconds
        return actor, self._schedule(actor, self.free_at[actor], ("ok", True))

    def submit(self, actor: Any, work: Work) -> Any:
        shard, attempt = work
        self.attempts += 1
        finish = max(self.free_at[actor], self.now) + self.shard_seconds * self.jitter.uniform(0.8, 1.2)
        self.free_at[actor] = finish
        if self.die_every and self.attempts % self.die_every == 0:
            outcome: tuple[str, Any] = ("died", actor)
        elif self.fail_every and self.attempts % self.fail_every == 0:
            outcome = ("failed", "ValueError: simulated")
        else:
            record = ShardRecord(
                rows=len(shard),
                ok=len(shard),
                errors={},
                instances=0,
                seconds=0.0,
                attempt=attempt,
                shard=shard.index,
            )
            outcome = ("ok", record)
        return self._schedule(actor, finish, outcome)

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        while self.events:
            at, _, ref = heapq.heappop(self.events)
            if ref in self.outcomes:  # not taken by a kill
                self.now = max(self.now, at)
                return [ref]
        self.now += timeout
        return []

    def result(self, ref: Any) -> Any:
        kind, value = self.outcomes.pop(ref)
        self.queued[self.owner.pop(ref)].discard(ref)
        if kind == "failed":
            self.failed += 1
            raise ShardFailed(value)
        if kind == "died":
            self.died += 1
            self.alive.discard(value)
            raise ActorLost("the actor died (simulated)")
        if isinstance(value, ShardRecord):
            self.done.append(value.shard)
        return value

    def kill(self, actor: Any) -> None:
        """The actor and what it had queued are gone."""
        self.alive.discard(actor)
        self.killed += 1
        for ref in self.queued.pop(actor, set()):
            self.outcomes.pop(ref, None)
            self.owner.pop(ref, None)

    def in_progress(self, actors: list[Any]) -> int:
        return 0

    def idle_message(self) -> str:
        return "simulated"
