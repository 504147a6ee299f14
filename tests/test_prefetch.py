"""The prefetcher: dedup, cancellation, backpressure, nothing left behind when streams close, and
that caching and prefetching never change what a client receives."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from server import exporter
from server.serve.drive import complete, stream_chunks
from server.stream import walk
from server.supply.cache import DiskTier, ShardCache, shard_key
from server.config import PrefetchSettings, ServerSettings
from server.stages.dataset import Dataset
from server.stages.packing import TokenizedShard, concat_rows
from server.stages.order import shard_order
from server.serve.service import TokenFeedService, add_to_server
from server.supply.store import ShardStore
from server.serve.protocol import parse_request
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

from conftest import jsonl_config, make_documents, write_jsonl


class Gate:
    """Wraps ``ds.tokenize_shard``: records calls and holds them until ``release()``."""

    def __init__(self, ds: Dataset, closed: bool = True) -> None:
        self.calls: list[int] = []
        self.entered = threading.Event()
        self._open = threading.Event()
        if not closed:
            self._open.set()
        self._original = ds.tokenize_shard
        ds.tokenize_shard = self  # type: ignore[method-assign]

    def __call__(self, index: int) -> TokenizedShard:
        self.calls.append(index)
        self.entered.set()
        if not self._open.wait(30):
            raise TimeoutError("gate never opened")
        return self._original(index)

    def release(self) -> None:
        self._open.set()


@pytest.fixture
def gates(pool: ThreadPoolExecutor) -> Iterator[Callable[..., Gate]]:
    """``gate(ds, closed=True)``; every gate opens at teardown, before the pool waits for its threads."""
    made: list[Gate] = []

    def make(ds: Dataset, closed: bool = True) -> Gate:
        made.append(Gate(ds, closed))
        return made[-1]

    yield make
    for g in made:
        g.release()


def make_store(pool: ThreadPoolExecutor, depth: int = 4, concurrency: int = 2, max_bytes: int = 64 << 20) -> ShardStore:
    return ShardStore(ShardCache(max_bytes), pool, prefetch=PrefetchSettings(depth=depth, concurrency=concurrency))


def prefetch_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("prefetch ")]


def open_files_under(path: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            out.append(target)
    return out


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """For conditions another process or a server-side task settles, with no event to await."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_each_shard_is_loaded_once_for_all_streams_and_requests(
        dataset: Dataset, pool: ThreadPoolExecutor, gates: Callable[..., Gate]) -> None:
    gate = gates(dataset)
    store = make_store(pool, depth=4, concurrency=4)
    order = shard_order(7, 0, dataset.num_shards).tolist()
    ranks = [store.follow(dataset, 7) for _ in range(3)]  # three ranks of one job, same position
    for f in ranks:
        f.at(0, 0)
    # A request for the next shard joins the prefetch already loading it.
    request = asyncio.create_task(store.tokenized(dataset, order[1]))
    await asyncio.to_thread(gate.entered.wait, 10)
    gate.release()
    shard = await request
    await store.prefetcher.idle()
    assert sorted(gate.calls) == sorted(order[1:5])
    assert np.array_equal(shard.tokens, dataset.tokenize_shard._original(order[1]).tokens)
    assert (await store.tokenized(dataset, order[2])).num_tokens > 0
    stats = store.stats()
    assert stats["prefetch_hits"] == 2  # one joined in flight, one found in the cache
    assert stats["misses"] == 0 and sorted(gate.calls) == sorted(order[1:5])
    for f in ranks:
        f.close()


