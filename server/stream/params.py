"""A stream's validated request and the chunks it yields: plain data, shared by the dealing loop,
the token-budget planner and the gRPC edge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from server.stages.order import Locator
from server.stages.served import Served


@dataclass(frozen=True)
class StreamParams:
    """A validated stream request."""

    dataset: Served
    seed: int
    seq_len: int
    batch_size: int
    packing: str
    rank: int
    world_size: int
    first_step: int
    step_stride: int
    batches_per_message: int
    start: Locator
    provenance: bool = False
    max_tokens: int = 0  # token-budget batches when > 0
    zstd: bool = False  # the tokens are zstd-compressed on the wire
    #: rows passed over after ``start`` before step 0 (a data plan's skip): the dealing's origin moves
    skip_rows: int = 0


@dataclass
class Chunk:
    """Consecutive batches of one stream and the job position after each."""

    tokens: np.ndarray  # [num_batches, batch_size, seq_len + 1]
    cursors: list[Locator]
    steps: list[int]
    epochs: list[int]
    provenance: list[np.ndarray] | None = None  # per batch: records sorted by (row, column)
    starts: list[list[int]] | None = None  # token-budget batches: columns where pieces start
    buffer: np.ndarray | None = None  # a message's bytes up to its header: ``tokens`` is its tail
    shm_slot: int | None = None  # ``tokens`` go to this slot of the stream's shared-memory ring (``ServerRing.write``)


@dataclass
class MessageSpace:
    """Where one message's tokens are assembled: ``tokens`` (``[batches, rows, seq_len + 1]``),
    inside ``buffer`` (the message's bytes up to its header) or bound for ``shm_slot``."""

    tokens: np.ndarray
    buffer: np.ndarray | None = None
    shm_slot: int | None = None


class Buffers(Protocol):
    """Hands a stream the space for its next message's tokens (the gRPC edge decides where)."""

    async def take(self, shape: tuple[int, ...], dtype: np.dtype) -> MessageSpace: ...


class PlainBuffers:
    """A fresh array per message (for callers that encode messages themselves)."""

    async def take(self, shape: tuple[int, ...], dtype: np.dtype) -> MessageSpace:
        return MessageSpace(np.empty(shape, dtype=dtype))
