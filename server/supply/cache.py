"""The shard cache: zstd-compressed tokenized shards under a byte budget, content-addressed,
evicted by a pluggable policy (LRU, or "smart" from the known future order), with an idle TTL
and an optional disk tier. Plain synchronous, thread-safe code: callers run it off the event loop."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.supply.cache_disk import Blob, CorruptEntry, DiskTier, SecondTier, decode, encode
from server.supply.cache_policy import FutureIndex, Policy, Slot, make_policy
from server.stages.packing import TokenizedShard
from tokenfeed import malloc

if TYPE_CHECKING:
    from server.stages.dataset import Dataset

__all__ = ["ShardCache", "DiskTier", "FutureIndex", "shard_key", "ENTRY_OVERHEAD"]

#: Bytes charged per entry on top of its compressed size (the entry object, its key, the index).
ENTRY_OVERHEAD = 2048  # measured: ~0.5 KiB of Python objects, ~2 KiB of allocator slack
_KEY_VERSION = "tokenfeed-shard-v2"

#: Every shard's key, per dataset (computed once: content identities are fixed at start-up).
_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shard_key(ds: Dataset, index: int) -> str:
    """The content address of one tokenized shard: its content identity (files' relative paths,
    ranges, sizes and digests; for prepared data the manifest's checksum), the source settings
    that shape documents, and the tokenizer's identity. Changing one file changes only its
    shard's key; two datasets (or jobs, or replicas with their own copies of a corpus sharing a
    disk tier) on the same content and tokenizer share entries. Packing is not part of it:
    entries hold tokenized documents, which packing (seed, epoch, seq_len) only reorders and cuts."""
    keys = _KEYS.get(ds)
    if keys is None:
        base = hashlib.sha256(_KEY_VERSION.encode())
        base.update(ds.document_settings().encode())
        base.update(f"|{ds.info.identity}|{ds.dtype.str}|".encode())
        keys = []
        for i in range(ds.num_shards):
            h = base.copy()
            h.update(json.dumps(ds.shard_content(i)).encode())
            keys.append(h.hexdigest()[:32])
        _KEYS[ds] = keys
    return keys[index]


def fixed_mmap_threshold(threshold: int = 1 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own mmap, returned
    to the system when freed. By default glibc raises that threshold after the first large free,
    so shard-sized temporaries (raw text, token arrays, decompressed shards) land in the heap
    between long-lived cache entries, which then pin it: resident memory grew by several times
    the cached bytes. 1 MiB, not lower: messages (about 256 KiB by default, at most a few MiB) are
    built and freed hundreds of times a second, and a fresh mmap costs page faults each time; at
    128 KiB the server's warm throughput was a third lower (issue 9). For the same reason up to
    ``trim_threshold`` of free heap stays mapped (fixing one threshold fixes the other at its
    128 KiB default, and every message freed at the top of the heap was handed back). See
    ``tokenfeed.malloc`` (``TOKENFEED_MALLOC=0`` opts out). Returns whether set."""
    return malloc.tune(threshold, trim_threshold)


@dataclass(eq=False, slots=True)
class _Entry:
    blob: Blob
    size: int              # charged bytes: compressed + key + ENTRY_OVERHEAD
    slot: Slot | None      # where the entry sits in a dataset's order (for the smart policy)
    used: float            # last access, for the idle TTL
    prefetched: bool       # loaded by the prefetcher and not yet asked for


