"""Streaming tokens through a client's shared-memory ring: the slots, handed out at the client's pace."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import numpy as np

from server.serve.limits import ShuttingDown
from server.stream.params import MessageSpace
from tokenfeed.shm import ServerPipe, ServerRing


#: Waiting on a full ring: the first poll, and the bounds on the longest (see ``RingWriter``).
RING_POLL_S = (0.0002, 0.25)
#: Messages written ahead of a client that has freed no slot yet (see ``RingWriter``).
RING_START_WINDOW = 2


class RingWriter:
    """Hands out the slots of a client's shared-memory ring in message order.

    A full ring means the client has ``slots`` messages to go through; it frees the next slot
    about one message's time from now. So the server polls (doubling from 0.2 ms) up to half the
    time the client has been taking per message: the wake-ups follow the client's pace, a few per
    message, instead of a fixed rate per waiting stream (a slow trainer keeps its ring full). A
    client that has freed nothing for longer than its pace (a rank holding its first batch while
    the job's other ranks start, an evaluation pause) is taking at least that long: the polls
    follow the time it has been idle, up to 0.25 s apart. (At the pace's first guess, 40 ms, each
    of a 1,024-rank job's ranks woke its server 50 times a second while it waited for the rest:
    256 streams a replica took 0.6 of the machine's 2 cores, and the job started later.)

    Until the client frees its first slot (it asks past its first message), only
    ``RING_START_WINDOW`` messages are written ahead, then as many as the ring holds: the ranks of
    a job each hold a first batch while the job's other ranks start, and filling every rank's ring
    (eight messages) before the last rank had its first one made the servers do four times the
    work a job's start needs. A trainer finds its second batch there after its first step, and
    the third is written during its second.

    A message is assembled in a buffer of this stream's own, never in the client's file (which the
    client may truncate under a mapping: SIGBUS, the whole server gone); the caller copies it into
    the slot with ``ServerRing.write`` before sending the message that names the slot. One buffer
    per stream, of one message's bytes (what admission charged the stream; not the client-chosen
    slot size), reused for every message: it stays in cache and is never faulted in again.

    A stream waiting for a slot while the server shuts down (``stopping()`` true) ends at once with
    ``ShuttingDown``: it is assembling no message, and its client, which stopped reading (a trainer
    in an evaluation, a paused job), would otherwise hold the shutdown for its whole grace period.
    """

    def __init__(self, ring: ServerRing, stopping: Callable[[], bool] | None = None) -> None:
        self.ring, self.message = ring, 0
        self._stopping = stopping
        self._seen = (0, time.monotonic())  # (released count, when it was seen)
        self._per_message = 0.04  # seconds per message, until measured
        self._buffer: np.ndarray | None = None

    async def take(self, shape: tuple[int, ...], dtype: np.dtype) -> MessageSpace:
        """The array where the next message's tokens go (valid until the next call) and the slot
        they are to be written to, once the client has freed it. ``RingBroken`` if the client
        broke its ring meanwhile."""
        ring, message = self.ring, self.message
        delay = RING_POLL_S[0]
        while not self._writable(message):
            if self._stopping is not None and self._stopping():
                raise ShuttingDown()
            await asyncio.sleep(delay)
            pace = self._observe()
            delay = min(delay * 2, max(RING_POLL_S[0], min(RING_POLL_S[1], pace / 2)))
        self.message += 1
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > ring.slot_bytes:
            raise ValueError(f"a message of {nbytes} bytes does not fit a slot of {ring.slot_bytes}")
        if self._buffer is None or self._buffer.nbytes < nbytes:  # (paced messages may be smaller)
            self._buffer = np.empty(nbytes, dtype=np.uint8)
        return MessageSpace(self._buffer[:nbytes].view(dtype).reshape(shape), shm_slot=message % ring.slots)

    def _writable(self, message: int) -> bool:
        """Whether message ``message`` may be written now: a slot is free, and the client has freed
        one already or the message is among its first ``RING_START_WINDOW``."""
        released = self.ring.released()
        window = self.ring.slots if released else min(self.ring.slots, RING_START_WINDOW)
        return message < released + window

    def _observe(self) -> float:
        """Update the client's pace from its released count; the seconds a message takes it: its
        pace, or the time since it last freed a slot where that is longer."""
        released, now = self.ring.released(), time.monotonic()
        count, when = self._seen
        if released > count:
            self._per_message = 0.5 * self._per_message + 0.5 * (now - when) / (released - count)
            self._seen = (released, now)
            return self._per_message
        return max(self._per_message, now - when)


async def send_piped(pipe: ServerPipe, message: bytes) -> bool:
    """Send a message through a stream's FIFO, waiting while it is full (a client that has not
    read it yet); False once the client closed its end (it is gone: the stream ends)."""
    parts = pipe.frame(message)
    left = sum(len(p) for p in parts)
    try:
        while (written := pipe.write(parts)) < left:
            left -= written
            rest = b"".join(parts)[-left:]  # (rare: a FIFO holds the eight messages a ring does)
            parts = [rest]
            await _writable(pipe.fd)
    except BrokenPipeError:
        return False
    return True


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():  # (the loop may call it again before the waiter removes it)
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)
