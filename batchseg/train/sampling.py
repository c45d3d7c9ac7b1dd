"""Which examples a worker trains on, in which order: an epoch is a block shuffle of the training set (its
chunks in an order drawn from (seed, epoch), each chunk's examples in an order of their own), and each
worker takes a contiguous share of what is left of it, so it reads its chunks one after another, each once.
A run's :class:`Progress` (step, epoch, the epoch's positions not yet trained on) is what a checkpoint
keeps, so a run resumes with any number of workers and trains on each position of each epoch once."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np

from batchseg.train.examples import Example, TrainingSet


class EpochOrder:
    """Position ``p`` of an epoch (0 to ``len - 1``) as ``(chunk, row)``: chunks permuted by (seed, epoch),
    rows within each chunk by (seed, epoch, chunk). Holds a few numbers per chunk, never one per example."""

    def __init__(self, chunk_sizes: tuple[int, ...], seed: int, epoch: int) -> None:
        self.seed, self.epoch = seed, epoch
        self.sizes = np.asarray(chunk_sizes, dtype=np.int64)
        self.chunks = np.random.default_rng([seed, epoch]).permutation(len(self.sizes))
        self.ends = np.cumsum(self.sizes[self.chunks])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, position: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.ends, position, side="right"))
        start = int(self.ends[k] - self.sizes[self.chunks[k]])
        chunk = int(self.chunks[k])
        return chunk, int(self._rows(chunk)[position - start])

    @lru_cache(maxsize=2)  # noqa: B019 (one order per epoch, dropped with it)
    def _rows(self, chunk: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, chunk]).permutation(int(self.sizes[chunk]))


Interval = tuple[int, int]  # positions [start, end) of an epoch's order


def count(intervals: Iterable[Interval]) -> int:
    return sum(end - start for start, end in intervals)


def cut(intervals: Sequence[Interval], start: int, stop: int) -> list[Interval]:
    """The ``start``-th to the ``stop - 1``-th positions of ``intervals`` laid end to end."""
    pieces: list[Interval] = []
    offset = 0
    for low, high in intervals:
        first, last = max(start - offset, 0), min(stop - offset, high - low)
        if first < last:
            pieces.append((low + first, low + last))
        offset += high - low
    return pieces


def positions(intervals: Iterable[Interval]) -> Iterator[int]:
    for start, end in intervals:
        yield from range(start, end)


@dataclass(frozen=True)
class Progress:
    """How far a run is: optimizer steps taken (one per step whatever the number of workers), the epoch,
    and the positions of its :class:`EpochOrder` not yet trained on, a few intervals. Each rank's share of
    an epoch is a contiguous slice of what remains; the shares are the same number of steps (DDP needs
    that), so the shorter ones are padded with duplicates, trained on but never counted as seen."""

    examples: int  # in an epoch
    step: int = 0
    epoch: int = 0
    remaining: tuple[Interval, ...] = ()  # empty only with no examples: see start()

    @classmethod
    def start(cls, examples: int, epoch: int = 0, step: int = 0) -> Progress:
        return cls(examples, step, epoch, ((0, examples),) if examples else ())

    @property
    def images_seen(self) -> int:
        """Positions trained on in all epochs so far, each once: what the schedule and the run's length
        count, the same whatever the number of workers."""
        return self.epoch * self.examples + self.examples - count(self.remaining)

    def steps(self, world: int, batch_size: int) -> int:
        """The steps left in this epoch on ``world`` workers."""
        return -(-count(self.remaining) // (world * batch_size))

    def share(self, rank: int, world: int, batch_size: int) -> list[Interval]:
        """Rank ``rank``'s positions for the rest of this epoch: a contiguous ``1/world`` of what remains (by
        count), padded to a whole number of batches by going round it again from its start. A padded
        duplicate is thus one this rank trained on in its first step: what remains is never trained early.
        With fewer positions than ranks (one step left), a rank without any goes round all that remains."""
        start, end = self._spans(world, batch_size)[rank]
        if start == end:
            start, end = 0, count(self.remaining)
        per_rank = self.steps(world, batch_size) * batch_size
        return [
            i
            for lap in range(0, per_rank, end - start)
            for i in cut(self.remaining, start, start + min(end - start, per_rank - lap))
        ]

    def _spans(self, world: int, batch_size: int) -> list[Interval]:
        """Each rank's share of what remains, padding left out, as ``[start, end)`` of it laid end to end:
        sizes differ by one at most, so the padding (less than a batch) comes only in a rank's last step."""
        left = count(self.remaining)
        return [(rank * left // world, (rank + 1) * left // world) for rank in range(world)]

    def images_after(self, steps: int, world: int, batch_size: int) -> int:
        """Images seen after ``steps`` more steps of this epoch on ``world`` workers."""
        done = max(steps, 0) * batch_size
        return self.images_seen + sum(min(done, end - start) for start, end in self._spans(world, batch_size))

    def steps_to(self, images: int, world: int, batch_size: int) -> int:
        """The steps of this epoch after which ``images`` have been seen, or all its steps if fewer."""
        steps = self.steps(world, batch_size)
        after = range(1, steps + 1)
        found = bisect.bisect_left(after, images, key=lambda k: self.images_after(k, world, batch_size))
        return after[found] if found < steps else steps

    def advance(self, steps: int, world: int, batch_size: int) -> Progress:
        """After ``steps`` steps of every one of ``world`` ranks: what remains is each rank's share less the
        batches it trained on; when nothing remains, the next epoch starts whole."""
        done = steps * batch_size
        spans = self._spans(world, batch_size)
        left = [i for start, end in spans for i in cut(self.remaining, min(start + done, end), end)]
        if not left:
            return Progress.start(self.examples, self.epoch + 1, self.step + steps)
        merged: list[Interval] = []
        for low, high in left:
            if merged and merged[-1][1] == low:
                merged[-1] = (merged[-1][0], high)
            else:
                merged.append((low, high))
        return replace(self, step=self.step + steps, remaining=tuple(merged))

    def state(self) -> dict[str, Any]:
        """For the checkpoint (``images_seen`` is there for people reading it)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "remaining": [list(i) for i in self.remaining],
            "images_seen": self.images_seen,
        }

    @classmethod
    def restore(cls, examples: int, state: dict[str, Any]) -> Progress:
        remaining = tuple((int(s), int(e)) for s, e in state["remaining"])
        return cls(examples, int(state["step"]), int(state["epoch"]), remaining)

    @classmethod
    def after_steps(cls, examples: int, steps: int, world: int, batch_size: int) -> Progress:
        """Where ``steps`` steps on a fixed ``world`` lead: for a checkpoint made before batchseg recorded
        its progress (its config records the worker count)."""
        progress = cls.start(examples)
        while progress.step < steps:
            progress = progress.advance(
                min(progress.steps(world, batch_size), steps - progress.step), world, batch_size
            )
        return progress


def examples_at(data: TrainingSet, order: EpochOrder, positions: Iterable[int]) -> Iterator[Example]:
    """The examples at ``positions`` of ``order`` (taken modulo its length), reading each chunk when it is
    first needed and keeping only the last one read."""
    held: tuple[int, list[Example]] | None = None
    for position in positions:
        chunk, row = order[position % len(order)]
        if held is None or held[0] != chunk:
            held = (chunk, data.read_chunk(chunk))
        yield held[1][row]
