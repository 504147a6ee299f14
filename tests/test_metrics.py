"""Server metrics against ground truth: a real server, a real client, /metrics scraped over HTTP."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess, jsonl_config, make_documents, write_jsonl
from server import exporter, metrics
from server.serve.drive import complete
from server.stream import walk
from server.supply.cache import ShardCache
from server.supply.cache_disk import DiskTier
from server.stages.packing import tokenized_shard
from server.supply.store import ShardStore
from tokenfeed import wire
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

_METRICS_LINE = re.compile(r"metrics: serving (http://\S+/metrics)")
STREAM = "tokenfeed.v1.TokenFeed"
#: Every label name the server may use: all from small fixed sets (DESIGN.md habit 10).
ALLOWED_LABELS = {"dataset", "packing", "source", "reason", "tier", "tokenizer", "service", "method", "code", "le",
                  "kind",  # tokenfeed_plan_edits: the data plan's edit kinds (skip, exclude, weights)
                  # prometheus_client's own process/platform/gc collectors:
                  "generation", "implementation", "major", "minor", "patchlevel", "version"}

Samples = dict[tuple[str, frozenset], float]


def metrics_url(server: ServerProcess) -> str:
    m = _METRICS_LINE.search(server.log())
    assert m, "server did not log its metrics address:\n" + server.log()
    return m.group(1)


def scrape(url: str) -> Samples:
    """Every sample of one scrape, keyed by name and label set."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def poll(fn: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Call ``fn`` until it returns something truthy; the server is another process, so there is
    no event to wait on: poll with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result or time.monotonic() > deadline:
            assert result, f"condition not met within {timeout}s"
            return result
        time.sleep(interval)


def settled(url: str, streams: int) -> Samples:
    """A scrape taken once ``streams`` StreamBatches calls have ended and none is open."""
    def done() -> Samples | None:
        s = scrape(url)
        ended = value(s, "tokenfeed_rpc_handled_total", method="StreamBatches")
        return s if ended == streams and value(s, "tokenfeed_active_streams") == 0 else None
    return poll(done)


def served(start_server: Callable[..., ServerProcess], tmp_path: Path, docs: list[str] | None = None,
           bad_lines: tuple[str, ...] = (), shard_bytes: int = 8 << 10, truncate_last: bool = False,
           **server: Any) -> tuple[ServerProcess, str]:
    """A server of 4 JSONL files of ``docs``; ``bad_lines`` go at the end of the first file, and
    ``truncate_last`` makes the last file a zstd stream cut short (a content fault: a broken shard)."""
    docs = make_documents(200, seed=3) if docs is None else docs
    files = write_jsonl(tmp_path / "data", docs, files=4)
    with files[0].open("a") as f:
        f.writelines(line + "\n" for line in bad_lines)
    if truncate_last:
        files[-1].write_bytes(zstandard.ZstdCompressor().compress(files[-1].read_bytes())[:-64])
    proc = start_server(jsonl_config(tmp_path / "data", shard_bytes=shard_bytes, **server),
                        extra_args=["--metrics-port", "0"])
    return proc, metrics_url(proc)


def request(**kw: Any) -> pb.StreamRequest:
    base = dict(dataset="docs", seed=7, seq_len=64, batch_size=4, rank=0, world_size=1, batches_per_message=2,
                compression=pb.COMPRESSION_ZSTD)
    return pb.StreamRequest(**{**base, **kw})


