"""A simulated cluster for the scheduler (its ``Backend``): actors that are placed when the cluster has room,
start after a delay and run the shards queued on them one after the other on a virtual clock, some shards
raising, some actors dying and some places holding a bad GPU, as told. Used by ``tests/test_scheduling.py``
and ``bench/scheduler.py``; no Ray, no sleeping."""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from typing import Any

from batchseg.format.output import ShardRecord
from batchseg.segment.scheduling import ActorLost, ShardFailed, Work

# What a GPU with a sticky fault raises on every forward pass.
CUDA_ERROR = "RuntimeError: CUDA error: an illegal memory access was encountered"


class SimulatedCluster:
    """Args:
    start_seconds: how long an actor takes to start, once placed.
    shard_seconds: how long a shard takes on an actor (virtual seconds).
    fail_every: attempt A of shard S raises in the shard's code when S + A is a multiple of this (0: never):
        one attempt in this many, whichever actor runs it, and the shard's next attempts succeed.
    die_every: the same for the actor dying while running the attempt.
    jitter: a shard takes ``shard_seconds`` times a factor drawn from ``1 +- jitter``.
    capacity: how many actors the cluster holds at once (None: any number); an actor started beyond it
        waits, unplaced, until another ends.
    bad_places: the first this many places hold a bad GPU: an actor placed there raises at once on every
        shard, and so does the fresh one that takes its place (an actor takes the lowest free place).
    """

    def __init__(
        self,
        start_seconds: float = 5.0,
        shard_seconds: float = 10.0,
        fail_every: int = 0,
        die_every: int = 0,
        jitter: float = 0.2,
        capacity: int | None = None,
        bad_places: int = 0,
    ) -> None:
        self.start_seconds = start_seconds
        self.shard_seconds = shard_seconds
        self.fail_every = fail_every
        self.die_every = die_every
        self.jitter = jitter
        self.capacity = capacity
        self.bad_places = bad_places
        self.now = 0.0
        self.events: list[tuple[float, int, Any]] = []  # (time, tie-break, ref)
        self.outcomes: dict[Any, tuple[str, Any]] = {}
        self.free_at: dict[int, float] = {}  # actor -> when its queue is done
        self.alive: set[int] = set()
        self.place: dict[int, int] = {}  # placed actor -> its place in the cluster
        self.free_places: list[int] = []  # places below len(self.place) that an actor left (a heap)
        self.unplaced: deque[tuple[int, Any]] = deque()  # (actor, its start ref), waiting for room
        self.queued: dict[int, set[Any]] = {}  # actor -> refs of its start and shards, not yet taken
        self.owner: dict[Any, int] = {}  # ref -> actor
        self.actors = itertools.count()
        self.refs = itertools.count()
        self.attempts = 0
        self.done: list[int] = []  # shard indexes, one entry per successful attempt
        self.ran_on: dict[tuple[int, int], int] = {}  # (shard, attempt) -> the actor it was last given to
        self.started = self.killed = self.failed = self.died = self.waits = 0
        self.random = random.Random(0)

    def clock(self) -> float:
        return self.now

    def _ref(self, actor: int, outcome: tuple[str, Any]) -> Any:
        ref = next(self.refs)
        self.outcomes[ref] = outcome
        self.owner[ref] = actor
        self.queued.setdefault(actor, set()).add(ref)
        return ref

    def _at(self, at: float, ref: Any) -> None:
        heapq.heappush(self.events, (at, ref, ref))

    def start_actor(self) -> tuple[Any, Any]:
        actor = next(self.actors)
        self.alive.add(actor)
        self.started += 1
        ready = self._ref(actor, ("ok", True))
        self.unplaced.append((actor, ready))
        self._place()
        return actor, ready

    def _place(self) -> None:
        """Place waiting actors while the cluster has room, each in the lowest free place."""
        while self.unplaced and (self.capacity is None or len(self.place) < self.capacity):
            actor, ready = self.unplaced.popleft()
            if actor not in self.alive:
                continue
            self.place[actor] = heapq.heappop(self.free_places) if self.free_places else len(self.place)
            self.free_at[actor] = self.now + self.start_seconds
            self._at(self.free_at[actor], ready)

    def _gone(self, actor: int) -> None:
        self.alive.discard(actor)
        place = self.place.pop(actor, None)
        if place is not None:
            heapq.heappush(self.free_places, place)
            self._place()

    def submit(self, actor: Any, work: Work) -> Any:
        shard, attempt = work
        self.attempts += 1
        self.ran_on[shard.index, attempt] = actor
        if self.place[actor] < self.bad_places:  # fails at once: it is always the first to be free
            ref = self._ref(actor, ("failed", CUDA_ERROR))
            self._at(max(self.free_at[actor], self.now), ref)
            return ref
        finish = max(self.free_at[actor], self.now) + self.shard_seconds * self.random.uniform(
            1 - self.jitter, 1 + self.jitter
        )
        self.free_at[actor] = finish
        if self.die_every and (shard.index + attempt) % self.die_every == 0:
            outcome: tuple[str, Any] = ("died", actor)
        elif self.fail_every and (shard.index + attempt) % self.fail_every == 0:
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
        ref = self._ref(actor, outcome)
        self._at(finish, ref)
        return ref

    def wait(self, refs: list[Any], timeout: float) -> list[Any]:
        """Every ref ready at the next moment anything is (none, and the clock moves on, if nothing is)."""
        self.waits += 1
        ready: list[Any] = []
        while self.events and (not ready or self.events[0][0] <= self.now):
            at, _, ref = heapq.heappop(self.events)
            if ref in self.outcomes:  # not taken by a kill
                self.now = max(self.now, at)
                ready.append(ref)
        if not ready:
            self.now += timeout
        return ready

    def result(self, ref: Any) -> Any:
        kind, value = self.outcomes.pop(ref)
        self.queued[self.owner.pop(ref)].discard(ref)
        if kind == "failed":
            self.failed += 1
            raise ShardFailed(value)
        if kind == "died":
            self.died += 1
            self._gone(value)
            raise ActorLost("the actor died (simulated)")
        if isinstance(value, ShardRecord):
            self.done.append(value.shard)
        return value

    def kill(self, actor: Any) -> None:
        """The actor and what it had queued are gone; its place goes to an actor waiting for one."""
        self.killed += 1
        for ref in self.queued.pop(actor, set()):
            self.outcomes.pop(ref, None)
            self.owner.pop(ref, None)
        self._gone(actor)

    def in_progress(self, actors: list[Any]) -> int:
        return 0

    def idle_message(self) -> str:
        if self.capacity is None:
            return "each needs 1 place; the cluster has any number"
        return f"each needs 1 place; the cluster has {self.capacity} in all, {self.capacity - len(self.place)} free"
