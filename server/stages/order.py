"""The global order: seeded shard and document permutations per epoch, and stream positions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SHARDS, _DOCS = 1, 2


def shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the shards (a permutation of their indices)."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch, _SHARDS]))
    return rng.permutation(num_shards)


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
