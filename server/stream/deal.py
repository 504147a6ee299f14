"""The dealing loop of one stream, without gRPC: walk the global order, deal batches to the rank
(``order.Dealing``), and attach to each batch the job position after it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from server.stages.order import Dealing
from server.supply.store import ShardStore
from server.stream.budget import budget_chunks
from server.stream.params import Buffers, Chunk, PlainBuffers, StreamParams
from server.stream.walker import PROVENANCE_WIDTH, Walker, make_walker


async def stream_chunks(params: StreamParams, store: ShardStore,
                        buffers: Buffers | None = None) -> AsyncIterator[Chunk]:
    """The rank's steps ``first_step, first_step + stride, ...`` counted from the start cursor.
    Step t is global rows ``R + S + (t*W + rank)*B ...`` and leaves the job at ``R + S + (t+1)*W*B``,
    where ``S`` is ``skip_rows`` (a data plan's skip: the walker jumps over them by ``locate``).
    Each chunk's tokens go where ``buffers`` says (a message buffer, a shared-memory ring's slot)."""
    p = params
    if p.max_tokens:
        async for chunk in budget_chunks(p, store):
            yield chunk
        return
    deal, step = Dealing(p.start.row + p.skip_rows, p.world_size, p.batch_size), p.first_step
    # keep packed ahead the rows of the next 16 messages (all ranks' rows: the walker passes them)
    ahead = 16 * p.batches_per_message * p.step_stride * deal.rows_per_step
    walker = make_walker(store, p.dataset, p.seed, p.seq_len, p.packing, p.start, ahead_rows=ahead)
    shape, buffers = (p.batches_per_message, p.batch_size, p.seq_len + 1), buffers or PlainBuffers()
    try:  # however the stream ends (client gone, error, shutdown), its prefetches stop
        while True:
            space = await buffers.take(shape, p.dataset.dtype)
            tokens = space.tokens
            chunk = Chunk(tokens=tokens, cursors=[], steps=[], epochs=[], provenance=[] if p.provenance else None,
                          buffer=space.buffer, shm_slot=space.shm_slot)
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