async def test_closing_a_stream_cancels_its_waiting_prefetches(
        dataset: Dataset, pool: ThreadPoolExecutor, gates: Callable[..., Gate]) -> None:
    gate = gates(dataset)
    store = make_store(pool, depth=4, concurrency=1)
    follower = store.follow(dataset, 1)
    follower.at(0, 0)
    await asyncio.to_thread(gate.entered.wait, 10)
    stats = store.prefetcher.stats()
    assert stats["prefetch_inflight"] == 1 and stats["prefetch_queue_depth"] == 3
    loading = f"#{shard_order(1, 0, dataset.num_shards)[1]}"
    waiting = [t for t in prefetch_tasks() if not t.get_name().endswith(loading)]
    follower.close()
    await asyncio.wait(waiting)
    stats = store.prefetcher.stats()
    assert stats["prefetch_cancelled"] == 3 and stats["prefetch_queue_depth"] == 0
    gate.release()  # the load already in a thread finishes and stays cached
    await store.prefetcher.idle()
    assert len(gate.calls) == 1 and not prefetch_tasks() and not store._inflight
    assert store.stats()["memory_entries"] == 1 and len(store.cache.future) == 0


async def test_moving_on_cancels_what_left_the_window_unless_another_stream_wants_it(
        dataset: Dataset, pool: ThreadPoolExecutor, gates: Callable[..., Gate]) -> None:
    gate = gates(dataset)
    store = make_store(pool, depth=3, concurrency=1)
    order = shard_order(2, 0, dataset.num_shards).tolist()
    slow, fast = store.follow(dataset, 2), store.follow(dataset, 2)
    slow.at(0, 0)
    fast.at(0, 0)
    await asyncio.to_thread(gate.entered.wait, 10)  # order[1] loading; order[2], order[3] waiting
    fast.at(0, 10)  # fast jumps ahead: its window is now order[11:14]
    slow.close()    # order[2] and order[3] are now wanted by nobody
    gate.release()
    await store.prefetcher.idle()
    assert gate.calls == [order[1], *order[11:14]]
    fast.close()


