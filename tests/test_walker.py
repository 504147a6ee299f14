"""Walkers: a rank of a large job skips the other ranks' rows by the shards' row counts, and lands
exactly where reading every row would have taken it (contract 3 rests on this)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from server.serve.drive import complete, supply
from server.stream import walk
from server.supply.cache import ShardCache
from server.stages.dataset import Dataset
from server.stages.packing import concat_rows
from server.stages.order import Locator
from server.supply.store import ShardStore
from server.stream.walker import Walker


SEQ, SEED = 32, 5


async def test_skipping_many_shards_lands_where_reading_every_row_does(
        dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    store = ShardStore(ShardCache(64 << 20), pool)
    # The reference: every row of an epoch and a half, read in order.
    reader = Walker(store, dataset, SEED, SEQ, "concat", Locator())
    chunks = []
    epoch_rows = None
    while epoch_rows is None or sum(len(c) for c in chunks) < epoch_rows * 3 // 2:
        chunk = np.empty((64, SEQ + 1), dtype=dataset.dtype)
        await complete(reader.store, walk.take(reader, chunk))
        chunks.append(chunk)
        if len(dataset.shard_tokens) == dataset.num_shards:  # every count known: the epoch's rows
            epoch_rows = sum(concat_rows(n, SEQ) for n in dataset.shard_tokens.values())
    reader.close()
    rows = np.concatenate(chunks)
    assert epoch_rows is not None and epoch_rows > 20 * 64

    crossings = 0
    original = store.num_rows

    async def counted(*args, **kwargs):  # a spy: how many shards a skip visits one by one
        nonlocal crossings
        crossings += 1
        return await original(*args, **kwargs)

    store.num_rows = counted  # type: ignore[method-assign]
    for target in (1, 2, 63, 64 * 7 + 5, epoch_rows - 1, epoch_rows, epoch_rows + 1, epoch_rows + 300):
        walker = Walker(store, dataset, SEED, SEQ, "concat", Locator())
        await complete(walker.store, walk.skip(walker, 1))  # the first shard's count is checked as a cursor's would be
        crossings = 0
        await complete(walker.store, walk.skip(walker, target - 1))
        assert walker.row == target
        if target - 1 > 2 * 64 * 2:  # several shards: one jump, not a visit per shard
            assert crossings <= 1, (target, crossings)
        out = np.empty((4, SEQ + 1), dtype=dataset.dtype)
        epoch = await complete(walker.store, walk.take(walker, out))
        np.testing.assert_array_equal(out, rows[target : target + 4], err_msg=f"after skipping to row {target}")
        assert epoch == (1 if target >= epoch_rows else 0)
        walker.close()
    await store.close()


async def test_an_epoch_every_stream_has_left_leaves_the_hot_tier(dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    """Packed shards are per epoch: once no stream of the job is left in an epoch, its shards are
    never read again and are dropped at once instead of filling the tier's byte budget."""
    store = ShardStore(ShardCache(64 << 20), pool)
    ahead, behind = (Walker(store, dataset, SEED, SEQ, "concat", Locator()) for _ in range(2))
    out = np.empty((8, SEQ + 1), dtype=dataset.dtype)
    await complete(behind.store, walk.take(behind, out))  # in epoch 0, and stays there
    while ahead.epoch == 0:
        await complete(ahead.store, walk.take(ahead, out))
    await complete(ahead.store, walk.take(ahead, out))

    def epochs() -> set[int]:
        return {k.epoch for k in store._packed}

    assert 0 in epochs() and 1 in epochs()  # the trailing stream still reads epoch 0
    before = store.stats()
    epoch_rows = store.epoch_rows(dataset, SEED, 0, SEQ, "concat")
    assert epoch_rows is not None
    # into epoch 1: nobody is in epoch 0 any more
    await complete(behind.store, walk.skip(behind, epoch_rows[-1] - behind.row + 3))
    await complete(behind.store, walk.take(behind, out))
    assert behind.epoch == 1 and epochs() == {1}
    after = store.stats()
    dropped = before["hot_entries"] - after["hot_entries"]
    assert dropped > 0 and after["hot_evictions"] - before["hot_evictions"] >= dropped
    assert after["hot_bytes"] == sum(p.nbytes for p in store._packed.values())
    ahead.close()
    behind.close()
    await store.close()


