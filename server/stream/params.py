"""A stream's validated request, the chunks it yields and what it asks its driver for: plain data,
shared by the dealing loop, the token-budget planner and the gRPC edge.

The dealing loop and the planner are synchronous generators (sans-IO): where they need something
that takes waiting, they yield a request (a walker's ``Need``, ``Space``, ``Turn`` or
``Offload``), and the driver at the gRPC edge (``server.serve.drive``) awaits it and sends the
answer back. So the stream wing decides everything and awaits nothing."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.stages.exclusion import Stages
from server.stages.mixture import WeightSchedule
from server.stages.order import Locator
from server.stages.served import Served
from server.stream.walker import Need


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
    #: a data plan's mixture weights from a row on (the mixture's own schedule before it)
    schedule: WeightSchedule | None = None
    #: a data plan's exclusions, by dataset name (a mixture's components each have their own)
    stages: dict[str, Stages] | None = None
    #: the kinds of the data plan's edits this stream carries, one per edit (metrics, Describe)
    plan_edits: tuple[str, ...] = ()
    #: ``batches_per_message`` is a ceiling: the driver may grant fewer batches a message (``Space``)
    batches_adaptive: bool = False


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


@dataclass(frozen=True)
class Space:
    """Asks for the space of the next message's tokens; the answer is a ``MessageSpace`` (the gRPC
    edge decides where: a message buffer, a shared-memory ring's slot once the client freed it).
    With ``fewer``, the answer may hold fewer batches (its first dimension) than ``shape`` asks:
    the driver sizes messages to the server's load (``server.serve.pacing``)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fewer: bool = False


@dataclass(frozen=True)
class Turn:
    """Asks for a turn of the event loop (long planning lets the other streams go on); no answer."""


@dataclass(frozen=True)
class Offload:
    """Asks for ``fn(*args)`` run in a thread (work long enough to stall every other stream); the
    answer is its result."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


TURN = Turn()

#: What a stream's generator yields: its chunks, and the requests its driver answers.
Request = Need | Space | Turn | Offload
Dealt = Generator[Chunk | Request, Any, None]
