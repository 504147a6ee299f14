"""The waiting side of a stream: drives the stream wing's generators (``server.stream.deal``,
``server.stream.walk``), awaiting each request they yield and sending back its answer. The only
place a stream waits: for the supply (a shard's count or packed rows), for the space of its next
message (the ring's backpressure), for a turn of the loop, or for work handed to a thread."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Generator
from typing import Any, Protocol, TypeVar

import numpy as np

from server.errors import InvalidArgument
from server.serve.pacing import Pacing
from server.stream.deal import dealt_chunks
from server.stream.params import Chunk, MessageSpace, Offload, Request, Space, StreamParams
from server.stream.walker import Need
from server.supply.store import ShardStore

__all__ = ["Buffers", "PlainBuffers", "check_documents", "complete", "stream_chunks", "supply"]

T = TypeVar("T")


class Buffers(Protocol):
    """Hands a stream the space for its next message's tokens (the gRPC edge decides where)."""

    async def take(self, shape: tuple[int, ...], dtype: np.dtype) -> MessageSpace: ...


class PlainBuffers:
    """A fresh array per message (for callers that encode messages themselves)."""

    async def take(self, shape: tuple[int, ...], dtype: np.dtype) -> MessageSpace:
        return MessageSpace(np.empty(shape, dtype=dtype))


async def supply(store: ShardStore, need: Need) -> None:
    """Give a walker what it said it needs: the shard's packed rows, or only its row count."""
    w = need.walker
    if need.packed:
        packed = await store.packed(w.ds, w.seed, need.epoch, need.ordinal, w.seq_len, w.packing)
        w.supply_packed(need, packed)
    else:
        rows = await store.num_rows(w.ds, w.seed, need.epoch, need.ordinal, w.seq_len, w.packing)
        w.supply_rows(need, rows)


async def answer(request: Request, store: ShardStore, buffers: Buffers, pacing: Pacing | None = None) -> Any:
    """Await one request of a stream's generator; what to send back."""
    if isinstance(request, Need):
        await supply(store, request)
    elif isinstance(request, Space):
        shape = request.shape
        if request.fewer and pacing is not None:
            shape = (pacing.batches(shape[0], math.prod(shape[1:])), *shape[1:])
        return await buffers.take(shape, request.dtype)
    elif isinstance(request, Offload):
        return await asyncio.to_thread(request.fn, *request.args)
    else:  # Turn
        await asyncio.sleep(0)
    return None


async def complete(store: ShardStore, waits: Generator[Request, Any, T]) -> T:
    """Run a walk's generator (``walk.skip``, ``walk.take``) to its end; its return value."""
    buffers = PlainBuffers()
    try:
        request = next(waits)
        while True:
            request = waits.send(await answer(request, store, buffers))
    except StopIteration as done:
        return done.value


async def stream_chunks(params: StreamParams, store: ShardStore, buffers: Buffers | None = None,
                        pacing: Pacing | None = None) -> AsyncIterator[Chunk]:
    """The chunks of the stream ``params`` asks for (``deal.dealt_chunks``), their tokens where
    ``buffers`` says (a message buffer, a shared-memory ring's slot; a fresh array without), as
    many batches a message as ``pacing`` grants where the stream lets the server choose."""
    await check_documents(params, store)
    buffers = buffers or PlainBuffers()
    dealt = dealt_chunks(params, store)
    try:  # closing the generator closes its walker: however the stream ends, its prefetches stop
        item = next(dealt)
        while True:
            if isinstance(item, Chunk):
                yield item
                item = next(dealt)
            else:
                item = dealt.send(await answer(item, store, buffers, pacing))
    except StopIteration:  # (the dealing never ends on its own: a stream ends when its client goes)
        return
    finally:
        dealt.close()


async def check_documents(p: StreamParams, store: ShardStore) -> None:
    """Refuse an exclusion of a document its shard does not hold (the shard's count may need its
    tokens: read, or from the cache, once per shard named)."""
    parts = {part.name: part for part in p.dataset.parts}
    for name, stages in (p.stages or {}).items():
        ds = parts[name]
        for shard, docs in stages[-1][1].docs.items():  # the last stage holds every exclusion
            count = ds.shard_docs.get(shard)
            if count is None:
                tokens = await store.tokenized(ds, shard)
                assert tokens is not None
                count = tokens.num_docs
            if max(docs) >= count:
                raise InvalidArgument("plan", f"unknown document {max(docs)} of shard {shard} of {name!r}, which "
                                      f"holds {count} documents (0 to {count - 1})")