async def test_a_window_across_an_epoch_holds_the_next_epochs_first_shards_and_is_worked_out_once(
        dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    store = make_store(pool, depth=3)
    n = dataset.num_shards
    window = store.prefetcher.window(dataset, 2, 0, n - 2, store.shard_index)
    last, next_epoch = shard_order(2, 0, n).tolist()[-1], shard_order(2, 1, n).tolist()
    assert list(window) == [(dataset.fingerprint, i) for i in (last, *next_epoch[:2])]
    # a job's ranks reach the same shard one after another: one window for all of them
    assert store.prefetcher.window(dataset, 2, 0, n - 2, store.shard_index) is window
    assert store.prefetcher.window(dataset, 3, 0, n - 2, store.shard_index) is not window


async def test_a_slow_consumer_never_makes_the_server_run_ahead(dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    gate = Gate(dataset, closed=False)
    depth, seq_len = 3, 32
    store = make_store(pool, depth=depth)
    request = pb.StreamRequest(dataset="d", seed=5, seq_len=seq_len, batch_size=2, world_size=1)
    chunks = stream_chunks(parse_request(request, {"d": dataset}, ServerSettings()), store)
    await chunks.__anext__()
    for _ in range(3):  # the consumer stalls: however long, nothing more is loaded
        await store.prefetcher.idle()
        await asyncio.sleep(0.05)
        assert len(gate.calls) == 1 + depth
    rows = 2
    while rows < 2000:  # consume across many shards: always exactly `depth` ahead, each shard once
        rows += len((await chunks.__anext__()).tokens[0])
    await store.prefetcher.idle()
    order = shard_order(5, 0, dataset.num_shards).tolist()
    ends = np.cumsum([concat_rows(dataset.shard_tokens[i], seq_len) for i in order[: len(gate.calls)]])
    current = int(np.searchsorted(ends, rows - 1, side="right"))  # ordinal of the last row read
    assert current >= 3
    assert len(gate.calls) == len(set(gate.calls)) and set(gate.calls) == set(order[: len(gate.calls)])
    assert current + depth <= len(gate.calls) <= current + 1 + depth
    await chunks.aclose()
    assert store.prefetcher.stats()["prefetch_streams"] == 0 and len(store.cache.future) == 0
    await store.prefetcher.idle()
    assert not prefetch_tasks()


@pytest.mark.integration
async def test_a_client_that_goes_away_leaves_nothing_behind(dataset: Dataset, pool: ThreadPoolExecutor,
                                                             tmp_path: Path) -> None:
    Gate(dataset, closed=False)
    store = make_store(pool, depth=4, concurrency=2, max_bytes=16 << 10)  # small: evictions too
    server = grpc.aio.server()
    add_to_server(TokenFeedService({"d": dataset}, store, ServerSettings()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TokenFeedStub(channel)
            calls = [stub.StreamBatches(pb.StreamRequest(dataset="d", seed=s, seq_len=64, batch_size=4,
                                                         world_size=1)) for s in range(4)]
            for call in calls:
                for _ in range(20):
                    await call.read()
            assert store.prefetcher.stats()["prefetch_streams"] == 4
            for call in calls:
                call.cancel()
        await until(lambda: store.prefetcher.stats()["prefetch_streams"] == 0 and len(store.cache.future) == 0)
        await store.prefetcher.idle()
        await until(lambda: not store._inflight)
        assert not prefetch_tasks()
        assert not open_files_under(tmp_path / "data")
        stats = store.stats()
        assert stats["prefetch_queue_depth"] == 0 and stats["prefetch_inflight"] == 0
        assert stats["memory_bytes"] <= 16 << 10 and stats["prefetched_bytes"] <= stats["memory_bytes"]
    finally:
        await server.stop(None)
        await store.close()


def read_batches(address: str, ranks: int, count: int) -> list[list[np.ndarray]]:
    from client import StreamingDataset

    out = []
    for rank in range(ranks):
        ds = StreamingDataset(address, "docs", seq_len=48, batch_size=4, seed=9, rank=rank, world_size=ranks,
                              batches_per_message=4)
        batches = []
        for batch in ds:
            batches.append(batch["input_ids"].numpy().copy())
            if len(batches) == count:
                break
        out.append(batches)
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_caching_and_prefetch_never_change_what_clients_receive(start_server, tmp_path: Path) -> None:
    docs = make_documents(60, seed=1, max_len=2000)
    write_jsonl(tmp_path / "data", docs, files=3)
    corpus_tokens = sum(len(d.encode()) + 1 for d in docs)
    count = int(1.3 * corpus_tokens / (2 * 4 * 48)) + 1  # per rank: 1.3 epochs in all
    base = jsonl_config(tmp_path / "data", shard_bytes=2048)
    variants = {
        "off": {"cache": {"max_bytes": 0}, "prefetch": {"depth": 0}},
        "tiny": {"cache": {"max_bytes": "1KiB"}, "prefetch": {"depth": 2}},  # smaller than any entry
        "lru-small": {"cache": {"max_bytes": "6KiB", "policy": "lru"}, "prefetch": {"depth": 4}},
        "smart-disk": {"cache": {"max_bytes": "6KiB", "disk": {"path": str(tmp_path / "disk"),
                                                                "max_bytes": "16KiB"}},
                       "prefetch": {"depth": 4, "concurrency": 3}},
        "huge": {"cache": {"max_bytes": "1GiB", "zstd_level": 1}, "prefetch": {"depth": 8}},
    }
    results = {}
    for name, extra in variants.items():
        server = start_server({**base, **extra})
        results[name] = read_batches(server.address, ranks=2, count=count)
        server.stop()
    reference = results.pop("off")
    for name, got in results.items():
        for rank, (want, have) in enumerate(zip(reference, got)):
            assert len(want) == len(have)
            for i, (a, b) in enumerate(zip(want, have)):
                assert np.array_equal(a, b), f"{name}: rank {rank} batch {i} differs"


async def test_a_walker_dropped_without_closing_still_lets_go(dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    import gc

    from server.stages.order import Locator
    from server.stream.walker import make_walker

    store = make_store(pool, depth=2)
    walker = make_walker(store, dataset, 3, 32, "concat", Locator())
    await complete(walker.store, walk.skip(walker, 5))
    assert len(store.cache.future) == 1 and store.prefetcher.stats()["prefetch_streams"] == 1
    del walker
    gc.collect()
    assert len(store.cache.future) == 0 and store.prefetcher.stats()["prefetch_streams"] == 0
    await store.prefetcher.idle()
    assert not prefetch_tasks()


async def test_hot_tier_keeps_to_its_byte_budget_and_counts_packings(
        dataset: Dataset, pool: ThreadPoolExecutor) -> None:
    """Packed shards are evicted by bytes (not only by count), and every packing is counted, so
    operators can see from tokenfeed_hot_packs_total whether the ranks spread wider than the tier."""
    seq_len = 32
    budget = 64 << 10  # about three packed shards of ~4 KiB of text (20-25 KiB packed: uint16 tokens, segments)
    store = ShardStore(ShardCache(64 << 20), pool, packed_slots=256, packed_bytes=budget)
    request = pb.StreamRequest(dataset="d", seed=1, seq_len=seq_len, batch_size=4, world_size=1, batches_per_message=4)
    chunks = stream_chunks(parse_request(request, {"d": dataset}, ServerSettings()), store)
    rows = 0
    while rows < 1500:  # many shards
        chunk = await chunks.__anext__()
        rows += chunk.tokens.shape[0] * chunk.tokens.shape[1]
        stats = store.stats()
        assert stats["hot_bytes"] <= budget, stats
    await chunks.aclose()
    stats = store.stats()
    order = shard_order(1, 0, dataset.num_shards).tolist()
    loaded = list(itertools.takewhile(lambda i: i in dataset.shard_tokens, order))
    ends = np.cumsum([concat_rows(dataset.shard_tokens[i], seq_len) for i in loaded])
    shards_read = int(np.searchsorted(ends, rows - 1, side="right")) + 1
    assert stats["hot_evictions"] > 0
    assert shards_read <= stats["hot_packs"] <= shards_read + 3  # each once, plus the pack-ahead past the end
    exported = {s.name: s.value for f in exporter.ServerCollector({}, store).collect() for s in f.samples}
    assert exported["tokenfeed_hot_packs_total"] == store.stats()["hot_packs"]
    assert exported["tokenfeed_hot_evictions_total"] == store.stats()["hot_evictions"]
    await store.close()


async def test_a_shard_larger_than_the_hot_tier_is_served_but_never_kept(dataset: Dataset,
                                                                          pool: ThreadPoolExecutor) -> None:
    """One oversized packed shard must not flush the tier that every other job shares."""
    store = ShardStore(ShardCache(64 << 20), pool, packed_slots=256, packed_bytes=32 << 10)
    small = await store.packed(dataset, 1, 0, 0, 32)
    assert store.stats()["hot_entries"] == 1
    huge = await store.packed(dataset, 1, 0, 1, 8192, "pad")  # a row of 8,193 tokens per document
    assert huge.nbytes > store.hot_max_bytes > small.nbytes and huge.rows > 0
    stats = store.stats()
    assert stats["hot_entries"] == 1 and stats["hot_bytes"] == small.nbytes and stats["hot_oversized"] == 1
    assert store.packed_now(dataset, 1, 0, 0, 32, "concat") is small
    await store.close()


class CountingPool(ThreadPoolExecutor):
    """A real thread pool that counts the runs handed to it."""

    runs = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        self.runs += 1
        return super().submit(fn, *args, **kwargs)


async def test_a_small_shard_in_the_caches_memory_is_packed_on_the_loop(dataset: Dataset, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A small shard's packing holds the GIL, so a thread would run it no sooner than the loop
    and cost the loop the hand-overs: a shard within ``PACK_HERE`` whose tokens are in the cache's
    memory is packed on the loop, ahead or on demand, with no run in the executor, into the same
    rows as a read-then-pack. One whose tokens are only on the disk tier is never read on the loop."""
    import server.supply.store as store_module

    seq_len, seed = 32, 4
    with CountingPool(2) as pool, ThreadPoolExecutor(1) as one:
        store = ShardStore(ShardCache(64 << 20), pool)
        for index in range(dataset.num_shards):  # every shard's tokens in the cache
            await store.tokenized(dataset, index)
        reference = ShardStore(ShardCache(0), one)  # nothing cached: read, then pack
        pool.runs = 0
        for ordinal in (0, 1):
            packed = await store.packed(dataset, seed, 0, ordinal, seq_len)
            expected = await reference.packed(dataset, seed, 0, ordinal, seq_len)
            np.testing.assert_array_equal(packed.row_view(0, packed.rows), expected.row_view(0, expected.rows))
        assert store.pack_ahead(dataset, seed, 0, 2, seq_len, "concat")
        assert store.packed_now(dataset, seed, 0, 2, seq_len, "concat") is not None  # at once: no flight
        assert pool.runs == 0 and store.stats()["hot_packs"] == 3
        # a burst of pack-aheads in one turn of the loop: a few here, the rest refused (asked for
        # again later) and packed in the next turn; none goes to the executor
        monkeypatch.setattr(store_module, "PACK_HERE_AHEAD_PER_TURN", 3)
        await asyncio.sleep(0)  # a turn of its own
        pool.runs, burst = 0, range(3, 8)
        assert [store.pack_ahead(dataset, seed, 0, o, seq_len, "concat") for o in burst] == [True] * 3 + [False] * 2
        assert [store.packed_now(dataset, seed, 0, o, seq_len, "concat") is not None for o in burst] == \
            [True] * 3 + [False] * 2
        await asyncio.sleep(0)
        assert all(store.pack_ahead(dataset, seed, 0, o, seq_len, "concat") for o in (6, 7))
        assert store.packed_now(dataset, seed, 0, 7, seq_len, "concat") is not None and pool.runs == 0
        # a job's start (a stream that has just begun): its pack-aheads go to the executor (held up
        # by a blocker here); while a backlog waits there, a running job's wait for it to drain
        blocker = threading.Event()
        for _ in range(2):  # both threads
            pool.submit(blocker.wait, 30)
        pool.runs, backlog = 0, store_module.PACK_HERE_BACKLOG
        follower = store.follow(dataset, seed)
        await asyncio.sleep(0)
        assert all(store.pack_ahead(dataset, seed, 0, o, seq_len, "concat") for o in range(8, 8 + backlog))
        assert pool.runs == backlog and len(store._ahead) == backlog
        follower.close()
        store._stream_began -= store_module.PACK_HERE_QUIET_S  # the start is over
        await asyncio.sleep(0)
        ordinal = 8 + backlog
        assert not store.pack_ahead(dataset, seed, 0, ordinal, seq_len, "concat") and pool.runs == backlog
        blocker.set()
        await until(lambda: not store._inflight)
        assert store.pack_ahead(dataset, seed, 0, ordinal, seq_len, "concat") and pool.runs == backlog
        assert all(store.packed_now(dataset, seed, 0, o, seq_len, "concat") is not None for o in range(3, ordinal + 1))
        # one pack-ahead still in a thread is no backlog: the next ones are packed here, not sent
        # after it (a running job's packing once stayed in the executor for good that way, the loop
        # asleep on the GIL)
        blocker = threading.Event()
        for _ in range(2):
            pool.submit(blocker.wait, 30)
        follower = store.follow(dataset, seed)
        await asyncio.sleep(0)
        pool.runs = 0
        assert store.pack_ahead(dataset, seed, 0, ordinal + 1, seq_len, "concat") and pool.runs == 1
        follower.close()
        store._stream_began -= store_module.PACK_HERE_QUIET_S
        await asyncio.sleep(0)
        assert store.pack_ahead(dataset, seed, 0, ordinal + 2, seq_len, "concat") and pool.runs == 1
        assert store.packed_now(dataset, seed, 0, ordinal + 2, seq_len, "concat") is not None
        # streams of a job still waiting for their first messages (the service says so): a start,
        # however long ago the last one began; its pack-aheads go to the executor
        store.job_starting = lambda: True
        assert store.pack_ahead(dataset, seed, 0, ordinal + 3, seq_len, "concat") and pool.runs == 2
        store.job_starting = lambda: False
        blocker.set()
        await until(lambda: not store._inflight)

        # on the disk tier only (a memory budget of nothing): packed in the executor, the same rows
        disk = ShardStore(ShardCache(0, disk=DiskTier(tmp_path / "tier", 64 << 20)), pool)
        await disk.tokenized(dataset, store.shard_index(dataset, seed, 0, 3))
        pool.runs = 0
        packed = await disk.packed(dataset, seed, 0, 3, seq_len)
        expected = await reference.packed(dataset, seed, 0, 3, seq_len)
        np.testing.assert_array_equal(packed.row_view(0, packed.rows), expected.row_view(0, expected.rows))
        assert pool.runs >= 1 and disk.cache.stats()["hits_disk"] >= 1
        for s in (store, disk, reference):
            await s.close()


async def test_a_prefetch_of_a_shard_in_the_caches_memory_hands_nothing_to_a_thread(dataset: Dataset,
                                                                                     tmp_path: Path) -> None:
    """The prefetcher asks about every shard a stream is about to reach; one already in memory is
    answered on the loop, with no run in the executor (each run a hand-over of the GIL and back).
    One only on the disk tier is still promoted, in the executor."""
    with CountingPool(2) as pool:
        store = ShardStore(ShardCache(64 << 20), pool, prefetch=PrefetchSettings(depth=4))
        for index in range(dataset.num_shards):
            await store.tokenized(dataset, index)
        pool.runs, before = 0, store.stats()
        follower = store.follow(dataset, 3)
        for ordinal in range(0, 12, 2):
            follower.at(0, ordinal)
            await store.prefetcher.idle()
        after = store.stats()
        assert pool.runs == 0 and after["misses"] == before["misses"] and store.source_reads == dataset.num_shards
        follower.close()
        await store.close()

        order = shard_order(5, 0, dataset.num_shards).tolist()
        tier = DiskTier(tmp_path / "tier", 64 << 20)
        writer = ShardStore(ShardCache(0, disk=tier), pool)  # tokens onto the disk tier only
        for index in order[1:5]:
            await writer.tokenized(dataset, index)
        disk = ShardStore(ShardCache(64 << 20, disk=tier), pool, prefetch=PrefetchSettings(depth=4))
        pool.runs = 0
        follower = disk.follow(dataset, 5)
        follower.at(0, 0)
        await disk.prefetcher.idle()
        assert pool.runs == 4 and all(disk.cache.contains(shard_key(dataset, i), memory_only=True) for i in order[1:5])
        follower.close()
        for s in (writer, disk):
            await s.close()


async def test_a_cached_shard_is_looked_up_and_packed_in_one_run(dataset: Dataset,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each hop between the event loop and a thread waits for a turn of a loop that may be serving
    64 streams (tens of ms each): packing a cached shard too large to pack on the loop, ahead or
    on demand, is one run, so the pack-aheads of a large job keep ahead of its ranks."""
    import server.supply.store as store_module

    monkeypatch.setattr(store_module, "PACK_HERE", {"concat": (0, 0)})  # every shard over the bounds
    seq_len, seed = 32, 4
    with CountingPool(2) as pool:
        store = ShardStore(ShardCache(64 << 20), pool)
        for index in range(dataset.num_shards):  # every shard's tokens in the cache
            await store.tokenized(dataset, index)
        reference = ShardStore(ShardCache(0), ThreadPoolExecutor(1))  # nothing cached: read, then pack
        for ordinal in (0, 1):
            pool.runs = 0
            packed = await store.packed(dataset, seed, 0, ordinal, seq_len)
            assert pool.runs == 1
            expected = await reference.packed(dataset, seed, 0, ordinal, seq_len)
            np.testing.assert_array_equal(packed.row_view(0, packed.rows), expected.row_view(0, expected.rows))
        pool.runs = 0
        assert store.pack_ahead(dataset, seed, 0, 2, seq_len, "concat")
        await store.packed(dataset, seed, 0, 2, seq_len)  # a stream that gets there first joins the run
        assert store.packed_now(dataset, seed, 0, 2, seq_len, "concat") is not None and pool.runs == 1
        # a pack-ahead of a shard that is not cached reads nothing (that is the prefetcher's) and packs nothing
        empty = ShardStore(ShardCache(64 << 20), pool)
        pool.runs = 0
        assert empty.pack_ahead(dataset, seed, 0, 3, seq_len, "concat")
        await until(lambda: not empty._inflight)
        assert empty.packed_now(dataset, seed, 0, 3, seq_len, "concat") is None and dataset.num_shards > 3
        await store.close()
        await empty.close()
        await reference.close()
        reference.executor.shutdown()


async def test_a_load_cancelled_by_an_executor_shutdown_cancels_its_waiters(dataset: Dataset,
                                                                             gates: Callable[..., Gate]) -> None:
    """Shutdown cancels the loads still queued; whoever waits for one is cancelled, not handed an error."""
    gate = gates(dataset)
    pool = ThreadPoolExecutor(1)
    store = ShardStore(ShardCache(64 << 20), pool)
    first = asyncio.ensure_future(store.tokenized(dataset, 0))  # holds the only thread
    await asyncio.to_thread(gate.entered.wait, 10)
    queued = asyncio.ensure_future(store.tokenized(dataset, 1))
    await until(lambda: len(store._inflight) == 2)
    pool.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(asyncio.CancelledError):
        await queued
    gate.release()
    assert (await first).num_docs > 0
    await store.close()


async def test_failed_pack_aheads_free_their_slots(dataset: Dataset, pool: ThreadPoolExecutor,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack-ahead that fails is not an error until its shard is read, and it gives its slot back:
    more failures than there are slots do not stop the pack-aheads for good."""
    import server.supply.store as store_module

    seq_len, seed = 32, 6
    store = ShardStore(ShardCache(64 << 20), pool)
    for index in range(dataset.num_shards):
        await store.tokenized(dataset, index)
    real_pack = store_module.pack
    monkeypatch.setattr(store_module, "pack", lambda *a: (_ for _ in ()).throw(OSError("disk on fire")))
    # packed on the loop: the failure is not raised by the pack-ahead, but where the shard is read
    assert store.pack_ahead(dataset, seed, 0, 0, seq_len, "concat") and not store._ahead
    with pytest.raises(OSError, match="disk on fire"):
        await store.packed(dataset, seed, 0, 0, seq_len)
    monkeypatch.setattr(store_module, "PACK_HERE", {})  # in the executor from here
    failing = min(dataset.num_shards - 1, store_module.MAX_PACK_AHEAD + 4)
    for ordinal in range(failing):
        while not store.pack_ahead(dataset, seed, 0, ordinal, seq_len, "concat"):
            await until(lambda: len(store._ahead) < store_module.MAX_PACK_AHEAD)
    await until(lambda: not store._inflight)
    assert not store._ahead
    monkeypatch.setattr(store_module, "pack", real_pack)
    assert store.pack_ahead(dataset, seed, 0, failing, seq_len, "concat")
    packed = await store.packed(dataset, seed, 0, failing, seq_len)
    assert packed.rows > 0 and store.packed_now(dataset, seed, 0, failing, seq_len, "concat") is packed
    await store.close()
