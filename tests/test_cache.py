"""The shard cache: LRU order, TTL, byte accounting, the smart policy, corruption, the disk tier,
content-addressed keys, and concurrent use through the store."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import make_documents, write_jsonl

from server.supply.cache import ENTRY_OVERHEAD, DiskTier, FutureIndex, ShardCache, shard_key
from server.supply.cache_disk import decode, encode
from server.supply.cache_policy import LRUPolicy, SmartPolicy, next_use
from server.config import DatasetConfig
from server.stages.dataset import Dataset
from server.errors import FailedPrecondition
from server.stages.packing import TokenizedShard, tokenized_shard
from server.stages.order import shard_order
from server.supply.store import ShardStore

EOS = 256


def shard(seed: int, docs: int = 5, tokens: int = 400, text: bool = True) -> TokenizedShard:
    """A small tokenized shard; ``text``-like tokens compress, random ones barely do."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(docs):
        if text:
            words = rng.integers(97, 123, size=(tokens // 8, 8)).astype(np.uint16)
            words[:, -1] = 32
            parts.append(np.tile(words[: max(1, tokens // 64)].reshape(-1), 8)[:tokens])
        else:
            parts.append(rng.integers(0, 256, size=tokens).astype(np.uint16))
    return tokenized_shard(parts, EOS, np.dtype("<u2"))


def same(a: TokenizedShard, b: TokenizedShard) -> bool:
    return np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets)


def entry_size(cache: ShardCache, key: str) -> int:
    return cache._entries[key].size


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- codec, byte accounting ----------------------------------------------------------------
def test_roundtrip_and_byte_accounting_count_compressed_size() -> None:
    cache = ShardCache(1 << 20, policy="lru")
    values = {f"k{i}": shard(i) for i in range(3)}
    for key, value in values.items():
        assert cache.put(key, value)
    for key, value in values.items():
        got = cache.get(key)
        assert got is not None and same(got, value)
    blobs = {k: encode(v, 3) for k, v in values.items()}
    assert cache.bytes == sum(len(b.data) + len(k) + ENTRY_OVERHEAD for k, b in blobs.items())
    raw = sum(v.nbytes for v in values.values())
    assert sum(len(b.data) for b in blobs.values()) < raw / 2  # charged on the compressed size, not the raw
    stats = cache.stats()
    assert stats["memory_entries"] == 3 and stats["memory_bytes"] == cache.bytes
    assert stats["memory_raw_bytes"] == raw
    assert stats["compression_ratio"] == pytest.approx(raw / sum(len(b.data) for b in blobs.values()))
    assert stats["hits"] == 3 and stats["misses"] == 0
    assert cache.get("absent") is None and cache.stats()["misses"] == 1


def test_an_uncompressed_cache_charges_raw_bytes_and_writes_zstd_to_disk(tmp_path: Path) -> None:
    values = {f"k{i}": shard(i) for i in range(3)}
    cache = ShardCache(1 << 20, policy="lru", compression="none", disk=DiskTier(tmp_path, 1 << 20))
    for key, value in values.items():
        assert cache.put(key, value)
    for key, value in values.items():
        got = cache.get(key)
        assert got is not None and same(got, value)
    raw = {k: v.tokens.nbytes + (v.num_docs) * 8 for k, v in values.items()}  # tokens + document lengths
    assert cache.bytes == sum(n + len(k) + ENTRY_OVERHEAD for k, n in raw.items())
    assert cache.stats()["compression_ratio"] == pytest.approx(1.0, abs=0.01)
    # the disk tier holds checksummed zstd frames, which a zstd cache reads as its own
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) < sum(raw.values()) / 2
    again = ShardCache(1 << 20, disk=DiskTier(tmp_path, 1 << 20))
    assert same(again.get("k1"), values["k1"]) and again.stats()["hits_disk"] == 1
    with pytest.raises(ValueError, match="cache.compression"):
        ShardCache(1 << 20, compression="lz4")


def test_budget_is_never_exceeded_and_oversized_entries_are_refused() -> None:
    one = len(encode(shard(0), 3).data) + 2 + ENTRY_OVERHEAD
    cache = ShardCache(3 * one + 10, policy="lru")
    for i in range(10):
        cache.put(f"k{i}", shard(0))  # same size every time
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 3 and cache.stats()["evictions"] == 7
    big = shard(1, docs=50, tokens=4000, text=False)
    assert not cache.put("big", big)
    assert cache.get("big") is None and len(cache) == 3
    off = ShardCache(0)
    assert not off.put("k", shard(0)) and off.get("k") is None and off.bytes == 0


# ---- LRU and TTL ------------------------------------------------------------------------------
def test_lru_evicts_the_least_recently_used() -> None:
    one = len(encode(shard(0), 3).data) + 2 + ENTRY_OVERHEAD
    cache = ShardCache(3 * one, policy="lru")
    for key in ("k0", "k1", "k2"):
        cache.put(key, shard(0))
    assert cache.get("k0") is not None  # k1 is now the oldest
    cache.put("k3", shard(0))
    assert [k for k in ("k0", "k1", "k2", "k3") if cache.get(k) is not None] == ["k0", "k2", "k3"]


def test_ttl_drops_idle_entries_and_use_keeps_them_alive() -> None:
    clock = Clock()
    cache = ShardCache(1 << 20, ttl_s=10, policy="lru", clock=clock)
    cache.put("old", shard(0))
    cache.put("used", shard(1))
    clock.now += 8
    assert cache.get("used") is not None
    clock.now += 8  # "old" idle for 16 s, "used" for 8 s
    assert cache.get("old") is None
    assert cache.get("used") is not None
    assert cache.stats()["expirations"] == 1
    clock.now += 11
    assert cache.expire() == 1 and len(cache) == 0 and cache.bytes == 0


# ---- the smart policy -------------------------------------------------------------------------
def test_next_use_counts_shards_after_the_current_one() -> None:
    n, seed = 7, 3
    order0, order1 = shard_order(seed, 0, n), shard_order(seed, 1, n)
    dist = next_use(seed, n, epoch=0, ordinal=2)
    for k in range(3, n):  # later in this epoch
        assert dist[order0[k]] == k - 2
    for k in range(3):  # already read (or being read): next epoch
        assert dist[order0[k]] == n - 2 + int(np.flatnonzero(order1 == order0[k])[0])


def test_smart_policy_evicts_the_furthest_next_use_and_declines_a_later_one() -> None:
    n, seed = 8, 11
    future = FutureIndex()
    future.update("s", "ds", seed, n, epoch=0, ordinal=0)
    order = shard_order(seed, 0, n)
    one = len(encode(shard(0), 3).data) + 3 + ENTRY_OVERHEAD  # keys "k%d"
    cache = ShardCache(3 * one, policy=SmartPolicy(future))
    for k in (1, 2, 3):  # the shards read 1st, 2nd and 3rd after the current one
        assert cache.put(f"k{k}", shard(0), slot=("ds", int(order[k])))
    # A newcomer needed sooner (4th? no: 4th is later than all three) is declined...
    assert not cache.put("k4", shard(0), slot=("ds", int(order[4])))
    assert cache.stats()["admissions_declined"] == 1
    # ...while one nobody will read is declined too, and the three stay.
    assert not cache.put("x", shard(0), slot=None)
    # The stream reaches shard order[1]: it is in use until the stream moves past it, so a
    # later newcomer is still declined (evicting k1 now would read it again from the source).
    future.update("s", "ds", seed, n, epoch=0, ordinal=1)
    assert not cache.put("k5", shard(0), slot=("ds", int(order[5])))
    # The stream moves on: k1's next use is next epoch.
    future.update("s", "ds", seed, n, epoch=0, ordinal=2)
    assert cache.put("k5", shard(0), slot=("ds", int(order[5])))
    assert [k for k in ("k1", "k2", "k3", "k5") if k in cache._entries] == ["k2", "k3", "k5"]
    # With no stream left, every entry is "never needed": plain LRU order.
    future.remove("s")
    assert cache.put("k6", shard(0), slot=("ds", int(order[6])))
    assert "k2" not in cache._entries and "k6" in cache._entries


def _scan(policy: str, n: int = 40, capacity: int = 20, epochs: int = 4) -> float:
    """Hit rate of epochs 1.. of a reshuffled cyclic scan of ``n`` shards, cache of ``capacity``."""
    future = FutureIndex()
    one = len(encode(shard(0), 3).data) + 8 + ENTRY_OVERHEAD
    cache = ShardCache(capacity * one, policy=policy, future=future)
    value = shard(0)
    hits = lookups = 0
    for epoch in range(epochs):
        for ordinal, index in enumerate(shard_order(5, epoch, n).tolist()):
            future.update("stream", "ds", 5, n, epoch, ordinal)
            key = f"key{index:04d}"
            hit = cache.get(key, ("ds", index)) is not None
            if not hit:
                cache.put(key, value, ("ds", index))
            if epoch:
                hits, lookups = hits + hit, lookups + 1
    return hits / lookups


def test_smart_policy_beats_lru_on_a_cyclic_scan_larger_than_the_cache() -> None:
    lru, smart = _scan("lru"), _scan("smart")
    assert smart >= 0.4, smart
    assert lru <= 0.2 and smart > 2 * lru, (lru, smart)


# ---- corruption -------------------------------------------------------------------------------
def test_corrupt_entry_is_detected_dropped_and_never_served() -> None:
    cache = ShardCache(1 << 20)
    cache.put("k", shard(0))
    entry = cache._entries["k"]
    data = bytearray(entry.blob.data)
    data[len(data) // 2] ^= 0xFF
    entry.blob = type(entry.blob)(bytes(data), entry.blob.dtype, entry.blob.num_tokens, entry.blob.num_docs)
    assert cache.get("k") is None
    stats = cache.stats()
    assert stats["corrupt"] == 1 and stats["memory_entries"] == 0 and stats["memory_bytes"] == 0
    assert stats["hits"] == 0 and stats["misses"] == 1


def test_truncated_blob_raises_rather_than_decoding() -> None:
    from server.supply.cache_disk import CorruptEntry

    blob = encode(shard(0), 3)
    with pytest.raises(CorruptEntry):
        decode(type(blob)(blob.data[:-7], blob.dtype, blob.num_tokens, blob.num_docs))
    with pytest.raises(CorruptEntry):
        decode(type(blob)(blob.data, blob.dtype, blob.num_tokens + 1, blob.num_docs))


# ---- the disk tier ----------------------------------------------------------------------------
def test_disk_tier_serves_what_memory_dropped_survives_restart_and_deletion(tmp_path: Path) -> None:
    values = {f"k{i}": shard(i) for i in range(4)}
    one = max(len(encode(v, 3).data) for v in values.values()) + 2 + ENTRY_OVERHEAD
    path = tmp_path / "disk"
    cache = ShardCache(one, policy="lru", disk=DiskTier(path, 1 << 20))  # memory holds one entry
    for key, value in values.items():
        cache.put(key, value)
    assert len(cache) == 1 and cache.stats()["disk_entries"] == 4
    got = cache.get("k0")
    assert got is not None and same(got, values["k0"])
    assert cache.stats()["hits_disk"] == 1
    # A new process finds the files (keys are content-addressed).
    again = ShardCache(1 << 20, disk=DiskTier(path, 1 << 20))
    assert again.stats()["disk_entries"] == 4 and same(again.get("k2"), values["k2"])
    # Deleting the directory is safe: misses, then it is re-created on the next write.
    shutil.rmtree(path)
    assert again.get("k3") is None
    again.put("k9", shard(9))
    assert (path).is_dir() and same(ShardCache(0, disk=DiskTier(path, 1 << 20)).get("k9"), shard(9))


def test_disk_tier_drops_a_damaged_file(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "disk", 1 << 20)
    cache = ShardCache(0, disk=disk)  # memory off: everything is on disk
    cache.put("k", shard(0))
    (file,) = (tmp_path / "disk").iterdir()
    data = bytearray(file.read_bytes())
    data[-20] ^= 0x55
    file.write_bytes(bytes(data))
    assert cache.get("k") is None
    assert not file.exists() and cache.stats()["corrupt"] == 1 and cache.stats()["disk_entries"] == 0


def test_disk_tier_keeps_its_own_budget(tmp_path: Path) -> None:
    size = len(encode(shard(0), 3).data) + 200  # + header
    disk = DiskTier(tmp_path / "d", 3 * size)
    cache = ShardCache(0, disk=disk)
    for i in range(6):
        cache.put(f"k{i}", shard(0))
    stats = cache.stats()
    assert stats["disk_bytes"] <= 3 * size and stats["disk_entries"] < 6 and stats["disk_evictions"] > 0
    assert len(list((tmp_path / "d").iterdir())) == stats["disk_entries"]


# ---- content-addressed keys -------------------------------------------------------------------
def _dataset(path: Path, name: str = "a", **source: object) -> Dataset:
    config = {"source": {"type": "jsonl", "paths": [str(path / "*.jsonl")], "shard_bytes": 1 << 30, **source}}
    return Dataset(name, DatasetConfig.model_validate(config))


def test_keys_are_shared_across_datasets_and_follow_content_only(tmp_path: Path) -> None:
    files = write_jsonl(tmp_path / "data", make_documents(30), files=3)
    a, b = _dataset(tmp_path / "data", "a"), _dataset(tmp_path / "data", "b")
    keys = [shard_key(a, i) for i in range(a.num_shards)]
    assert a.num_shards == 3 and len(set(keys)) == 3
    assert keys == [shard_key(b, i) for i in range(b.num_shards)]
    st = os.stat(files[1])
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: same content
    assert [shard_key(_dataset(tmp_path / "data"), i) for i in range(3)] == keys
    files[1].write_text(files[1].read_text().replace("a", "b"))  # rewritten: only its shard's key moves
    after = [shard_key(_dataset(tmp_path / "data"), i) for i in range(3)]
    assert after[0] == keys[0] and after[2] == keys[2] and after[1] != keys[1]
    other_field = _dataset(tmp_path / "data", "c", text_field="meta")
    assert shard_key(other_field, 0) != shard_key(a, 0)
    shutil.copytree(tmp_path / "data", tmp_path / "copy")  # a copy elsewhere, with new mtimes
    assert [shard_key(_dataset(tmp_path / "copy"), i) for i in range(3)] == after


async def test_a_file_changed_under_a_running_server_is_refused_never_mixed(tmp_path: Path) -> None:
    files = write_jsonl(tmp_path / "data", make_documents(20), files=2)
    ds = _dataset(tmp_path / "data")
    with ThreadPoolExecutor(2) as pool:
        store = ShardStore(ShardCache(1 << 20), pool)
        before = await store.tokenized(ds, 0)
        lines = files[0].read_text().splitlines(keepends=True)
        files[0].write_text("".join(lines[::-1]))  # same size, new content
        assert same(await store.tokenized(ds, 0), before)  # cached: the start-up version, whole
        store.cache.clear()
        with pytest.raises(FailedPrecondition, match=r"'a': .*\.jsonl was rewritten .* since the server started"):
            await store.tokenized(ds, 0)
        files[0].write_text("".join(lines))
        os.utime(files[0], ns=(1, 1))  # restored with another mtime: the same content serves again
        assert same(await store.tokenized(ds, 0), before)
        files[1].write_text(files[1].read_text() + "\n")
        with pytest.raises(FailedPrecondition, match="changed size"):
            await store.tokenized(ds, 1)


# ---- concurrency ------------------------------------------------------------------------------
def test_many_threads_keep_the_accounting_exact() -> None:
    values = [shard(i, docs=2, tokens=200) for i in range(12)]
    cache = ShardCache(6 * 400, policy="lru")
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                i = rng.randrange(len(values))
                got = cache.get(f"k{i}")
                if got is None:
                    cache.put(f"k{i}", values[i])
                else:
                    assert same(got, values[i])
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.bytes == sum(e.size for e in cache._entries.values()) <= cache.max_bytes


async def test_many_asyncio_tasks_share_loads_and_get_the_right_tokens(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data", make_documents(60), files=6)
    ds = _dataset(tmp_path / "data")
    expected = [ds.tokenize_shard(i) for i in range(ds.num_shards)]
    calls: list[int] = []
    original = ds.tokenize_shard

    def counting(index: int) -> TokenizedShard:
        calls.append(index)
        return original(index)

    ds.tokenize_shard = counting  # type: ignore[method-assign]
    one = max(len(encode(e, 3).data) for e in expected) + 32 + ENTRY_OVERHEAD
    with ThreadPoolExecutor(3) as pool:
        store = ShardStore(ShardCache(3 * one), pool)  # half the shards fit: evictions happen
        rng = random.Random(0)
        wanted = [rng.randrange(ds.num_shards) for _ in range(200)]
        results = await asyncio.gather(*(store.tokenized(ds, i) for i in wanted))
    assert all(same(r, expected[i]) for r, i in zip(results, wanted))
    # Concurrent requests for a shard share one load: at most one per distinct shard here.
    assert sorted(calls) == sorted(set(wanted))
    stats = store.stats()
    assert stats["memory_bytes"] <= 3 * one and stats["inflight_loads"] == 0


async def test_store_remakes_a_corrupt_entry(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data", make_documents(20), files=2)
    ds = _dataset(tmp_path / "data")
    with ThreadPoolExecutor(2) as pool:
        store = ShardStore(ShardCache(1 << 20), pool)
        first = await store.tokenized(ds, 1)
        entry = store.cache._entries[shard_key(ds, 1)]
        entry.blob = type(entry.blob)(entry.blob.data[:-4] + b"oops", entry.blob.dtype, entry.blob.num_tokens,
                                      entry.blob.num_docs)
        again = await store.tokenized(ds, 1)
        assert same(first, again)
        stats = store.stats()
        assert stats["corrupt"] == 1 and stats["memory_entries"] == 1
        assert same(await store.tokenized(ds, 1), first) and store.stats()["hits"] == 1


def test_policies_are_pluggable() -> None:
    cache = ShardCache(1 << 20, policy=LRUPolicy())
    assert cache.policy.name == "lru"
    with pytest.raises(ValueError, match="cache.policy"):
        ShardCache(1 << 20, policy="fifo")


def test_smart_victim_choice_matches_a_full_sort() -> None:
    from server.supply.cache_policy import _furthest

    rng = np.random.default_rng(0)
    for _ in range(300):  # shortcuts taken for speed must not change the choice
        n = int(rng.integers(1, 300))
        dist = rng.integers(0, 20, n).astype(float)
        dist[rng.random(n) < 0.3] = np.inf
        used, size, need = rng.permutation(n).astype(np.int64), rng.integers(1, 10, n), int(rng.integers(1, 80))
        full = np.lexsort((used, -dist))
        want = full[: int(np.searchsorted(np.cumsum(size[full]), need)) + 1]
        assert _furthest(dist, used, size, need).tolist() == want.tolist()


def test_config_takes_sizes_with_suffixes_and_names_bad_fields() -> None:
    from server.config import parse_config
    from server.errors import ConfigError

    base = {"datasets": {"d": {"source": {"type": "text", "paths": ["/nonexistent/*.txt"]}}}}
    config = parse_config({**base, "cache": {"max_bytes": "2GiB", "ttl_s": 60, "policy": "lru",
                                             "disk": {"path": "/tmp/x", "max_bytes": "50GiB"}},
                           "prefetch": {"depth": 2}})
    assert int(config.cache.max_bytes) == 2 << 30 and int(config.cache.disk.max_bytes) == 50 << 30
    assert config.prefetch.depth == 2 and config.cache.policy == "lru"
    assert int(parse_config({**base, "cache": {"max_bytes": 1234}}).cache.max_bytes) == 1234
    for bad, field in (({"cache": {"policy": "fifo"}}, "cache.policy"), ({"prefetch": {"depth": -1}}, "prefetch.depth"),
                       ({"cache": {"max_bytes": "lots"}}, "cache.max_bytes")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            parse_config({**base, **bad})