def stub_for(server: ServerProcess) -> tuple[grpc.Channel, pb_grpc.TokenFeedStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, pb_grpc.TokenFeedStub(channel)


@pytest.mark.parametrize("packing", wire.PACKINGS)
def test_sent_counters_equal_what_the_client_counts(start_server, tmp_path, packing):
    """Stream, stop; then replay the same (deterministic) stream for exactly as many messages as
    the server counted, and count tokens, PAD, rows and wire bytes on the client side."""
    proc, url = served(start_server, tmp_path)
    channel, stub = stub_for(proc)
    shape = dict(seq_len=128, batch_size=8, batches_per_message=4, packing=packing)
    call = stub.StreamBatches(request(**shape))
    for _ in range(5):
        next(call)
    call.cancel()
    after = settled(url, 1)
    messages = int(value(after, "tokenfeed_sent_messages_total", dataset="docs"))
    assert messages >= 5

    tokens = pads = rows = batches = payload = 0
    replay = stub.StreamBatches(request(**shape))
    for _ in range(messages):
        chunk = next(replay)
        inputs = wire.decode_chunk(chunk)[..., :-1]
        tokens, pads = tokens + inputs.size, pads + int(np.count_nonzero(inputs == chunk.pad_id))
        rows, batches, payload = rows + chunk.num_batches * chunk.rows, batches + chunk.num_batches, \
            payload + len(chunk.tokens)
    replay.cancel()
    channel.close()
    assert pads > 0, "the corpus must make padded rows for this test to mean something"
    assert value(after, "tokenfeed_sent_tokens_total", dataset="docs") == tokens
    assert value(after, "tokenfeed_sent_pad_tokens_total", dataset="docs") == pads
    assert value(after, "tokenfeed_sent_rows_total", dataset="docs") == rows
    assert value(after, "tokenfeed_sent_batches_total", dataset="docs") == batches
    assert value(after, "tokenfeed_sent_bytes_total", dataset="docs") == payload
    assert value(after, "tokenfeed_packing_efficiency", dataset="docs", packing=packing) == \
        pytest.approx(1 - pads / tokens)
    assert value(after, "tokenfeed_batch_assembly_seconds_count", dataset="docs") == messages
    assert value(after, "tokenfeed_stream_first_batch_seconds_count", dataset="docs") == 1

    # The user-facing client sees the same tokens in the same number of batches.
    from client import StreamingDataset

    ds = StreamingDataset(proc.address, "docs", seq_len=128, batch_size=8, seed=7, rank=0, world_size=1,
                          batches_per_message=4, compression="zstd", packing=packing)
    seen = seen_pad = 0
    for i, batch in enumerate(ds):
        seen += batch["input_ids"].numel()
        seen_pad += int((batch["input_ids"] == 257).sum())
        if i + 1 == batches:
            break
    assert (seen, seen_pad) == (tokens, pads)


def test_an_open_streams_counts_show_while_it_stays_open(start_server, tmp_path):
    """A stream's counts are added to the counters as it goes (the loop's tick), not only when it
    ends: a stream held open by a trainer that stopped reading still shows what it sent."""
    proc, url = served(start_server, tmp_path)
    channel, stub = stub_for(proc)
    call = stub.StreamBatches(request(batches_per_message=1, compression=pb.COMPRESSION_NONE))
    try:
        taken = [next(call) for _ in range(6)]

        def counted() -> Samples | None:
            s = scrape(url)
            return s if value(s, "tokenfeed_sent_messages_total", dataset="docs") >= len(taken) else None

        s = poll(counted)
        assert value(s, "tokenfeed_active_streams") == 1, "the stream ended: this test needs it open"
        assert value(s, "tokenfeed_sent_batches_total", dataset="docs") >= len(taken)
    finally:
        call.cancel()
        channel.close()


def test_shared_memory_bytes_count_what_went_through_rings(start_server, tmp_path):
    """Bytes written into clients' rings are counted apart (and within sent bytes); a stream
    that offers no ring adds none."""
    from client import StreamingDataset

    proc, url = served(start_server, tmp_path)
    for shared in (False, True):
        ds = StreamingDataset(proc.address, "docs", seq_len=128, batch_size=8, batches_per_message=4,
                              shared_memory=shared, decode_ahead=0)
        for i, _ in enumerate(ds):
            if i == 11:
                break
        ds.close()
        after = settled(url, 1 + shared)
        if not shared:
            inline = value(after, "tokenfeed_sent_bytes_total", dataset="docs")
            assert inline > 0 and value(after, "tokenfeed_shared_memory_bytes_total", dataset="docs") == 0
    ring = value(after, "tokenfeed_shared_memory_bytes_total", dataset="docs")
    assert ring >= 3 * 4 * 8 * 129 * 2  # at least the three messages the client took
    assert value(after, "tokenfeed_sent_bytes_total", dataset="docs") == inline + ring


def test_active_streams_and_rpc_status_codes(start_server, tmp_path):
    proc, url = served(start_server, tmp_path)
    channel, stub = stub_for(proc)
    calls = [stub.StreamBatches(request(rank=r, world_size=3)) for r in range(3)]
    for call in calls:
        next(call)
    poll(lambda: value(scrape(url), "tokenfeed_active_streams", dataset="docs") == 3)
    for call in calls:
        call.cancel()
    stub.Describe(pb.DescribeRequest(dataset="docs"))
    with pytest.raises(grpc.RpcError) as err:
        stub.Describe(pb.DescribeRequest(dataset="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        next(stub.StreamBatches(request(seq_len=0)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    unknown = channel.unary_unary("/tokenfeed.v1.TokenFeed/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as err:
        unknown(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()
    s = settled(url, 4)
    handled = {(dict(ls)["method"], dict(ls)["code"]): v for (n, ls), v in s.items()
               if n == "tokenfeed_rpc_handled_total"}
    assert handled == {("StreamBatches", "CANCELLED"): 3, ("StreamBatches", "INVALID_ARGUMENT"): 1,
                       ("Describe", "OK"): 1, ("Describe", "NOT_FOUND"): 1, ("unknown", "UNIMPLEMENTED"): 1}
    for method, n in (("StreamBatches", 4), ("Describe", 2)):
        assert value(s, "tokenfeed_rpc_started_total", service=STREAM, method=method) == n
        assert value(s, "tokenfeed_rpc_duration_seconds_count", service=STREAM, method=method) == n
    assert value(s, "tokenfeed_stream_first_batch_seconds_count", dataset="docs") == 3


def test_bad_records_and_broken_shards_are_counted_per_source_and_reason(start_server, tmp_path):
    bad = ("{not json", json.dumps({"meta": 1}), json.dumps({"text": 5}))
    proc, url = served(start_server, tmp_path, bad_lines=bad, shard_bytes=1 << 20, truncate_last=True)
    channel, stub = stub_for(proc)
    call = stub.StreamBatches(request(seq_len=256, batch_size=8))
    for chunk in call:  # one whole epoch: every shard is read once
        if max(chunk.epochs) >= 1:
            break
    call.cancel()
    described = dict(stub.Describe(pb.DescribeRequest(dataset="docs")).datasets[0].bad_records)
    channel.close()
    s = scrape(url)
    labels = {"dataset": "docs", "source": "jsonl"}
    assert value(s, "tokenfeed_bad_records_total", reason="invalid_json", **labels) == 1
    assert value(s, "tokenfeed_bad_records_total", reason="missing_field", **labels) == 1
    assert value(s, "tokenfeed_bad_records_total", reason="not_a_string", **labels) == 1
    assert value(s, "tokenfeed_broken_shards_total", reason="truncated", **labels) == 1
    assert value(s, "tokenfeed_broken_shards_total", **labels) == 1
    for reason, count in described.items():  # the same numbers as the Describe RPC reports
        family = "tokenfeed_broken_shards_total" if reason == "broken_shard" else "tokenfeed_bad_records_total"
        assert value(s, family, **({} if reason == "broken_shard" else {"reason": reason}), **labels) == count
    # Tokenizer accounting: 4 shards loaded (one broken), their tokens are the byte tokenizer's (bytes + 1 EOS per doc).
    assert value(s, "tokenfeed_tokenized_shards_total", **labels) == 4
    docs = value(s, "tokenfeed_tokenizer_documents_total", dataset="docs", tokenizer="byte")
    kept = make_documents(200, seed=3)
    kept = [d for i, d in enumerate(kept) if i % 4 != 3]
    assert docs == len(kept)
    assert value(s, "tokenfeed_tokenizer_tokens_total", dataset="docs") == sum(len(d.encode()) + 1 for d in kept)


def test_label_cardinality_is_bounded(start_server, tmp_path):
    """Many different streams (ranks, seeds, cursors, sizes) add no series after the first."""
    proc, url = served(start_server, tmp_path)
    channel, stub = stub_for(proc)

    def run(**kw: Any) -> None:
        call = stub.StreamBatches(request(**kw))
        next(call)
        call.cancel()

    run()
    before = settled(url, 1)
    for i in range(12):
        run(seed=100 + i, rank=i % 4, world_size=4, seq_len=32 + i, batch_size=1 + i % 3, worker_id=i,
            compression=pb.COMPRESSION_NONE if i % 2 else pb.COMPRESSION_ZSTD)
    channel.close()
    after = settled(url, 13)
    tokenfeed = {k for k in after if k[0].startswith("tokenfeed_")}
    assert tokenfeed == {k for k in before if k[0].startswith("tokenfeed_")}
    names = {name for _, labels in after for name, _ in labels}
    assert names <= ALLOWED_LABELS, names - ALLOWED_LABELS
    assert len(tokenfeed) < 400


def _exported(store: ShardStore) -> Samples:
    """What the scrape-time collector exports for a real store (no dataset)."""
    collector = exporter.ServerCollector({}, store)
    return {(s.name, frozenset(s.labels.items())): s.value for f in collector.collect() for s in f.samples}


def test_cache_collector_matches_lookups(pool):
    """hits + misses = lookups made, hits = lookups answered, entries and bytes = what the cache
    holds, evictions = admitted shards no longer held (keys are distinct, nothing expires),
    declined admissions = puts not admitted."""
    rng = np.random.default_rng(0)
    shards = [tokenized_shard([rng.integers(0, 256, 3000).astype(np.uint16)], 256, np.dtype(np.uint16))
              for _ in range(8)]
    cache = ShardCache(3 * shards[0].nbytes)
    lookups = hits = puts = admitted = 0
    for i in [0, 1, 0, 2, 3, 0, 1, 4, 5, 3, 6, 7, 0, 7]:
        key = f"shard-{i}"
        lookups += 1
        if cache.get(key) is not None:
            hits += 1
            continue
        puts += 1
        admitted += cache.put(key, shards[i])
    s = _exported(ShardStore(cache, pool))
    assert value(s, "tokenfeed_cache_hits_total") + value(s, "tokenfeed_cache_misses_total") == lookups
    assert value(s, "tokenfeed_cache_hits_total") == hits > 0
    assert value(s, "tokenfeed_cache_hit_ratio") == pytest.approx(hits / lookups)
    assert value(s, "tokenfeed_cache_entries", tier="memory") == len(cache) > 0
    assert value(s, "tokenfeed_cache_bytes", tier="memory") == cache.bytes > 0
    assert value(s, "tokenfeed_cache_evictions_total") == admitted - len(cache) > 0
    assert value(s, "tokenfeed_cache_admissions_declined_total") == puts - admitted
    assert value(s, "tokenfeed_cache_max_bytes") == cache.max_bytes
    assert math.isnan(value(_exported(ShardStore(ShardCache(10), pool)), "tokenfeed_cache_hit_ratio"))


async def test_collector_exports_what_a_real_tiered_store_reports(dataset, pool, tmp_path):
    """A store as the server builds it (memory and disk tiers, hot tier, prefetcher) after real
    reads, an expiry and a second pass from disk: every exported number is the store's own."""
    from server.config import PrefetchSettings
    from server.stages.order import Locator
    from server.stream.walker import make_walker

    now = [0.0]
    disk = DiskTier(tmp_path / "disk", 64 << 20)
    cache = ShardCache(6 << 10, ttl_s=60, disk=disk, clock=lambda: now[0])
    store = ShardStore(cache, pool, packed_slots=3, prefetch=PrefetchSettings(depth=2, concurrency=2))
    rows = np.empty((16, 33), dtype=dataset.dtype)
    for first in (True, False):  # the second pass finds the shards on disk: memory expired meanwhile
        walker = make_walker(store, dataset, 5, 32, "concat", Locator())
        for _ in range(40):
            await complete(walker.store, walk.take(walker, rows))
        walker.close()
        await store.prefetcher.idle()
        if first:
            now[0] += 3600
            assert cache.expire() > 0
    stats, pre = store.stats(), store.prefetch_stats()
    s = _exported(store)
    for name in ("hits", "misses", "evictions", "expirations", "admissions_declined"):
        assert value(s, f"tokenfeed_cache_{name}_total") == stats[name], name
    assert stats["expirations"] > 0 and stats["misses"] > 0
    assert value(s, "tokenfeed_cache_hit_ratio") == pytest.approx(stats["hits"] / (stats["hits"] + stats["misses"]))
    for tier in ("memory", "disk", "hot"):
        assert value(s, "tokenfeed_cache_bytes", tier=tier) == stats[f"{tier}_bytes"], tier
        assert value(s, "tokenfeed_cache_entries", tier=tier) == stats[f"{tier}_entries"], tier
    assert value(s, "tokenfeed_cache_entries", tier="memory") == len(cache) > 0
    assert value(s, "tokenfeed_cache_entries", tier="disk") == len(list((tmp_path / "disk").rglob("*.tfc"))) > 0
    assert 0 < value(s, "tokenfeed_cache_entries", tier="hot") <= 3
    assert value(s, "tokenfeed_cache_compression_ratio") == stats["compression_ratio"] > 1
    assert value(s, "tokenfeed_cache_max_bytes") == 6 << 10
    assert value(s, "tokenfeed_hot_packs_total") == stats["hot_packs"] > 0
    assert value(s, "tokenfeed_hot_evictions_total") == stats["hot_evictions"] > 0
    assert (value(s, "tokenfeed_prefetch_hits_total"), value(s, "tokenfeed_prefetch_wasted_total"),
            value(s, "tokenfeed_prefetch_queue_depth"), value(s, "tokenfeed_inflight_loads")) == \
        (pre["hits"], stats["prefetch_wasted"], pre["queue_depth"], pre["inflight"])
    assert pre["hits"] > 0 and stats["prefetch_done"] > 0
    await store.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=12), st.integers(2, 40), st.sampled_from([5, 1, 256]))
def test_pad_positions_counts_every_pad_of_right_padded_rows(pads_per_row, seq_len, fill):
    """The O(rows) count equals a full count when packing pads only the tail of a row (ids 1 and
    256 next to each other hold PAD 257's bytes, 01 01, across their boundary)."""
    rows = np.full((len(pads_per_row), seq_len + 1), fill, dtype=np.uint16)
    rows[:, ::2] = 256 if fill == 1 else fill
    for row, n in zip(rows, pads_per_row):
        row[seq_len + 1 - min(n, seq_len + 1):] = 257
    tokens = rows.reshape(1, len(pads_per_row), seq_len + 1)
    assert metrics.pad_positions(tokens, 257) == int(np.count_nonzero(tokens[..., :-1] == 257))


def test_meter_costs_microseconds_per_message():
    """Per-message accounting of a [1, 8, 2049] message: counters, two histograms, a pad check."""
    tokens = np.zeros((1, 8, 2049), dtype=np.uint16)
    tokens[0, -1, 1000:] = 257
    meter = metrics.StreamMeter("cost-test", "concat", 257)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        meter.sent(tokens, 32000)
        meter.resumed()
    per_message = (time.perf_counter() - t0) / n
    assert per_message < 200e-6, f"{per_message * 1e6:.1f} µs per message"


async def test_loop_lag_watch_sees_a_blocked_loop():
    """The lag histogram tells an operator that the event loop (every stream's one thread) is the
    limit: a loop kept from its timers for 0.2 s shows as a lag of about 0.2 s."""
    import asyncio

    lags: list[float] = []
    enough = asyncio.Event()

    def observe(lag: float) -> None:
        lags.append(lag)
        if len(lags) >= 6:
            enough.set()

    watch = asyncio.get_running_loop().create_task(exporter.watch_loop_lag(0.01, observe))
    await asyncio.sleep(0.03)  # a few samples of a loop that is free
    time.sleep(0.2)  # the loop is busy: no timer can run
    await enough.wait()
    watch.cancel()
    assert max(lags) >= 0.15, lags
    assert min(lags) < 0.1, lags


def test_server_exports_its_loop_lag(start_server, tmp_path):
    _, url = served(start_server, tmp_path)
    poll(lambda: value(scrape(url), "tokenfeed_event_loop_lag_seconds_count") >= 3)
