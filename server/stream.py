"""The logic of one stream, without gRPC: validate a request, walk the global order, deal
batches to the rank, and attach to each batch the job position after it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from server.config import ServerSettings
from server.dataset import Dataset
from server.errors import FailedPrecondition, InvalidArgument, NotFound
from server.schedule import Locator
from server.store import ShardStore
from tokenfeed import wire
from tokenfeed.v1 import tokenfeed_pb2 as pb

MAX_BATCHES_PER_MESSAGE = 64


@dataclass(frozen=True)
class StreamParams:
    """A validated stream request."""

    dataset: Dataset
    seed: int
    seq_len: int
    batch_size: int
    packing: str
    rank: int
    world_size: int
    first_step: int
    step_stride: int
    batches_per_message: int
    compression: int
    start: Locator


def parse_request(req: pb.StreamRequest, datasets: dict[str, Dataset], limits: ServerSettings) -> StreamParams:
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
    payload = per_msg * req.batch_size * (req.seq_len + 1) * ds.dtype.itemsize
    if payload + 65536 > limits.max_message_bytes:
        raise InvalidArgument(
            "batch_size",
            f"{per_msg} batch(es) of {req.batch_size} x {req.seq_len} tokens take {payload} bytes, "
            f"above the server's max message size of {int(limits.max_message_bytes)} bytes",
        )
    if req.compression not in (pb.COMPRESSION_NONE, pb.COMPRESSION_ZSTD):
        raise InvalidArgument("compression", f"unknown value {req.compression}")
    start = _check_cursor(req, ds, packing) if req.HasField("cursor") else Locator()
    return StreamParams(
        dataset=ds, seed=req.seed, seq_len=req.seq_len, batch_size=req.batch_size, packing=packing,
        rank=req.rank, world_size=req.world_size, first_step=req.first_step,
        step_stride=req.step_stride or 1, batches_per_message=per_msg,
        compression=req.compression, start=start,
    )


def _check_range(field: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise InvalidArgument(field, f"must be in [{lo}, {hi}], got {value}")


def _check_cursor(req: pb.StreamRequest, ds: Dataset, packing: str) -> Locator:
    """A cursor must belong to the requested sequence; a mismatch is refused, never ignored."""
    c = req.cursor
    if c.version != wire.CURSOR_VERSION:
        raise FailedPrecondition(f"cursor version {c.version} is not supported (this server reads {wire.CURSOR_VERSION})")
    expected = {"dataset": ds.name, "seed": req.seed, "seq_len": req.seq_len, "packing": packing,
                "fingerprint": ds.fingerprint}
    for field, want in expected.items():
        got = getattr(c, field)
        if got != want:
            hint = " (the dataset's content or tokenizer changed)" if field == "fingerprint" else ""
            raise FailedPrecondition(f"cursor was made for {field}={got!r}, this stream has {field}={want!r}{hint}")
    if c.shard >= ds.num_shards:
        raise InvalidArgument("cursor.shard", f"must be below the dataset's {ds.num_shards} shards, got {c.shard}")
    return Locator(row=c.row, epoch=c.epoch, shard=c.shard, shard_row=c.shard_row)


class Walker:
    """A position in the global row sequence that only moves forward, loading shards lazily."""

    def __init__(self, store: ShardStore, params: StreamParams) -> None:
        self.store, self.p, self.ds = store, params, params.dataset
        loc = params.start
        self.row, self.epoch, self.shard, self.shard_row = loc.row, loc.epoch, loc.shard, loc.shard_row
        self._rows: int | None = None

    def locator(self) -> Locator:
        return Locator(self.row, self.epoch, self.shard, self.shard_row)

    async def _shard_rows(self) -> int:
        if self._rows is None:
            self._rows = await self.store.num_rows(self.ds, self.p.seed, self.epoch, self.shard, self.p.seq_len,
                                                   self.p.packing)
            if self.shard_row > self._rows:
                raise FailedPrecondition(
                    f"cursor points at row {self.shard_row} of shard {self.shard} (epoch {self.epoch}), "
                    f"which has {self._rows} rows: the cursor does not belong to this dataset")
        return self._rows

    async def _ready(self) -> int:
        """Move past exhausted shards; return the rows left in the current one (> 0)."""
        empty = 0
        while (left := await self._shard_rows() - self.shard_row) == 0:
            empty += 1
            if empty > self.ds.num_shards:
                raise FailedPrecondition(f"dataset {self.ds.name!r} has no tokens to serve")
            self.shard, self.shard_row, self._rows = self.shard + 1, 0, None
            if self.shard == self.ds.num_shards:
                self.epoch, self.shard = self.epoch + 1, 0
        return left

    async def skip(self, n: int) -> None:
        assert n >= 0, n
        while n:
            step = min(n, await self._ready())
            self.shard_row += step
            self.row += step
            n -= step

    async def take(self, out: np.ndarray) -> int:
        """Fill ``out`` ([rows, seq_len + 1]) with the next rows; return the epoch of the first."""
        filled, first_epoch = 0, None
        while filled < len(out):
            step = min(len(out) - filled, await self._ready())
            first_epoch = self.epoch if first_epoch is None else first_epoch
            packed = await self.store.packed(self.ds, self.p.seed, self.epoch, self.shard, self.p.seq_len,
                                             self.p.packing)
            out[filled : filled + step] = packed.row_view(self.shard_row, self.shard_row + step)
            filled += step
            self.shard_row += step
            self.row += step
        return int(first_epoch)


@dataclass
class Chunk:
    """Consecutive batches of one stream and the job position after each."""

    tokens: np.ndarray  # [num_batches, batch_size, seq_len + 1]
    cursors: list[Locator]
    steps: list[int]
    epochs: list[int]


async def stream_chunks(params: StreamParams, store: ShardStore) -> AsyncIterator[Chunk]:
    """The rank's steps ``first_step, first_step + stride, ...`` counted from the start cursor.
    Step t is global rows ``R + (t*W + rank)*B ...`` and leaves the job at ``R + (t+1)*W*B``."""
    p = params
    walker = Walker(store, p)
    origin, rows_per_step, step = p.start.row, p.world_size * p.batch_size, p.first_step
    # The stream's position, for the cache's eviction and the prefetcher; closed however the stream ends.
    with store.follow(p.dataset, p.seed) as follower:
        follower.at(walker.epoch, walker.shard)
        while True:
            tokens = np.empty((p.batches_per_message, p.batch_size, p.seq_len + 1), dtype=p.dataset.dtype)
            cursors, steps, epochs = [], [], []
            for i in range(p.batches_per_message):
                await walker.skip(origin + step * rows_per_step + p.rank * p.batch_size - walker.row)
                follower.at(walker.epoch, walker.shard)
                epochs.append(await walker.take(tokens[i]))
                await walker.skip(origin + (step + 1) * rows_per_step - walker.row)
                cursors.append(walker.locator())
                steps.append(step)
                step += p.step_stride
            yield Chunk(tokens=tokens, cursors=cursors, steps=steps, epochs=epochs)
