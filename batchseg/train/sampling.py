"""Which examples a worker trains on, in which order: an epoch is a block shuffle of the training set (its
chunks in an order drawn from (seed, epoch), each chunk's examples in an order of their own), and each
worker takes a contiguous share of it, so it reads its chunks one after another, each once."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache

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


def share(total: int, rank: int, world: int, batch_size: int) -> range:
    """Rank ``rank``'s positions of an epoch of ``total`` examples: a contiguous ``1/world`` of it, of a whole
    number of batches, every rank the same number of steps (DDP needs that): the last shares run past the
    end and wrap around to the epoch's start."""
    steps = -(-total // (world * batch_size))
    per_rank = steps * batch_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def examples_at(data: TrainingSet, order: EpochOrder, positions: Iterable[int]) -> Iterator[Example]:
    """The examples at ``positions`` of ``order`` (taken modulo its length), reading each chunk when it is
    first needed and keeping only the last one read."""
    held: tuple[int, list[Example]] | None = None
    for position in positions:
        chunk, row = order[position % len(order)]
        if held is None or held[0] != chunk:
            held = (chunk, data.read_chunk(chunk))
        yield held[1][row]
