"""Async access to shards: cache lookups, single-flight loads off the event loop, packing, and
the prefetcher that keeps every stream's next shards loading ahead."""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import CancelledError, Executor, Future
from typing import Any, NamedTuple


from server.stages.files import is_url
from server.supply.cache import DiskTier, ShardCache, fixed_mmap_threshold, shard_key
from server.supply.cache_disk import SecondTier
from server.supply.cache_object import ObjectTier
from server.config import Config, PrefetchSettings
from server.stages.dataset import Dataset
from server.stages.packing import PackedShard, TokenizedShard, known_rows, pack
from server.supply.prefetch import Follower, Prefetcher
from server.stages.order import cached_shard_order, doc_order, epoch_rows


log = logging.getLogger(__name__)


#: Pack-aheads running at once, at most (each is a cache lookup and a packing in the executor).
MAX_PACK_AHEAD = 16
#: Shards packed on the event loop, not in the executor, when their tokens are in the cache's
#: memory: at most this many tokens and documents, by packing (see ``ShardStore._pack_here``).
PACK_HERE = {"concat": (1 << 19, 512), "pad": (1 << 19, 128)}
#: Pack-aheads packed on the loop in one turn of it, at most, and only once no stream has begun
#: for ``PACK_HERE_QUIET_S``, none waits for its first message (``ShardStore.job_starting``) and
#: the executor is not backlogged (``PACK_HERE_BACKLOG``). A job's start asks for the shards of
#: hundreds of steps ahead at once, more than the executor ever packs then (``MAX_PACK_AHEAD`` at a
#: time, the rest refused and asked for again later): packed here, every one of them, a 64-rank
#: job's warm start on 4 replicas took 0.9-1.1 s for every rank's first batch instead of 0.6-0.7.
#: The same job, running, packs one shard in most turns that pack any, and bursts of 9 to 17 as its
#: leading rank's message crosses that many steps: a budget of 2 sent most of them to the executor
#: again (75 against 115 M tokens/s), 32 keeps them here (about 10 ms of packing at most). Past the
#: budget a running job's pack-aheads are refused, and asked for again in a later turn.
PACK_HERE_AHEAD_PER_TURN = 32
#: (A job's streams open within a few hundred milliseconds of one another; at 1 s the first second
#: of a 64-rank job's run still packed ahead in the executor: 74-98 against 90-132 M tokens/s.)
PACK_HERE_QUIET_S = 0.5
#: Pack-aheads in flight in the executor at which it counts as backlogged (a job's start fills it
#: to ``MAX_PACK_AHEAD``): until they drain below this, a running job's pack-aheads wait (refused,
#: asked again later) rather than join them there. Sending them after the executor's work (at one
#: in flight, then at four) sustained itself: one packing in a thread sent the next there too, and
#: once a job's packing went to the executor it stayed there for good, the loop running 0.64-0.70
#: of its second against 0.92-0.98, asleep on the GIL the packing threads held (64 ranks, 2 cores,
#: a third of the jobs; more with larger messages, whose bursts of pack-aheads pass the turn's budget).
PACK_HERE_BACKLOG = 4


class PackedKey(NamedTuple):
    """The hot tier's key of a packed shard: one shard of a dataset, packed for one epoch's
    document order at one seq_len and packing. (A named tuple: hashed in C, on the hot path.)"""

    fingerprint: str  # the dataset's
    shard: int        # the shard's index (not its place in the epoch's order)
    seed: int
    epoch: int
    seq_len: int
    packing: str


class FromTokens(NamedTuple):
    """The single-flight key of packing a shard from tokens in hand (never None, unlike a packing
    under its ``PackedKey``, which may read only the cache)."""

    packed: PackedKey


class TokensKey(NamedTuple):
    """The single-flight key of a shard's tokens (read or looked up in the cache)."""

    fingerprint: str
    shard: int


class Lookup(enum.Enum):
    """What a blocking load of a shard's tokens may do (``ShardStore._load``)."""

    GET = "get"            # from the cache, else read and tokenize it (and cache it)
    PREFETCH = "prefetch"  # make sure it is cached; never decompress a cached one
    CACHED = "cached"      # from the cache only: never read the source (pack-ahead leaves that to the prefetcher)


