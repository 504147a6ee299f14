"""The dealing loop of one stream, without gRPC or waiting: walk the global order, deal batches to
the rank (``order.Dealing``), and attach to each batch the job position after it. A generator
that yields its chunks and, where it must wait, a request (``server.stream.params``)."""

from __future__ import annotations

import numpy as np

from server.stages.order import Dealing
from server.stream.budget import budget_chunks
from server.stream.params import Chunk, Dealt, MessageSpace, Space, StreamParams
from server.stream.steps import StepPlans, plans_for
from server.stream.walk import skip, take
from server.stream.walker import PROVENANCE_WIDTH, Takes, Walker, make_walker
from server.supply.store import ShardStore


def dealt_chunks(params: StreamParams, store: ShardStore) -> Dealt:
    """The rank's steps ``first_step, first_step + stride, ...`` counted from the start cursor.
    Step t is global rows ``R + S + (t*W + rank)*B ...`` and leaves the job at ``R + S + (t+1)*W*B``,
    where ``S`` is ``skip_rows`` (a data plan's skip: the walker jumps over them by ``locate``).
    Each chunk's tokens go where the answer to its ``Space`` request says (a message buffer, a
    shared-memory ring's slot)."""
    p = params
    if p.max_tokens:
        yield from budget_chunks(p, store)
        return
    deal, step = Dealing(p.start.row + p.skip_rows, p.world_size, p.batch_size), p.first_step
    # keep packed ahead the shards of this stream's rows in the next 16 messages (each rank its own)
    ahead = 16 * p.batches_per_message * p.step_stride * deal.rows_per_step
    takes = Takes(deal.first_row(step, p.rank), p.batch_size, p.step_stride * deal.rows_per_step)
    walker = make_walker(store, p.dataset, p.seed, p.seq_len, p.packing, p.start, ahead_rows=ahead,
                         schedule=p.schedule, stages=p.stages, takes=takes)
    plans: StepPlans | None = None  # the job's steps, worked out once for its ranks here
    wanted = Space((p.batches_per_message, p.batch_size, p.seq_len + 1), p.dataset.dtype, fewer=p.batches_adaptive)
    try:  # however the stream ends (client gone, error, shutdown), its prefetches stop
        while True:
            space: MessageSpace = yield wanted
            tokens = space.tokens
            batches = len(tokens)  # as many as asked, or fewer where the request let the driver choose
            chunk = Chunk(tokens=tokens, cursors=[], steps=[], epochs=[], provenance=[] if p.provenance else None,
                          buffer=space.buffer, shm_slot=space.shm_slot)
            steps = [step + i * p.step_stride for i in range(batches)]
            if not p.provenance and isinstance(walker, Walker):  # every row of the chunk packed in memory?
                if plans is None:  # (where they apply, once an epoch's counts are known)
                    plans = plans_for(store, walker, deal, p.rank, ahead)
                    if plans is not None:  # they keep this rank's shards packed ahead: its walker
                        walker.ahead_rows = 0  # asked for them all again whenever a take missed
                taken = plans.take(walker, tokens, steps, p.rank) if plans is not None else None
                if taken is None:
                    taken = walker.take_now(tokens, [deal.first_row(t, p.rank) for t in steps],
                                            [deal.end_of_step(t) for t in steps])
                if taken is not None:  # each batch's epoch is its first row's, as on the slow path
                    chunk.cursors, chunk.epochs = taken
                    chunk.steps = steps
                    step = steps[-1] + p.step_stride
                    yield chunk
                    continue
            for i in range(batches):
                yield from skip(walker, deal.first_row(step, p.rank) - walker.row)
                records: list[np.ndarray] | None = [] if p.provenance else None
                chunk.epochs.append((yield from take(walker, tokens[i], records)))
                if records is not None and chunk.provenance is not None:
                    rec = np.concatenate(records) if records else np.empty((0, PROVENANCE_WIDTH), dtype=np.int64)
                    chunk.provenance.append(rec[np.lexsort((rec[:, 1], rec[:, 0]))])
                yield from skip(walker, deal.end_of_step(step) - walker.row)
                chunk.cursors.append(walker.locator())
                chunk.steps.append(step)
                step += p.step_stride
            yield chunk
    finally:
        walker.close()

