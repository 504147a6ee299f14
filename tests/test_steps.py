"""A job's step plans (``server.stream.steps``): the ranks of a job on one server share where each
step's rows lie, and every rank gets exactly the batches, cursors and epochs its own walk gives."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from server.serve import protocol
from server.serve.drive import complete, stream_chunks
from server.stages.dataset import Dataset
from server.stages.order import Dealing, Locator
from server.stream import steps, walk
from server.stream.params import Chunk, StreamParams
from server.stream.walker import Walker
from server.supply.cache import ShardCache
from server.supply.store import ShardStore
from tokenfeed import wire
from tokenfeed.v1 import tokenfeed_pb2 as pb

SEQ, SEED, BATCH = 32, 5, 4


async def _chunks(params: StreamParams, store: ShardStore, batches: int) -> list[Chunk]:
    out: list[Chunk] = []
    stream = stream_chunks(params, store)
    async for chunk in stream:
        out.append(Chunk(chunk.tokens.copy(), list(chunk.cursors), list(chunk.steps), list(chunk.epochs)))
        if sum(len(c.steps) for c in out) >= batches:
            break
    await stream.aclose()
    return out


async def _reference(store: ShardStore, ds: Dataset, packing: str, start: Locator, rows: int) -> np.ndarray:
    """Every row from ``start`` on, read one after another (the walker's slow path)."""
    reader = Walker(store, ds, SEED, SEQ, packing, start)
    out = np.empty((rows, SEQ + 1), dtype=ds.dtype)
    await complete(store, walk.take(reader, out))
    reader.close()
    return out


async def _pack(store: ShardStore, ds: Dataset, packing: str, epochs: int) -> None:
    """Every shard of the first ``epochs`` epochs packed in memory, as the pack-aheads of a running
    job keep them (here nothing runs beside the stream: it would outrun them)."""
    for epoch in range(epochs):
        for shard in range(ds.num_shards):
            await store.packed(ds, SEED, epoch, shard, SEQ, packing)


async def _locator_at(store: ShardStore, ds: Dataset, packing: str, start: Locator, row: int) -> Locator:
    walker = Walker(store, ds, SEED, SEQ, packing, start)
    await complete(store, walk.skip(walker, row - start.row))
    walker.close()
    return walker.locator()


@pytest.mark.parametrize("packing", ["concat", "pad"])
async def test_every_rank_gets_what_its_own_walk_gives(dataset: Dataset, pool: ThreadPoolExecutor,
                                                       packing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worlds whose steps lie inside one shard (4 ranks) or across several (64 ranks), messages of
    1 and 8 batches, from the start, from a cursor in the middle of a shard, and after a skip:
    every batch's rows are the job's rows at the rank's place in the step, every cursor the
    position a walk to the step's end lands at, over two and a half epochs, and the plans did
    the work (not the walker's own walk, which the same run without plans checks as well)."""
    store = ShardStore(ShardCache(64 << 20), pool)
    start = Locator()
    reader = Walker(store, dataset, SEED, SEQ, packing, start)
    await complete(store, walk.skip(reader, 1 << 40))  # every shard's count known
    reader.close()
    total = store.epoch_rows(dataset, SEED, 0, SEQ, packing)
    assert total is not None
    epoch = total[-1]
    middle = await _locator_at(store, dataset, packing, start, epoch // 3 + 1)
    assert 0 < middle.shard_row  # (a cursor inside a shard)
    # the furthest row read: a skip of 3 steps, then two and a half epochs rounded up to a message
    last = 3 * 64 * BATCH + 7 + epoch * 5 // 2 + 9 * 64 * BATCH
    epochs = -(-last // epoch) + 1
    reference = await _reference(store, dataset, packing, start, last)

    taken = 0
    original = steps.StepPlans.take

    def counted(self, *args, **kwargs):  # a spy: how many messages the plans assembled
        nonlocal taken
        result = original(self, *args, **kwargs)
        taken += result is not None
        return result

    monkeypatch.setattr(steps.StepPlans, "take", counted)
    for world, ranks, per_message in ((4, (0, 3), 8), (64, (0, 17, 63), 8), (64, (5,), 1)):
        for begin, skip in ((start, 0), (middle, 0), (start, 3 * BATCH * world + 7)):
            deal = Dealing(begin.row + skip, world, BATCH)
            n = (epoch * 5 // 2) // (world * BATCH)  # steps in two and a half epochs
            for rank in ranks:
                params = StreamParams(dataset=dataset, seed=SEED, seq_len=SEQ, batch_size=BATCH, packing=packing,
                                      rank=rank, world_size=world, first_step=0, step_stride=1,
                                      batches_per_message=per_message, start=begin, skip_rows=skip)
                await _pack(store, dataset, packing, epochs)
                before = taken
                chunks = await _chunks(params, store, n)
                assert taken > before, (world, rank, begin, skip)  # the plans assembled messages
                for chunk in chunks:
                    for i, (step, cursor, ep) in enumerate(zip(chunk.steps, chunk.cursors, chunk.epochs)):
                        first = deal.first_row(step, rank)
                        np.testing.assert_array_equal(chunk.tokens[i], reference[first : first + BATCH],
                                                      err_msg=f"world {world} rank {rank} step {step}")
                        assert ep == first // epoch  # (the job starts at row 0 of epoch 0)
                        assert cursor.row == deal.end_of_step(step)
                if begin is start and not skip and rank == ranks[-1]:  # cursors: checked once per world
                    for chunk in chunks[:: max(1, len(chunks) // 6)]:
                        want = await _locator_at(store, dataset, packing, start, chunk.cursors[-1].row)
                        assert chunk.cursors[-1] == want

    # The same with no plans (the walker's own walk) gives the same chunks.
    params = StreamParams(dataset=dataset, seed=SEED, seq_len=SEQ, batch_size=BATCH, packing=packing,
                          rank=17, world_size=64, first_step=0, step_stride=1, batches_per_message=8, start=middle)
    await _pack(store, dataset, packing, epochs)
    planned = await _chunks(params, store, 40)
    monkeypatch.setattr(steps, "MIN_WORLD", 1 << 30)
    before = taken
    await _pack(store, dataset, packing, epochs)
    walked = await _chunks(replace(params), store, 40)
    assert taken == before
    assert [(c.steps, c.cursors, c.epochs) for c in walked] == [(c.steps, c.cursors, c.epochs) for c in planned]
    for a, b in zip(walked, planned):
        np.testing.assert_array_equal(a.tokens, b.tokens)


async def test_plans_are_shared_by_a_jobs_ranks_and_go_with_them(dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    """The ranks of one job share one set of plans; another job (another world) has its own; once
    the streams end, nothing of them is kept."""
    store = ShardStore(ShardCache(64 << 20), pool)
    reader = Walker(store, dataset, SEED, SEQ, "concat", Locator())
    await complete(store, walk.skip(reader, 1 << 40))  # every count known
    reader.close()

    def walker_and_plans(world: int, rank: int) -> steps.StepPlans | None:
        w = Walker(store, dataset, SEED, SEQ, "concat", Locator())
        return steps.plans_for(store, w, Dealing(0, world, BATCH), rank, ahead_rows=1024)

    a, b, c = walker_and_plans(8, 0), walker_and_plans(8, 5), walker_and_plans(16, 0)
    assert a is not None and a is b and c is not None and c is not a
    assert steps.plans_for(store, reader, Dealing(0, 2, BATCH), 0, 1024) is None  # too few ranks to share
    del a, b, c
    assert not steps._JOBS.get(store)


@pytest.mark.parametrize("world", [1, 64])
def test_a_jobs_ranks_share_their_cursors_bytes_and_the_message_is_the_same(dataset: Dataset, world: int) -> None:
    """A rank of a large job sends the cursors that every rank sends after the same steps: their
    bytes are made once, and the message parses to exactly what protobuf's own encoding gives,
    cursors in order (a mixture's per-component cursors too)."""
    params = StreamParams(dataset=dataset, seed=SEED, seq_len=SEQ, batch_size=BATCH, packing="concat", rank=0,
                          world_size=world, first_step=0, step_stride=1, batches_per_message=3, start=Locator())
    tokens = np.arange(3 * BATCH * (SEQ + 1), dtype=dataset.dtype).reshape(3, BATCH, SEQ + 1)
    cursors = [Locator(100, 0, 2, 7), Locator(200, 1, 0, 0),
               Locator(300, 1, 3, 5, components=(("a", Locator(120, 0, 1, 2)), ("b", Locator(180, 0, 4, 1))))]
    chunk = Chunk(tokens, cursors, [0, 1, 2], [0, 1, 1])
    message, _ = protocol.encode_chunk(chunk, params)
    got = pb.BatchChunk.FromString(message)
    want = pb.BatchChunk(tokens=tokens.tobytes(), dtype=wire.dtype_enum(dataset.dtype), num_batches=3, rows=BATCH,
                         seq_len=SEQ, eos_id=dataset.info.eos_id, pad_id=dataset.info.pad_id,
                         cursors=[protocol.cursor_message(c, params) for c in cursors], steps=[0, 1, 2],
                         epochs=[0, 1, 1])
    assert got == want
    if world > 1:  # the next rank's message with the same steps reuses the bytes
        other = replace(params, rank=5)
        before = {kind: dict(known) for kind, known in protocol._SHARED_CURSORS.items()}
        assert pb.BatchChunk.FromString(protocol.encode_chunk(chunk, other)[0]) == want
        assert protocol._SHARED_CURSORS == before
