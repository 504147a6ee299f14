"""The global order as arithmetic: seeded shard and document permutations per epoch, cumulative
rows from counts, where a row lies (``locate``), and how a job's rows are dealt to its ranks (``Dealing``;
``lpt`` for a token-budget step's pieces).

Pure functions of counts and seeds: no files, cache, store or event loop. The walker
(``server.stream.walker``) and the store (``server.supply.store``) compute with these, and
``tests/test_order.py`` checks them with properties alone."""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Dealing", "EpochRows", "Locator", "cached_shard_order", "cumulative_rows", "doc_order", "epoch_rows",
           "locate", "lpt", "shard_order"]

_SHARDS, _DOCS = 1, 2


def shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the shards (a permutation of their indices)."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch, _SHARDS]))
    return rng.permutation(num_shards)


@functools.lru_cache(maxsize=256)
def cached_shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """``shard_order``, remembered for the epochs in use (read-only: shared by every caller)."""
    order = shard_order(seed, epoch, num_shards)
    order.flags.writeable = False
    return order


def doc_order(seed: int, epoch: int, shard_index: int, num_docs: int) -> np.ndarray:
    """The order of a shard's documents in epoch ``epoch``."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch, _DOCS, shard_index]))
    return rng.permutation(num_docs)


@dataclass(frozen=True)
class Locator:
    """Where global row ``row`` lies: row ``shard_row`` of the ``shard``-th shard of ``epoch``'s
    order. ``shard_row`` may equal that shard's row count (the position just after it)."""

    row: int = 0
    epoch: int = 0
    shard: int = 0
    shard_row: int = 0
    #: for a mixture: each component's own position, in the mixture's component order
    components: tuple[tuple[str, Locator], ...] = ()


def cumulative_rows(rows_in_order: Sequence[int]) -> list[int]:
    """``[0, r0, r0 + r1, ...]`` of an epoch's shards in their order (a list: it is bisected a few
    times per message, where numpy's call overhead would dominate)."""
    return [0, *itertools.accumulate(rows_in_order)]


def epoch_rows(seed: int, epoch: int, rows_of_shard: Sequence[int]) -> list[int]:
    """Cumulative rows of epoch ``epoch``'s shards in that epoch's order, from each shard's rows
    (``rows_of_shard[index]``)."""
    order = cached_shard_order(seed, epoch, len(rows_of_shard))
    return cumulative_rows([rows_of_shard[i] for i in order.tolist()])


#: An epoch's cumulative rows (``epoch_rows``), or None where a count is not known yet.
EpochRows = Callable[[int], "list[int] | None"]


def locate(epoch_rows_of: EpochRows, epoch: int, shard: int, offset: int) -> tuple[int, int, int, int] | None:
    """The position ``offset`` rows after the start of shard ``shard`` of ``epoch``:
    ``(epoch, shard, shard_row, rows of that shard)``, at the end of a shard when the row falls
    on a boundary (as a walk leaves it). Whole epochs are skipped by division (every epoch holds
    the same rows: a shard's count does not depend on the order), so a far row costs two lookups.
    None when a count on the way is not known, or an epoch holds no rows."""
    cum = epoch_rows_of(epoch)
    if cum is None:
        return None
    x = cum[shard] + offset
    if x > cum[-1]:
        if cum[-1] == 0:
            return None
        epochs = (x - 1) // cum[-1]
        x -= epochs * cum[-1]
        epoch += epochs
        cum = epoch_rows_of(epoch)
        if cum is None:
            return None
    s = bisect.bisect_left(cum, x) - 1
    return epoch, s, x - cum[s], cum[s + 1] - cum[s]


@dataclass(frozen=True)
class Dealing:
    """How a job's global rows are dealt: step ``t`` is ``world_size * batch_size`` consecutive
    rows from ``origin + t * world_size * batch_size``, and rank ``r`` takes the ``batch_size``
    rows at ``r * batch_size`` within it. Every row of the job's sequence goes to exactly one
    (step, rank), whatever the world size; a cursor is the row after a step."""

    origin: int
    world_size: int
    batch_size: int

    @property
    def rows_per_step(self) -> int:
        return self.world_size * self.batch_size

    def first_row(self, step: int, rank: int) -> int:
        """The first global row of rank ``rank``'s batch at step ``step``."""
        return self.origin + step * self.rows_per_step + rank * self.batch_size

    def end_of_step(self, step: int) -> int:
        """The global row just after step ``step`` (what the job's cursor says after it)."""
        return self.origin + (step + 1) * self.rows_per_step


def lpt(lengths: list[int], ranks: int) -> list[int]:
    """Longest-processing-time: longest piece first, each to the least-loaded rank (ties: the
    lowest rank). A heap of (load, rank): O(pieces x log ranks), not O(pieces x ranks)."""
    owner = [0] * len(lengths)
    heap = [(0, k) for k in range(ranks)]  # already a heap: sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, r = heap[0]
        owner[i] = r
        heapq.heapreplace(heap, (load + lengths[i], r))
    return owner
