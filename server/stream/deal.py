"""The logic of one stream, without gRPC: validate a request, walk the global order, deal
batches to the rank, and attach to each batch the job position after it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping

import numpy as np

from server.config import ServerSettings
from server.errors import FailedPrecondition, InvalidArgument, NotFound
from server.stages.served import Served
from server.stages.order import Dealing, Locator
from server.supply.store import ShardStore
from server.stream.budget import budget_chunks
from server.stream.params import Chunk, StreamParams
from server.stream.walker import PROVENANCE_WIDTH, Walker, make_walker
from tokenfeed import wire
from tokenfeed.shm import ServerRing
from tokenfeed.v1 import tokenfeed_pb2 as pb

MAX_BATCHES_PER_MESSAGE = 64


def parse_request(req: pb.StreamRequest, datasets: Mapping[str, Served],
                  limits: ServerSettings) -> StreamParams:
    """Check every field of a request; errors name the field and the allowed range."""
    ds = datasets.get(req.dataset)
    if ds is None:
        known = ", ".join(sorted(datasets)) or "none"
        raise NotFound(f"unknown dataset {req.dataset!r}; this server serves: {known}")
    _check_range("seq_len", req.seq_len, 1, limits.max_seq_len)
    _check_range("batch_size", req.batch_size, 1, limits.max_batch_size)
    _check_range("world_size", req.world_size, 1, 1 << 20)
    if req.rank >= req.world_size:
        raise InvalidArgument("rank", f"must be in [0, world_size={req.world_size}), got {req.rank}")
    packing = req.packing or wire.DEFAULT_PACKING
    if packing not in wire.PACKINGS:
        raise InvalidArgument("packing", f"must be one of {', '.join(wire.PACKINGS)}, got {packing!r}")
    per_msg = req.batches_per_message or 1
    _check_range("batches_per_message", per_msg, 1, MAX_BATCHES_PER_MESSAGE)
    rows, width = req.batch_size, req.seq_len + 1
    if req.max_tokens:
        if req.packing not in ("", "split"):
            raise InvalidArgument("packing", f"token-budget batches pack pieces ('split'), got {req.packing!r}")
        packing = "split"
        _check_range("max_tokens", req.max_tokens, req.seq_len, limits.max_seq_len * limits.max_batch_size)
        rows, width = 1, req.max_tokens + 1
    payload = per_msg * rows * width * ds.dtype.itemsize
    if payload + 65536 > limits.max_message_bytes:
        raise InvalidArgument(
            "max_tokens" if req.max_tokens else "batch_size",
            f"{per_msg} batch(es) of {rows} x {width - 1} tokens take {payload} bytes, "
            f"above the server's max message size of {int(limits.max_message_bytes)} bytes",
        )
    if req.compression not in (pb.COMPRESSION_NONE, pb.COMPRESSION_ZSTD):
        raise InvalidArgument("compression", f"unknown value {req.compression}")
    start = _check_cursor(req, ds, packing) if req.HasField("cursor") else Locator()
    return StreamParams(
        dataset=ds, seed=req.seed, seq_len=req.seq_len, batch_size=req.batch_size, packing=packing,
        rank=req.rank, world_size=req.world_size, first_step=req.first_step,
        step_stride=req.step_stride or 1, batches_per_message=per_msg,
        compression=req.compression, start=start, provenance=req.provenance, max_tokens=req.max_tokens,
    )


def _check_range(field: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise InvalidArgument(field, f"must be in [{lo}, {hi}], got {value}")


def _check_cursor(req: pb.StreamRequest, ds: Served, packing: str) -> Locator:
    """A cursor must belong to the requested sequence; a mismatch is refused, never ignored."""
    c = req.cursor
    if c.version != wire.CURSOR_VERSION:
        raise FailedPrecondition(f"cursor version {c.version} is not supported (this server reads "
                                 f"{wire.CURSOR_VERSION})")
    expected = {"dataset": ds.name, "seed": req.seed, "seq_len": req.seq_len, "packing": packing,
                "fingerprint": ds.fingerprint}
    for field, want in expected.items():
        got = getattr(c, field)
        if got != want:
            hint = " (the dataset's content or tokenizer changed)" if field == "fingerprint" else ""
            raise FailedPrecondition(f"cursor was made for {field}={got!r}, this stream has {field}={want!r}{hint}")
    if ds.components:  # a mixture: one position per component
        names = [part.name for part in ds.components]
        if [p.dataset for p in c.components] != names:
            raise FailedPrecondition(f"cursor has components {[p.dataset for p in c.components]}, "
                                     f"mixture {ds.name!r} has {names}")
        parts = tuple((p.dataset, _locator(p, part, f"cursor.components[{i}]"))
                      for i, (p, part) in enumerate(zip(c.components, ds.components)))
        if sum(loc.row for _, loc in parts) != c.row:
            raise FailedPrecondition("cursor's component rows do not add up to its mixture row")
        return Locator(row=c.row, components=parts)
    return _locator(c, ds, "cursor")


def _locator(c: pb.Cursor | pb.ComponentCursor, ds: Served, field: str) -> Locator:
    if c.shard >= ds.num_shards:
        raise InvalidArgument(f"{field}.shard", f"must be below {ds.name!r}'s {ds.num_shards} shards, got {c.shard}")
    return Locator(row=c.row, epoch=c.epoch, shard=c.shard, shard_row=c.shard_row)


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

    async def tokens(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, int]:
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
        return self._buffer.view(dtype).reshape(shape), message % ring.slots

    def _observe(self) -> None:
        released, now = self.ring.released(), time.monotonic()
        count, when = self._seen
        if released > count:
            self._per_message = 0.5 * self._per_message + 0.5 * (now - when) / (released - count)
            self._seen = (released, now)


async def stream_chunks(params: StreamParams, store: ShardStore,
                        ring: ServerRing | None = None) -> AsyncIterator[Chunk]:
    """The rank's steps ``first_step, first_step + stride, ...`` counted from the start cursor.
    Step t is global rows ``R + (t*W + rank)*B ...`` and leaves the job at ``R + (t+1)*W*B``.
    With ``ring``, a chunk's tokens are for its slot ``Chunk.shm_slot``: the caller writes them there."""
    p = params
    if p.max_tokens:
        async for chunk in budget_chunks(p, store):
            yield chunk
        return
    deal, step = Dealing(p.start.row, p.world_size, p.batch_size), p.first_step
    # keep packed ahead the rows of the next 16 messages (all ranks' rows: the walker passes them)
    ahead = 16 * p.batches_per_message * p.step_stride * deal.rows_per_step
    walker = make_walker(store, p.dataset, p.seed, p.seq_len, p.packing, p.start, ahead_rows=ahead)
    shape, writer = (p.batches_per_message, p.batch_size, p.seq_len + 1), RingWriter(ring) if ring else None
    try:  # however the stream ends (client gone, error, shutdown), its prefetches stop
        while True:
            if writer is not None:
                buffer, (tokens, slot) = None, await writer.tokens(shape, p.dataset.dtype)
            else:
                (buffer, tokens), slot = wire.chunk_buffer(shape, p.dataset.dtype), None
            chunk = Chunk(tokens=tokens, cursors=[], steps=[], epochs=[], provenance=[] if p.provenance else None,
                          buffer=buffer, shm_slot=slot)
            steps = [step + i * p.step_stride for i in range(p.batches_per_message)]
            if not p.provenance and isinstance(walker, Walker):  # whole chunk from one packed shard?
                taken = walker.take_now(tokens, [deal.first_row(t, p.rank) for t in steps],
                                        [deal.end_of_step(t) for t in steps])
                if taken is not None:  # each batch's epoch is its first row's, as on the slow path
                    chunk.cursors, chunk.epochs = taken
                    chunk.steps = steps
                    step = steps[-1] + p.step_stride
                    yield chunk
                    continue
            for i in range(p.batches_per_message):
                await walker.skip(deal.first_row(step, p.rank) - walker.row)
                records: list[np.ndarray] | None = [] if p.provenance else None
                chunk.epochs.append(await walker.take(tokens[i], records))
                if records is not None and chunk.provenance is not None:
                    rec = np.concatenate(records) if records else np.empty((0, PROVENANCE_WIDTH), dtype=np.int64)
                    chunk.provenance.append(rec[np.lexsort((rec[:, 1], rec[:, 0]))])
                await walker.skip(deal.end_of_step(step) - walker.row)
                chunk.cursors.append(walker.locator())
                chunk.steps.append(step)
                step += p.step_stride
            yield chunk
    finally:
        walker.close()