class _Flight:
    """One run in the executor and whoever waits for it: each waiter has its own future, so one
    that is cancelled leaves the run and the others alone."""

    __slots__ = ("then", "waiters")

    def __init__(self, then: Callable[[Any], None] | None) -> None:
        self.then = then  # called on the loop with the result before any waiter wakes
        self.waiters: list[asyncio.Future] = []


class _Loaded(NamedTuple):
    key: str                       # the shard's content key
    shard: TokenizedShard | None   # None: a prefetch found it already cached
    prefetched: bool               # a prefetch loaded it and the cache admitted it


class ShardStore:
    """Loads each shard once however many streams want it, and keeps recent ones warm.

    Tiers, fastest first: packed shards (uncompressed, per seed/epoch/seq_len; the ranks of a job
    spread over several, and a rank that falls behind the tier re-packs what it reads), the
    compressed ``ShardCache`` (memory, then disk), then the source. Every blocking step (stat,
    decompress, read, tokenize, compress) runs in ``executor``.
    """

    def __init__(self, cache: ShardCache, executor: Executor, packed_slots: int = 4096, *,
                 packed_bytes: int = 512 << 20, prefetch: PrefetchSettings | None = None) -> None:
        self.cache = cache
        self.executor = executor
        self._inflight: dict[Hashable, _Flight] = {}  # runs in the executor, by key
        self._reads, self._reads_lock = 0, threading.Lock()  # shards being read from their source now
        self.source_reads = 0  # shards read from their source (and tokenized) so far: what the cache saves
        self.prefetch_late = 0  # prefetches dropped in the executor: every stream had reached the shard
        self._packed: OrderedDict[PackedKey, PackedShard] = OrderedDict()
        # the hot tier's keys by (dataset, seed) and epoch: an epoch left behind is dropped without a
        # look at every other entry
        self._packed_epochs: dict[tuple[str, int], dict[int, set[PackedKey]]] = {}
        self.hot_slots, self.hot_max_bytes, self._packed_bytes = packed_slots, packed_bytes, 0
        self._epoch_rows: OrderedDict[Hashable, tuple[int, list[int] | None]] = OrderedDict()
        self.packs = self.hot_evictions = 0  # shards packed (hot-tier misses), and packed shards dropped
        self.hot_oversized = 0  # packed shards larger than the whole tier: served, not kept
        self._ahead: set[Hashable] = set()  # packed keys of the pack-aheads in flight
        self._here_this_turn = 0  # pack-aheads packed on the loop in its current turn
        self._stream_began = -PACK_HERE_QUIET_S  # when a stream last began (``follow``), monotonic
        # Whether a job is starting here: streams still wait for their first message (the service
        # that serves from this store sets it; see ``pack_ahead``).
        self.job_starting: Callable[[], bool] = lambda: False
        self._live_epochs: dict[tuple[str, int], Counter[int]] = {}  # streams per epoch, by (dataset, seed)
        prefetch = prefetch or PrefetchSettings(depth=0)
        # Prefetched shards live in the cache: with no cache there is nowhere to put them.
        self.prefetcher = (
            Prefetcher(self._warm, depth=prefetch.depth, concurrency=prefetch.concurrency,
                       room=lambda: cache.prefetched_bytes < prefetch.max_share * cache.max_bytes)
            if prefetch.depth > 0 and cache.max_bytes > 0 else None)

    @staticmethod
    def shard_index(ds: Dataset, seed: int, epoch: int, ordinal: int) -> int:
        """The shard at position ``ordinal`` of epoch ``epoch``'s order."""
        return int(cached_shard_order(seed, epoch, ds.num_shards)[ordinal])

    def follow(self, ds: Dataset, seed: int) -> Follower:
        """A handle through which a stream reports its position (``at(epoch, ordinal)``) so that
        the cache knows its future and the prefetcher loads ahead; ``close()`` it when done."""
        self._stream_began = time.monotonic()
        return Follower(ds, seed, self.cache.future, self.prefetcher, self.shard_index, self._epoch_moved)

    def _epoch_moved(self, ds: Dataset, seed: int, old: int | None, new: int | None) -> None:
        """A stream of (dataset, seed) moved from epoch ``old`` to ``new`` (None: it began, or
        ended). An epoch that every stream of the job has left behind is never read again (a
        stream that resumes there re-packs): its packed shards leave the hot tier at once instead
        of filling its budget."""
        job = (ds.fingerprint, seed)
        live = self._live_epochs.setdefault(job, Counter())
        if new is not None:
            live[new] += 1
        if old is not None:
            live[old] -= 1
            if live[old] <= 0:
                del live[old]
        if not live:  # the job's last stream ended: its shards age out as usual
            del self._live_epochs[job]
        elif old is not None and old < min(live):
            # (an index, not a scan of the tier: a job's streams leave an epoch hundreds of times as
            # its ranks start, and a scan of 4,096 entries each time took a 1,024-rank job's
            # replicas a sixth of their loop)
            below, epochs = min(live), self._packed_epochs.get(job, {})
            for epoch in [e for e in epochs if e < below]:
                for key in epochs.pop(epoch):
                    self._packed_bytes -= self._packed.pop(key).nbytes
                    self.hot_evictions += 1
            if not epochs:
                self._packed_epochs.pop(job, None)

    def _start(self, key: Hashable, fn: Callable[[], Any], then: Callable[[Any], None] | None = None) -> _Flight:
        """The run of ``fn`` in the executor for ``key``, started unless one is under way.

        Landing costs one turn of the event loop: the thread hands the result straight to the loop,
        which calls ``then`` and wakes the waiters. (An asyncio task per run, awaited through a
        shield, took five turns; with 64 streams a turn of this loop is tens of milliseconds.)"""
        flight = self._inflight.get(key)
        if flight is None:
            loop = asyncio.get_running_loop()
            flight = self._inflight[key] = _Flight(then)

            def landed(done: Future) -> None:  # in the executor's thread
                try:
                    loop.call_soon_threadsafe(self._land, key, flight, done)
                except RuntimeError:  # the loop has closed: nobody is waiting any more
                    pass

            self.executor.submit(fn).add_done_callback(landed)
        return flight

    def _land(self, key: Hashable, flight: _Flight, done: Future) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        self._ahead.discard(key)  # a pack-ahead's slot frees however its run ended
        try:
            result = done.result()
            if flight.then is not None:
                flight.then(result)
        except BaseException as err:  # noqa: BLE001 - handed to every waiter, raised where awaited
            for waiter in flight.waiters:
                if not waiter.done():
                    if isinstance(err, (CancelledError, asyncio.CancelledError)):  # the executor shut down
                        waiter.cancel()
                    else:
                        waiter.set_exception(err)
            return
        for waiter in flight.waiters:
            if not waiter.done():
                waiter.set_result(result)

    async def _once(self, key: Hashable, fn: Callable[[], Any], then: Callable[[Any], None] | None = None) -> Any:
        """Run ``fn`` in the executor, sharing one run among concurrent callers. A caller that is
        cancelled does not cancel the load that others wait for."""
        waiter = asyncio.get_running_loop().create_future()
        self._start(key, fn, then).waiters.append(waiter)
        return await waiter

    def _load(self, ds: Dataset, index: int, mode: Lookup) -> _Loaded:
        """Blocking: a shard's tokens, as far as ``mode`` allows (see ``Lookup``)."""
        key, slot = shard_key(ds, index), (ds.fingerprint, index)
        prefetch = mode is Lookup.PREFETCH
        if prefetch:
            if self.cache.contains(key, slot):
                return _Loaded(key, None, False)
            if not self._still_ahead(slot):
                return _Loaded(key, None, False)
        elif mode is Lookup.CACHED and not self.cache.contains(key, slot):
            return _Loaded(key, None, False)
        elif (hit := self.cache.get(key, slot)) is not None:
            return _Loaded(key, hit, False)
        if mode is Lookup.CACHED:
            return _Loaded(key, None, False)
        with self._reads_lock:
            self._reads += 1
            self.source_reads += 1
        try:
            shard = ds.tokenize_shard(index)
        finally:
            with self._reads_lock:
                self._reads -= 1
        admitted = self.cache.put(key, shard, slot, prefetched=prefetch)
        return _Loaded(key, shard, prefetch and admitted)

    def _still_ahead(self, slot: tuple[str, int]) -> bool:
        """Whether a prefetch is still ahead of a stream. One that waited in the executor until
        its stream reached the shard would read it a second time: the stream's own load read it
        already, and the policy may have left it out (its next use is next epoch; issue 23)."""
        depth = self.prefetcher.depth if self.prefetcher is not None else 0
        if self.cache.future.distance(slot) <= depth:
            return True
        with self._reads_lock:
            self.prefetch_late += 1
        return False

    async def _warm(self, ds: Dataset, index: int) -> None:
        """The prefetcher's load: shares the single flight of requests for the same shard. A shard
        in the cache's memory needs none (and no hop to a thread and back: at 64 ranks of small
        shards, a few hundred a second, each a hand-over of the GIL that the loop waited for)."""
        if self.cache.contains(shard_key(ds, index), (ds.fingerprint, index), memory_only=True):
            return
        await self._once(TokensKey(ds.fingerprint, index), functools.partial(self._load, ds, index, Lookup.PREFETCH))

    async def tokenized(self, ds: Dataset, index: int, only_cached: bool = False) -> TokenizedShard | None:
        """A shard's tokens; with ``only_cached``, None unless the cache holds it."""
        flight = TokensKey(ds.fingerprint, index)
        while True:
            loaded = await self._once(flight, functools.partial(self._load, ds, index,
                                                                Lookup.CACHED if only_cached else Lookup.GET))
            if loaded.shard is not None:  # else we joined a prefetch that found it cached: look it up
                break
            if only_cached:
                return None
        if loaded.prefetched:
            self.cache.claim(loaded.key)
        return loaded.shard

    async def num_rows(self, ds: Dataset, seed: int, epoch: int, ordinal: int, seq_len: int,
                       packing: str = "concat") -> int:
        """Rows of a shard in an epoch; needs only its counts once they are known (except bfd)."""
        rows = self.rows_now(ds, seed, epoch, ordinal, seq_len, packing)
        if rows is not None:
            return rows
        return (await self.packed(ds, seed, epoch, ordinal, seq_len, packing)).rows

    async def packed(self, ds: Dataset, seed: int, epoch: int, ordinal: int, seq_len: int,
                     packing: str = "concat") -> PackedShard:
        """A shard's rows for one epoch (documents shuffled by seed and epoch)."""
        packed = await self._packed_shard(ds, seed, epoch, ordinal, seq_len, packing, only_cached=False)
        assert packed is not None
        return packed

    async def _packed_shard(self, ds: Dataset, seed: int, epoch: int, ordinal: int, seq_len: int,
                            packing: str, only_cached: bool) -> PackedShard | None:
        """``packed``; with ``only_cached``, None unless the shard's tokens are cached."""
        key = self.packed_key(ds, seed, epoch, ordinal, seq_len, packing)
        index = key.shard
        hit = self._packed.get(key)
        if hit is not None:
            self._packed.move_to_end(key)
            return hit
        if (here := self._pack_here(ds, key)) is not None:
            return here

        # A cached shard is looked up and packed in one run: every hop between the loop and a
        # thread waits for a turn of a loop that may be serving many streams, and the pack-aheads
        # of a many-rank job must keep ahead of all its ranks.
        keep = functools.partial(self._keep_packed, key)
        packed = await self._once(key, self._packer(ds, seed, epoch, index, seq_len, packing, None), keep)
        if packed is None:  # not cached: read the tokens (or join the prefetcher's read), then pack
            tok = await self.tokenized(ds, index, only_cached)
            if tok is None:
                return None
            # A flight of its own: under ``key`` it could join a pack-ahead that reads only the
            # cache, which does not hold the shard when the policy declined it (None, not rows).
            packed = await self._once(FromTokens(key), self._packer(ds, seed, epoch, index, seq_len, packing, tok),
                                      keep)
        return packed

    def _packer(self, ds: Dataset, seed: int, epoch: int, index: int, seq_len: int, packing: str,
                tok: TokenizedShard | None) -> Callable[[], PackedShard | None]:
        """Blocking: pack shard ``index`` for an epoch, from ``tok`` or else from the cache (None
        when the cache does not hold it)."""

        def build() -> PackedShard | None:
            shard = tok if tok is not None else self._load(ds, index, Lookup.CACHED).shard
            if shard is None:
                return None
            return pack(packing, shard, doc_order(seed, epoch, index, shard.num_docs), seq_len, ds.info.pad_id)

        return build

    def _pack_here(self, ds: Dataset, key: PackedKey) -> PackedShard | None:
        """Pack a small shard right here on the event loop, and keep it in the hot tier, if its
        tokens are in the cache's memory (never a disk or object tier's read on the loop) and
        ``PACK_HERE`` bounds its size; else None (the executor packs it).

        A small shard's packing is a few hundred microseconds of work that holds the GIL (the
        copies in ``gather``, numpy's calls on arrays of a few hundred documents), so a thread
        runs it no sooner than the loop would, and the loop pays for the hand-overs: every
        time it released the GIL (a ring's or FIFO's write, the selector) a packing thread took
        it, and the loop slept until it came back. A 64-rank job of 256 KiB shards packs about
        256 shards a second; packed in two threads, the loop spent 0.13 of its second asleep on
        the GIL (about 750 waits a second) and 0.2 more waiting for a core; packed here, it never
        waits for the GIL (``bench_scale ranks``, 2 cores, alternating, medians of 3: 64 ranks 77.4
        against 64.0 M tokens/s, one stream 116 against 99 M). The largest shards packed here cost
        about half a millisecond (``concat``: 0.2 ms for 256 Ki tokens in 64 documents, 0.7 ms for
        1,024 documents; ``pad`` about 3 us a document; ``bfd`` 1 to 25 ms, never here), a
        message's turn of the loop at 64 ranks."""
        shard = self._here_tokens(ds, key)
        return None if shard is None else self._pack_on_loop(ds, key, shard)

    def _here_tokens(self, ds: Dataset, key: PackedKey) -> TokenizedShard | None:
        """The tokens of a shard that ``_pack_here`` packs on the loop (in the cache's memory,
        within ``PACK_HERE``, not in flight), else None."""
        bounds = PACK_HERE.get(key.packing)
        if bounds is None or key in self._inflight:
            return None
        tokens, docs = ds.shard_tokens.get(key.shard), ds.shard_docs.get(key.shard)
        if tokens is None or docs is None or tokens > bounds[0] or docs > bounds[1]:
            return None
        return self.cache.get(shard_key(ds, key.shard), (ds.fingerprint, key.shard), memory_only=True)

    def _pack_on_loop(self, ds: Dataset, key: PackedKey, shard: TokenizedShard) -> PackedShard:
        packed = pack(key.packing, shard, doc_order(key.seed, key.epoch, key.shard, shard.num_docs), key.seq_len,
                      ds.info.pad_id)
        self._keep_packed(key, packed)
        return packed

    def _keep_packed(self, key: PackedKey, packed: PackedShard | None) -> None:
        """Put a packed shard in the hot tier (on the loop, as its run lands), evicting the oldest."""
        if packed is None or key in self._packed:
            return
        self.packs += 1
        if packed.nbytes > self.hot_max_bytes:
            # Served to whoever waits for it, never kept: it would flush the tier for every other job.
            self.hot_oversized += 1
            if self.hot_oversized == 1:
                log.warning("a packed shard of %d bytes exceeds cache.hot_max_bytes (%d): such shards are "
                            "packed for each read instead of kept (use smaller shards or a larger hot tier)",
                            packed.nbytes, self.hot_max_bytes)
            return
        self._packed[key] = packed
        self._packed_epochs.setdefault((key.fingerprint, key.seed), {}).setdefault(key.epoch, set()).add(key)
        self._packed_bytes += packed.nbytes
        while self._packed and (len(self._packed) > self.hot_slots or self._packed_bytes > self.hot_max_bytes):
            old, dropped = self._packed.popitem(last=False)
            self._packed_bytes -= dropped.nbytes
            self.hot_evictions += 1
            job = self._packed_epochs[(old.fingerprint, old.seed)]
            job[old.epoch].discard(old)
            if not job[old.epoch]:
                del job[old.epoch]
                if not job:
                    del self._packed_epochs[(old.fingerprint, old.seed)]

    def prefetch_stats(self) -> dict[str, int]:
        """Prefetch hits, queue depth, loads in flight (requests and prefetches), and counters."""
        pre = self.prefetcher.stats() if self.prefetcher is not None else {}
        return {**pre, "hits": int(self.cache.stats()["prefetch_hits"]),
                "queue_depth": pre.get("prefetch_queue_depth", 0), "inflight": self._reads}

    def stats(self) -> dict[str, Any]:
        """The cache's numbers, the prefetcher's, and the hot tier's, as one plain dict."""
        out = self.cache.stats()
        out.update(self.prefetcher.stats() if self.prefetcher is not None else {})
        out.update(inflight_loads=self._reads, source_reads=self.source_reads, prefetch_late=self.prefetch_late,
                   hot_entries=len(self._packed), hot_packs=self.packs,
                   hot_evictions=self.hot_evictions, hot_oversized=self.hot_oversized,
                   hot_bytes=self._packed_bytes)
        return out

    def packed_now(self, ds: Dataset, seed: int, epoch: int, ordinal: int, seq_len: int,
                   packing: str) -> PackedShard | None:
        """The packed shard if it is in the hot tier, without waiting for anything."""
        return self.packed_at(self.packed_key(ds, seed, epoch, ordinal, seq_len, packing))

    def packed_at(self, key: PackedKey) -> PackedShard | None:
        """``packed_now`` by the hot tier's key (``packed_key``), for a caller that keeps keys."""
        hit = self._packed.get(key)
        if hit is not None:
            self._packed.move_to_end(key)
        return hit

    def packed_key(self, ds: Dataset, seed: int, epoch: int, ordinal: int, seq_len: int,
                    packing: str) -> PackedKey:
        """The hot tier's key of shard ``ordinal`` of ``epoch``'s order."""
        # (tuple.__new__: the named tuple's own __new__ is a Python function, twice the cost here)
        return tuple.__new__(PackedKey, (ds.fingerprint, self.shard_index(ds, seed, epoch, ordinal), seed, epoch,
                                         seq_len, packing))

    def rows_now(self, ds: Dataset, seed: int, epoch: int, ordinal: int, seq_len: int, packing: str) -> int | None:
        """A shard's rows in an epoch if they are known without waiting (from its counts, or from
        its packed rows in the hot tier), else None."""
        key = self.packed_key(ds, seed, epoch, ordinal, seq_len, packing)
        index = key.shard
        tokens, docs = ds.shard_tokens.get(index), ds.shard_docs.get(index)
        if tokens is not None and docs is not None:
            rows = known_rows(packing, tokens, docs, seq_len)
            if rows is not None:
                return rows
        hit = self._packed.get(key)
        return None if hit is None else hit.rows

    def epoch_rows(self, ds: Dataset, seed: int, epoch: int, seq_len: int, packing: str) -> list[int] | None:
        """Cumulative rows of an epoch's shards in their order (``[0, r0, r0 + r1, ...]``, a list:
        it is bisected a few times per message, where numpy's call overhead would dominate), when
        every shard's count is known from its counts alone (concat and pad), else None."""
        key = (ds.fingerprint, seed, epoch, seq_len, packing)
        version = ds.counts_version  # the answer changes only as counts are learned (or change)
        hit = self._epoch_rows.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        cum = None
        if len(ds.shard_tokens) == ds.num_shards and known_rows(packing, 0, 0, seq_len) is not None:
            rows = [known_rows(packing, ds.shard_tokens[i], ds.shard_docs[i], seq_len) or 0  # (known: checked)
                    for i in range(ds.num_shards)]
            cum = epoch_rows(seed, epoch, rows)
        self._epoch_rows[key] = (version, cum)
        while len(self._epoch_rows) > 64:
            self._epoch_rows.popitem(last=False)
        return cum

    def pack_ahead(self, ds: Dataset, seed: int, epoch: int, ordinal: int, seq_len: int, packing: str) -> bool:
        """Start packing a shard a stream will read next, so that crossing into it does not wait
        for decompression and packing. Only from the cache: reading the source ahead is the
        prefetcher's (within its depth and budget). Fire and forget: a failure surfaces when it
        is read. One pack-ahead per shard however many streams (the ranks of a job) ask for it,
        and at most ``MAX_PACK_AHEAD`` at once, so that demand loads never queue behind a flood
        of them. Returns False when refused for that reason (ask again later).

        Once no stream has begun for ``PACK_HERE_QUIET_S`` and none waits for its first message
        (``job_starting``: running jobs, none starting), a shard ``_pack_here`` can pack is packed
        here and never sent to the executor: past this turn's budget, or while the executor still
        works through a start's backlog, it is refused and packed in a later turn. (Sent after the
        executor's work instead, one packing in a thread kept the next ones there for good: see
        ``PACK_HERE_BACKLOG``. Refused during a start as well, the first batches of a 256-rank
        job on 4 replicas came 15-30% later.)"""
        if ordinal == ds.num_shards:
            epoch, ordinal = epoch + 1, 0
        key = self.packed_key(ds, seed, epoch, ordinal, seq_len, packing)
        if key in self._packed or key in self._inflight:
            return True
        if time.monotonic() - self._stream_began > PACK_HERE_QUIET_S and not self.job_starting():
            try:
                shard = self._here_tokens(ds, key)
                if shard is not None:
                    if self._here_this_turn >= PACK_HERE_AHEAD_PER_TURN or len(self._ahead) >= PACK_HERE_BACKLOG:
                        return False
                    self._pack_on_loop(ds, key, shard)
                    if not self._here_this_turn:
                        asyncio.get_running_loop().call_soon(self._next_turn)
                    self._here_this_turn += 1
                    return True
            except Exception:  # noqa: BLE001 - as from the executor: it surfaces where the shard is read
                log.debug("packing shard %d ahead failed", key.shard, exc_info=True)
                return True
        if len(self._ahead) >= MAX_PACK_AHEAD:
            return False
        self._ahead.add(key)
        self._start(key, self._packer(ds, seed, epoch, key.shard, seq_len, packing, None),
                    functools.partial(self._keep_packed, key))
        return True

    def _next_turn(self) -> None:
        self._here_this_turn = 0

    async def close(self) -> None:
        """Stop the prefetcher (shutdown; streams are closed first). Pack-aheads already in the
        executor finish there."""
        if self.prefetcher is not None:
            await self.prefetcher.close()


def build_store(config: Config, executor: Executor) -> ShardStore:
    """The store, cache tiers and prefetcher that ``config`` describes."""
    c = config.cache
    fixed_mmap_threshold()  # keeps resident memory close to the cache budget (see there)
    disk: SecondTier | None = None
    if c.disk is not None:  # a directory here, or a prefix in an object store shared by every job
        disk = (ObjectTier(c.disk.path, c.disk.storage_options) if is_url(c.disk.path)
                else DiskTier(c.disk.path, int(c.disk.max_bytes)))
    cache = ShardCache(int(c.max_bytes), ttl_s=c.ttl_s, zstd_level=c.zstd_level, compression=c.compression,
                       policy=c.policy, disk=disk)
    return ShardStore(cache, executor, packed_slots=c.hot_slots, packed_bytes=int(c.hot_max_bytes),
                      prefetch=config.prefetch)
