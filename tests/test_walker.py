"""Walkers: a rank of a large job skips the other ranks' rows by the shards' row counts, and lands
exactly where reading every row would have taken it (contract 3 rests on this)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

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
        await reader.take(chunk)
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
        await walker.skip(1)  # the first shard's count is checked as a cursor's would be
        crossings = 0
        await walker.skip(target - 1)
        assert walker.row == target
        if target - 1 > 2 * 64 * 2:  # several shards: one jump, not a visit per shard
            assert crossings <= 1, (target, crossings)
        out = np.empty((4, SEQ + 1), dtype=dataset.dtype)
        epoch = await walker.take(out)
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
    await behind.take(out)  # in epoch 0, and stays there
    while ahead.epoch == 0:
        await ahead.take(out)
    await ahead.take(out)

    def epochs() -> set[int]:
        return {k.epoch for k in store._packed}

    assert 0 in epochs() and 1 in epochs()  # the trailing stream still reads epoch 0
    before = store.stats()
    epoch_rows = store.epoch_rows(dataset, SEED, 0, SEQ, "concat")
    assert epoch_rows is not None
    await behind.skip(epoch_rows[-1] - behind.row + 3)  # into epoch 1: nobody is in epoch 0 any more
    await behind.take(out)
    assert behind.epoch == 1 and epochs() == {1}
    after = store.stats()
    dropped = before["hot_entries"] - after["hot_entries"]
    assert dropped > 0 and after["hot_evictions"] - before["hot_evictions"] >= dropped
    assert after["hot_bytes"] == sum(p.nbytes for p in store._packed.values())
    ahead.close()
    behind.close()
    await store.close()