async def test_a_walker_is_synchronous_and_names_what_it_lacks(
        dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    """The walker is synchronous (issue 18): it takes what the supply has at hand and, where a
    shard is missing, stops and says which; only the driver (``server.serve.drive``) awaits the
    supply. (Its calls run on the loop's thread: the supply it asks to pack ahead schedules that
    work on the loop.)"""
    import inspect

    from server.stream.walker import MixtureWalker, Need

    for cls in (Walker, MixtureWalker):
        assert not [name for name, fn in vars(cls).items() if inspect.iscoroutinefunction(fn)], cls
    store = ShardStore(ShardCache(64 << 20), pool)
    walker = Walker(store, dataset, SEED, SEQ, "concat", Locator())
    out = np.empty((8, SEQ + 1), dtype=dataset.dtype)
    assert walker.take_now_rows(out) is False  # nothing loaded yet: the first shard's count
    assert walker.need == Need(walker, 0, 0, packed=False) and walker.row == 0
    await supply(store, walker.need)  # the waiting side: loads it
    while not walker.take_now_rows(out):  # its packed rows, if counting did not pack them
        assert walker.need == Need(walker, 0, 0, packed=True)
        await supply(store, walker.need)
    assert walker.need is None and walker.row == 8
    reference = Walker(store, dataset, SEED, SEQ, "concat", Locator())
    expected = np.empty_like(out)
    assert reference.take_now_rows(expected)  # at hand now: no waiting at all
    np.testing.assert_array_equal(out, expected)
    walker.close()
    reference.close()


async def _every_count_known(store: ShardStore, dataset: Dataset) -> list[int]:
    """Tokenize every shard (its counts are then known); the cumulative rows of epoch 0."""
    for index in range(dataset.num_shards):
        await store.tokenized(dataset, index)
    cum = store.epoch_rows(dataset, SEED, 0, SEQ, "concat")
    assert cum is not None
    return cum


async def test_a_rank_of_a_large_job_packs_ahead_only_the_shards_of_its_own_rows(
        dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    """A rank of a W-rank job passes W - 1 batches for each it takes: it packs ahead the shards of
    its own next batches, found by their counts, never walks the shards it passes over. (Walking
    them, each message of a 1,024-rank job's rank crossed up to 1,024 shards: the job's start grew
    with W squared, issue 23.) Every rank packs its own: the job's shards are all packed ahead."""
    from server.config import ServerSettings
    from server.serve.drive import stream_chunks
    from server.serve.protocol import parse_request
    from server.stages.order import Dealing, locate
    from tokenfeed.v1 import tokenfeed_pb2 as pb

    store = ShardStore(ShardCache(64 << 20), pool)
    await _every_count_known(store, dataset)
    asked: list[tuple[int, int]] = []
    original = store.pack_ahead

    def spy(ds: Dataset, seed: int, epoch: int, ordinal: int, seq_len: int, packing: str) -> bool:
        asked.append((epoch, ordinal))
        return original(ds, seed, epoch, ordinal, seq_len, packing)

    store.pack_ahead = spy  # type: ignore[method-assign]
    world, batch, messages = 1024, 7, 6
    deal = Dealing(0, world, batch)
    straddling = 0  # takes whose rows lie in two shards
    for rank in (0, 517, world - 1):
        request = pb.StreamRequest(dataset="d", seed=SEED, seq_len=SEQ, batch_size=batch, rank=rank,
                                   world_size=world, batches_per_message=1)
        chunks = stream_chunks(parse_request(request, {"d": dataset}, ServerSettings()), store)
        asked.clear()
        for _ in range(messages):
            await anext(chunks)
        await chunks.aclose()  # type: ignore[attr-defined]  # (an async generator)

        def shard_of(row: int) -> tuple[int, int]:
            where = locate(lambda e: store.epoch_rows(dataset, SEED, e, SEQ, "concat"), 0, 0, row + 1)
            assert where is not None
            return where[:2]

        own = {shard_of(row) for t in range(messages + 16)  # its rows in the next 16 messages
               for row in (deal.first_row(t, rank), deal.first_row(t, rank) + batch - 1)}
        assert asked and set(asked) <= own, (rank, sorted(set(asked) - own)[:5])
        taken = {shard_of(row) for t in range(messages)  # what it has read: every shard asked for, the
                 for row in (deal.first_row(t, rank), deal.first_row(t, rank) + batch - 1)}  # last rows' too
        assert taken <= set(asked), (rank, sorted(taken - set(asked)))
        straddling += sum(shard_of(deal.first_row(t, rank)) != shard_of(deal.first_row(t, rank) + batch - 1)
                          for t in range(messages + 16))
        assert len(asked) <= 2 * len(own), (rank, len(asked), len(own))  # each once, but for refusals
    assert straddling  # (the case where the last row's shard is searched for)
    await store.close()


async def test_a_stream_that_begins_with_a_skip_is_first_seen_where_it_lands(
        dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    """A rank's stream begins at the job's position and skips the ranks before it: with every count
    known it jumps there and is first seen (by the hot tier's count of streams per epoch) where it
    lands. Seen at its start first, it was taken for a stream that had read epoch 0 and left it,
    and epoch 0's packed shards were dropped while the job's first ranks were still starting
    (a 1,024-rank job re-packed and re-dropped them a few hundred times, issue 23)."""
    store = ShardStore(ShardCache(64 << 20), pool)
    cum = await _every_count_known(store, dataset)
    moves: list[tuple[int | None, int | None]] = []
    original = store._epoch_moved

    def spy(ds: Dataset, seed: int, old: int | None, new: int | None) -> None:
        moves.append((old, new))
        original(ds, seed, old, new)

    store._epoch_moved = spy  # type: ignore[method-assign]
    await store.packed(dataset, SEED, 0, 0, SEQ, "concat")  # what the job's rank 0 is about to read
    walkers = []
    for target in (2 * cum[-1] + 5, cum[-1] + 3):  # two later ranks start first
        walker = Walker(store, dataset, SEED, SEQ, "concat", Locator())
        moves.clear()
        await complete(store, walk.skip(walker, target))
        assert walker.row == target and moves == [(None, walker.epoch)], moves
        walkers.append(walker)
    assert any(k.epoch == 0 for k in store._packed)  # still there for rank 0
    for walker in walkers:
        walker.close()
    await store.close()