class ShardCache:
    """Compressed tokenized shards under a byte budget; ``max_bytes == 0`` keeps none in memory.

    Args:
        max_bytes: memory budget: compressed sizes plus ``ENTRY_OVERHEAD`` and the key per entry.
        ttl_s: an entry not used for this long is dropped.
        zstd_level: compression level of new entries.
        compression: ``"zstd"``, or ``"none"`` to keep shards uncompressed in memory (about 2.3x
            the bytes for tokens, no decompression when a shard is read again; the disk tier
            stores zstd frames either way), or ``"auto"``: uncompressed while a shard fits in the
            budget beside what is cached, compressed once memory is short (a corpus larger than
            the budget ends up compressed as its shards are read again, keeping more of it).
        policy: ``"smart"`` (uses ``future``), ``"lru"``, or any ``Policy``.
        disk: optional second tier; every admitted shard is also written there.
        future: the streams' positions; a fresh index when omitted.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, max_bytes: int, *, ttl_s: float = 3600.0, zstd_level: int = 3, compression: str = "zstd",
                 policy: str | Policy = "smart", disk: SecondTier | None = None, future: FutureIndex | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 0 or ttl_s <= 0:
            raise ValueError(f"cache.max_bytes must be >= 0 and cache.ttl_s > 0, got {max_bytes} and {ttl_s}")
        if compression not in ("auto", "zstd", "none"):
            raise ValueError(f"cache.compression must be 'auto', 'zstd' or 'none', got {compression!r}")
        self.max_bytes, self.ttl_s, self.zstd_level = max_bytes, ttl_s, zstd_level
        self._memory_level = zstd_level if compression == "zstd" else 0
        self._auto = compression == "auto"
        self.future = future if future is not None else FutureIndex()
        self.policy = make_policy(policy, self.future) if isinstance(policy, str) else policy
        self.disk = disk
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = self._raw = self._prefetched_bytes = 0
        self._n = dict.fromkeys(("hits", "misses", "hits_memory", "hits_disk", "evictions", "expirations",
                                 "admissions_declined", "corrupt", "prefetch_hits", "prefetch_wasted",
                                 "raw_bytes_compressed", "compressed_bytes"), 0)

    # ---- reads -------------------------------------------------------------------------
    def get(self, key: str, slot: Slot | None = None, *, memory_only: bool = False) -> TokenizedShard | None:
        """The shard stored under ``key``, decompressed and checked, or ``None``; a damaged entry
        is dropped and counted, never returned. With ``memory_only``, never a read of the disk
        tier, and a miss is not counted (the caller asks again where it may read)."""
        with self._lock:
            entry = self._lookup(key, slot)
            prefetched = entry is not None and self._unflag(entry)
        if entry is not None:
            try:
                shard = decode(entry.blob)
            except CorruptEntry:
                self._drop_corrupt(key, entry)
            else:
                self._count(hits=1, hits_memory=1, prefetch_hits=int(prefetched))
                return shard
        if memory_only:
            return None
        if self.disk is not None:
            blob = self.disk.get(key)
            if blob is not None:
                try:
                    shard = decode(blob)
                except CorruptEntry:
                    self.disk.remove(key, corrupt=True)
                    self._count(corrupt=1)
                else:
                    self._admit(key, blob, slot, prefetched=False)
                    self._count(hits=1, hits_disk=1)
                    return shard
        self._count(misses=1)
        return None

    def contains(self, key: str, slot: Slot | None = None, *, memory_only: bool = False) -> bool:
        """Whether ``key`` is in memory, after promoting it from disk if it is there (never with
        ``memory_only``: no read); counts no hit or miss (the prefetcher's question). A promoted
        entry is marked as prefetched."""
        with self._lock:
            if self._lookup(key, slot) is not None:
                return True
        if memory_only:
            return False
        blob = self.disk.get(key) if self.disk is not None else None
        return blob is not None and self._admit(key, blob, slot, prefetched=True)

    def claim(self, key: str) -> None:
        """A request was served by a prefetched entry that it caught while loading."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._unflag(entry):
                self._n["prefetch_hits"] += 1

    # ---- writes ------------------------------------------------------------------------
    def put(self, key: str, shard: TokenizedShard, slot: Slot | None = None, *, prefetched: bool = False) -> bool:
        """Compress and store a shard; returns whether memory admitted it (the disk tier, when
        there is one, takes it either way). Skips compressing when no tier would keep it."""
        level = self._level(key, shard)
        estimate = ENTRY_OVERHEAD + len(key) + shard.nbytes * (self._ratio_inverse() if level else 1.0)
        wanted = self.max_bytes > 0 and self._would_admit(slot, estimate)
        if not wanted and self.disk is None:
            if self.max_bytes > 0:
                self._count(admissions_declined=1)
            return False
        blob = encode(shard, level)
        self._count(raw_bytes_compressed=blob.raw_bytes, compressed_bytes=len(blob.data))
        if self.disk is not None:
            self.disk.put(key, blob if blob.compressed else encode(shard, self.zstd_level))
        if not wanted:
            self._count(admissions_declined=int(self.max_bytes > 0))
            return False
        return self._admit(key, blob, slot, prefetched)

    def expire(self) -> int:
        """Drop every entry idle for longer than ``ttl_s``; returns how many went."""
        with self._lock:
            return self._sweep()

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._remove(key)

    # ---- numbers -----------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        """Charged bytes in memory."""
        return self._bytes

    @property
    def prefetched_bytes(self) -> int:
        """Charged bytes of entries the prefetcher loaded that no request has used yet."""
        return self._prefetched_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, Any]:
        """Counters and gauges as a plain dict of numbers (exported to Prometheus by the metrics
        module), plus ``tiers``: ``{"memory"|"disk": {"bytes", "entries"}}``."""
        with self._lock:
            out: dict[str, Any] = dict(self._n)
            out.update(memory_bytes=self._bytes, memory_entries=len(self._entries),
                       memory_max_bytes=self.max_bytes, memory_raw_bytes=self._raw,
                       prefetched_bytes=self._prefetched_bytes, streams_known=len(self.future))
        lookups = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / lookups if lookups else 0.0
        out["compression_ratio"] = (out["raw_bytes_compressed"] / out["compressed_bytes"]
                                    if out["compressed_bytes"] else 0.0)
        out.update(self.disk.stats() if self.disk is not None else
                   {"disk_bytes": 0, "disk_entries": 0, "disk_max_bytes": 0})
        out["max_bytes"] = self.max_bytes
        out["tiers"] = {tier: {"bytes": out[f"{tier}_bytes"], "entries": out[f"{tier}_entries"]}
                        for tier in ("memory", "disk") if f"{tier}_bytes" in out}  # (a shared tier counts no bytes)
        return out

    # ---- internals (the ones named without "locked" take the lock themselves) -----------
    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._n[name] += delta

    def _level(self, key: str, shard: TokenizedShard) -> int:
        """The zstd level to keep ``shard`` at in memory (0: as it is). ``auto``: as it is while it
        fits beside what is cached without evicting anything; zstd decompression was a quarter
        of a warm server's CPU, and an uncompressed cache gave 1.5x the tokens/s (issue 9)."""
        if not self._auto:
            return self._memory_level
        fits = self._bytes + ENTRY_OVERHEAD + len(key) + shard.nbytes <= self.max_bytes
        return 0 if fits else self.zstd_level

    def _ratio_inverse(self) -> float:
        """Compressed / raw so far (1/3 before any data), to guess a new entry's size."""
        raw, comp = self._n["raw_bytes_compressed"], self._n["compressed_bytes"]
        return comp / raw if raw else 1 / 3

    def _lookup(self, key: str, slot: Slot | None) -> _Entry | None:
        """Assumes the lock. The live entry under ``key``, refreshed; an expired one is dropped."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now - entry.used > self.ttl_s:
            self._remove(key)
            self._n["expirations"] += 1
            return None
        entry.used = now
        self._entries.move_to_end(key)
        if slot is not None and slot != entry.slot:  # another dataset with the same files
            self.policy.on_remove(key)
            entry.slot = slot
            self.policy.on_insert(key, entry)
        else:
            self.policy.on_access(key)
        return entry

    def _unflag(self, entry: _Entry) -> bool:
        """Assumes the lock. Marks a prefetched entry as used; returns whether it was prefetched."""
        if not entry.prefetched:
            return False
        entry.prefetched = False
        self._prefetched_bytes -= entry.size
        return True

    def _would_admit(self, slot: Slot | None, size: float) -> bool:
        with self._lock:
            self._sweep()
            need = self._bytes + size - self.max_bytes
            return size <= self.max_bytes and (
                need <= 0 or self.policy.victims(self._entries, int(need), slot) is not None)

    def _admit(self, key: str, blob: Blob, slot: Slot | None, prefetched: bool) -> bool:
        size = len(blob.data) + len(key) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        with self._lock:
            self._sweep()
            if key in self._entries:
                self._remove(key)
            need = self._bytes + size - self.max_bytes
            victims = self.policy.victims(self._entries, need, slot) if need > 0 else []
            if victims is None:
                self._n["admissions_declined"] += 1
                return False
            for victim in victims:
                self._n["prefetch_wasted"] += int(self._remove(victim).prefetched)
                self._n["evictions"] += 1
            entry = self._entries[key] = _Entry(blob, size, slot, self._clock(), prefetched)
            self.policy.on_insert(key, entry)
            self._bytes += size
            self._raw += blob.raw_bytes
            self._prefetched_bytes += size if prefetched else 0
            assert self._bytes <= self.max_bytes, (self._bytes, self.max_bytes)
            return True

    def _remove(self, key: str) -> _Entry:
        """Assumes the lock."""
        entry = self._entries.pop(key)
        self.policy.on_remove(key)
        self._bytes -= entry.size
        self._raw -= entry.blob.raw_bytes
        self._prefetched_bytes -= entry.size if entry.prefetched else 0
        return entry

    def _sweep(self) -> int:
        """Assumes the lock. Entries are in last-use order, so the idle ones are at the front."""
        now, gone = self._clock(), 0
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.used <= self.ttl_s:
                break
            self._remove(key)
            gone += 1
        self._n["expirations"] += gone
        return gone

    def _drop_corrupt(self, key: str, entry: _Entry) -> None:
        with self._lock:
            if self._entries.get(key) is entry:
                self._remove(key)
            self._n["corrupt"] += 1
