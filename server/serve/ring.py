"""Streaming tokens through a client's shared-memory ring: the slots, handed out at the client's pace."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from server.stream.params import MessageSpace
from tokenfeed.shm import ServerRing


#: Waiting on a full ring: the first poll, and the bounds on the longest (see ``RingWriter``).
RING_POLL_S = (0.0002, 0.25)


class RingWriter:
    """Hands out the slots of a client's shared-memory ring in message order.

    A full ring means the client has ``slots`` messages to go through; it frees the next slot
    about one message's time from now. So the server polls (doubling from 0.2 ms) up to half the
    time the client has been taking per message: the wake-ups follow the client's pace, a few per
    message, instead of a fixed rate per waiting stream (a slow trainer keeps its ring full).

    A message is assembled in a buffer of this stream's own, never in the client's file (which the
    client may truncate under a mapping: SIGBUS, the whole server gone); the caller copies it into
    the slot with ``ServerRing.write`` before sending the message that names the slot. One buffer
    per stream, of one message's bytes (what admission charged the stream; not the client-chosen
    slot size), reused for every message: it stays in cache and is never faulted in again.
    """

    def __init__(self, ring: ServerRing) -> None:
        self.ring, self.message = ring, 0
        self._seen = (0, time.monotonic())  # (released count, when it was seen)
        self._per_message = 0.04  # seconds per message, until measured
        self._buffer: np.ndarray | None = None

    async def take(self, shape: tuple[int, ...], dtype: np.dtype) -> MessageSpace:
        """The array where the next message's tokens go (valid until the next call) and the slot
        they are to be written to, once the client has freed it. ``RingBroken`` if the client
        broke its ring meanwhile."""
        ring, message = self.ring, self.message
        delay = RING_POLL_S[0]
        while not ring.writable(message):
            await asyncio.sleep(delay)
            self._observe()
            delay = min(delay * 2, max(RING_POLL_S[0], min(RING_POLL_S[1], self._per_message / 2)))
        self.message += 1
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes > ring.slot_bytes:
            raise ValueError(f"a message of {nbytes} bytes does not fit a slot of {ring.slot_bytes}")
        if self._buffer is None or self._buffer.nbytes != nbytes:
            self._buffer = np.empty(nbytes, dtype=np.uint8)
        return MessageSpace(self._buffer.view(dtype).reshape(shape), shm_slot=message % ring.slots)

    def _observe(self) -> None:
        released, now = self.ring.released(), time.monotonic()
        count, when = self._seen
        if released > count:
            self._per_message = 0.5 * self._per_message + 0.5 * (now - when) / (released - count)
            self._seen = (released, now)
