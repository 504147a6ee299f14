"""What the cache saves, counted where it matters: shards read again from the source per epoch,
through the real store, cache, prefetcher and dealing loop of a two-rank job whose corpus is
twice the cache (issue 23, goal 6)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.config import PrefetchSettings, ServerSettings
from server.serve.drive import stream_chunks
from server.serve.protocol import parse_request
from server.stages.dataset import Dataset
from server.stages.packing import TokenizedShard
from server.supply.cache import ShardCache
from server.supply.cache_policy import Slot
from server.supply.store import ShardStore
from tokenfeed.v1 import tokenfeed_pb2 as pb

RANKS, EPOCHS = 2, 3


def working_set(ds: Dataset) -> int:
    """Charged bytes of every shard in a cache that holds them all."""
    cache = ShardCache(1 << 30)
    for i in range(ds.num_shards):
        cache.put(f"k{i}", ds.tokenize_shard(i))
    return cache.bytes


async def reads_per_epoch(ds: Dataset, pool: ThreadPoolExecutor, policy: str, depth: int) -> list[float]:
    """Source reads in each of epochs 1.. (as rank 0 enters them) over the shards, cache = half the working set."""
    store = ShardStore(ShardCache(working_set(ds) // 2, policy=policy), pool,
                       prefetch=PrefetchSettings(depth=depth, concurrency=2))
    marks: dict[int, int] = {}

    async def rank(r: int) -> None:
        request = pb.StreamRequest(dataset="d", seed=5, seq_len=32, batch_size=4, rank=r, world_size=RANKS,
                                   batches_per_message=1)
        chunks = stream_chunks(parse_request(request, {"d": ds}, ServerSettings()), store)
        async for chunk in chunks:
            epoch = chunk.epochs[-1]
            if r == 0:
                marks.setdefault(epoch, store.source_reads)
            if epoch >= EPOCHS:
                break
            await asyncio.sleep(0)  # the ranks take turns, as clients of one job do
        await chunks.aclose()

    await asyncio.gather(*(rank(r) for r in range(RANKS)))
    await store.close()
    return [(marks[e + 1] - marks[e]) / ds.num_shards for e in range(1, EPOCHS)]


@pytest.mark.parametrize("depth", [0, 4])
async def test_the_smart_policy_reads_about_half_the_corpus_per_epoch_at_half_the_working_set(
        dataset: Dataset, pool: ThreadPoolExecutor, depth: int) -> None:
    """Belady's rule with bypass on a known order reads about half of a corpus twice the cache;
    with prefetching on it must stay so (a shard a stream had just reached was evicted before
    it was read, and read again: 0.7 per epoch where Belady reads 0.5)."""
    smart = await reads_per_epoch(dataset, pool, "smart", depth)
    lru = await reads_per_epoch(dataset, pool, "lru", depth)
    assert max(smart) <= 0.6, (smart, lru)
    assert sum(smart) < 0.75 * sum(lru), (smart, lru)


async def test_a_cached_shard_a_stream_has_just_reached_is_not_evicted_before_it_is_read(
        dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    """A stream reports a shard as it reaches it, before reading it: the shard is in use then,
    not "next used next epoch", or a newcomer evicts it and the stream reads it from the source
    again (what kept the smart policy at 0.7 reads per epoch with prefetching on)."""
    store = ShardStore(ShardCache(1 << 30), pool)
    seed, ordinals = 3, (1, 2, 3)
    sizes = {o: _charged(dataset, store.shard_index(dataset, seed, 0, o)) for o in (*ordinals, 4)}
    budget = sum(sizes[o] for o in ordinals) + min(sizes.values()) // 2  # three entries, not a fourth
    store = ShardStore(ShardCache(budget), pool)
    store.cache.future.update("rank", dataset.fingerprint, seed, dataset.num_shards, 0, 0)
    for o in ordinals:  # needed 1st, 2nd and 3rd: all admitted
        await store.tokenized(dataset, store.shard_index(dataset, seed, 0, o))
    assert len(store.cache) == 3 and store.source_reads == 3
    store.cache.future.update("rank", dataset.fingerprint, seed, dataset.num_shards, 0, 1)  # reaches ordinal 1
    await store.tokenized(dataset, store.shard_index(dataset, seed, 0, 4))  # needed later than all three
    assert store.source_reads == 4
    await store.tokenized(dataset, store.shard_index(dataset, seed, 0, 1))  # the stream reads its shard
    assert store.source_reads == 4, "the shard the stream had reached was evicted and read again"
    await store.close()


def _charged(ds: Dataset, index: int) -> int:
    cache = ShardCache(1 << 30)
    cache.put("k", ds.tokenize_shard(index))
    return cache.bytes


async def test_a_prefetch_that_every_stream_has_overtaken_reads_nothing(
        dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    """A prefetch that waited in the executor until its stream reached the shard leaves the read
    to the stream's own load, instead of reading the source a second time."""
    store = ShardStore(ShardCache(64 << 20), pool, prefetch=PrefetchSettings(depth=2))
    store.cache.future.update("rank", dataset.fingerprint, 3, dataset.num_shards, 0, 0)
    await store._warm(dataset, store.shard_index(dataset, 3, 0, 0))  # the shard the stream is at
    assert store.source_reads == 0 and store.stats()["prefetch_late"] == 1
    await store._warm(dataset, store.shard_index(dataset, 3, 0, 1))  # one ahead of it
    assert store.source_reads == 1 and store.stats()["prefetch_late"] == 1
    await store.close()


async def test_a_stream_that_read_a_declined_shard_never_joins_a_cache_only_packing(
        dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    """A stream packs the tokens it read in a flight of its own: joining a pack-ahead of the same
    shard, which reads only the cache (that declined the shard), it got nothing and failed."""
    store = ShardStore(ShardCache(1), pool)  # admits nothing: every shard is declined
    read, go, held, hold = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    tokenize, contains = dataset.tokenize_shard, store.cache.contains

    def slow_tokenize(index: int) -> TokenizedShard:
        read.set()
        go.wait(10)
        return tokenize(index)

    def held_contains(key: str, slot: Slot | None = None) -> bool:
        if read.is_set():  # the pack-ahead's lookup: it waits until the stream has its rows
            held.set()
            hold.wait(10)
        return contains(key, slot)

    dataset.tokenize_shard = slow_tokenize  # type: ignore[method-assign]
    store.cache.contains = held_contains  # type: ignore[method-assign]
    stream = asyncio.create_task(store.packed(dataset, 1, 0, 0, 32))
    await asyncio.get_running_loop().run_in_executor(None, read.wait, 10)  # the stream is reading
    assert store.pack_ahead(dataset, 1, 0, 0, 32, "concat")
    await asyncio.get_running_loop().run_in_executor(None, held.wait, 10)  # the pack-ahead is in flight
    go.set()
    done, _ = await asyncio.wait({stream}, timeout=10)
    hold.set()
    assert stream in done and stream.result().rows > 0
    await store.close()
