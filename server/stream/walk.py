"""A walk's waits, as requests: a walker (``server.stream.walker``) is synchronous and stops where
a shard's count or packed rows are not at hand; these generators yield what it lacks (its
``Need``) until it can go on, for a driver (``server.serve.drive``) to await. Use them with
``yield from``."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

from server.stream.params import TURN, Turn
from server.stream.walker import MixtureWalker, Need, Walker

AnyWalker = Walker | MixtureWalker
Waits = Generator[Need | Turn, None, None]


def skip(walker: AnyWalker, n: int) -> Waits:
    """Pass over the next ``n`` rows."""
    done = walker.skip_now(n)
    while not done:
        yield walker.need or TURN
        done = walker.skip_now(0)


def take(walker: AnyWalker, out: np.ndarray,
         provenance: list[np.ndarray] | None = None) -> Generator[Need | Turn, None, int]:
    """Fill ``out`` with the next rows; return the epoch of the first (see ``take_now_rows``)."""
    while not walker.take_now_rows(out, provenance):
        yield walker.need or TURN
    return walker.first_epoch
