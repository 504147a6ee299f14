"""Eviction policies of the shard cache: plain LRU, and "smart" eviction from the known future order."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Protocol

import numpy as np

from server.stages.order import cached_shard_order, shard_order

#: A cache entry's place in a dataset: ``(dataset fingerprint, shard index)``.
Slot = tuple[str, int]
NEVER = math.inf


class Resident(Protocol):
    """What a policy sees of a cached entry."""

    size: int
    slot: Slot | None


class Policy(Protocol):
    """Chooses what to evict to make room, or declines to admit the newcomer. The cache calls it
    under its lock: ``on_insert``/``on_access``/``on_remove`` as entries come, get used and go."""

    name: str

    def victims(self, entries: Mapping[str, Resident], need: int, slot: Slot | None) -> list[str] | None:
        """Keys whose eviction frees at least ``need`` bytes for a newcomer of ``slot``, or ``None``
        to leave the newcomer out. ``entries`` is in least-recently-used-first order."""
        ...

    def on_insert(self, key: str, entry: Resident) -> None: ...

    def on_access(self, key: str) -> None: ...

    def on_remove(self, key: str) -> None: ...


class LRUPolicy:
    """Evict the least recently used; admit everything. The cache's own order is all it needs."""

    name = "lru"

    def on_insert(self, key: str, entry: Resident) -> None:
        pass

    def on_access(self, key: str) -> None:
        pass

    def on_remove(self, key: str) -> None:
        pass

    def victims(self, entries: Mapping[str, Resident], need: int, slot: Slot | None) -> list[str] | None:
        out, freed = [], 0
        for key, entry in entries.items():
            if freed >= need:
                break
            out.append(key)
            freed += entry.size
        return out


@functools.lru_cache(maxsize=64)
def _positions(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """``positions[s]``: where shard ``s`` comes in epoch ``epoch``'s order (the inverse permutation)."""
    pos = np.empty(num_shards, dtype=np.int64)
    pos[shard_order(seed, epoch, num_shards)] = np.arange(num_shards, dtype=np.int64)
    pos.flags.writeable = False
    return pos


@functools.lru_cache(maxsize=256)
def next_use(seed: int, num_shards: int, epoch: int, ordinal: int) -> np.ndarray:
    """For a stream at shard ``ordinal`` of ``epoch``: how many shards it reads before it next
    reads each shard, counting only reads after the current one (the current shard is being
    read now; its next use is in the next epoch). Every shard is read once per epoch, so the
    next use is always within this epoch or the next."""
    here = _positions(seed, epoch, num_shards)
    then = _positions(seed, epoch + 1, num_shards)
    dist = np.where(here > ordinal, here - ordinal, num_shards - ordinal + then)
    dist.flags.writeable = False  # cached and shared: the ranks of a job are at the same few places
    return dist


@functools.lru_cache(maxsize=256)
def next_use_resident(seed: int, num_shards: int, epoch: int, ordinal: int) -> np.ndarray:
    """``next_use`` as an entry already cached sees it: the shard the stream is at is in use (0)
    until the stream moves past it. A stream reports a shard when it reaches it, before reading
    it: counted as next epoch, a cached shard was evicted right then and read again from the
    source (issue 23: a third of the smart policy's reads above Belady's)."""
    dist = np.array(next_use(seed, num_shards, epoch, ordinal))
    dist[cached_shard_order(seed, epoch, num_shards)[ordinal]] = 0
    dist.flags.writeable = False
    return dist


class FutureIndex:
    """Where every active stream is in its seeded shard order, hence how soon each shard is needed.
    Thread-safe; streams are updated from the event loop, policies read it from loader threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[Hashable, tuple[str, int, int, int, int]] = {}
        self._combined: dict[str, np.ndarray] | None = {}
        self._resident: dict[str, np.ndarray] = {}

    def update(self, stream: Hashable, dataset: str, seed: int, num_shards: int, epoch: int, ordinal: int) -> None:
        """Record that ``stream`` (of ``dataset``, ordered by ``seed``) is at ``(epoch, ordinal)``.
        Cheap: on the event loop, once per shard per stream; distances are computed when read."""
        with self._lock:
            self._streams[stream] = (dataset, seed, num_shards, epoch, ordinal)
            self._combined = None

    def remove(self, stream: Hashable) -> None:
        """Forget a stream that closed."""
        with self._lock:
            if self._streams.pop(stream, None) is not None:
                self._combined = None

    def __len__(self) -> int:
        return len(self._streams)

    def snapshot(self) -> Callable[[Slot | None], float]:
        """A function giving each slot's distance to its next use by any stream (``inf``: none),
        after the reads under way: what a newcomer that was just read is needed for."""
        with self._lock:
            if self._combined is None:
                self._combined = self._merge(next_use)
                self._resident = self._merge(next_use_resident)
            combined = self._combined

        def distance(slot: Slot | None) -> float:
            if slot is None:
                return NEVER
            arr = combined.get(slot[0])
            return NEVER if arr is None or not 0 <= slot[1] < len(arr) else float(arr[slot[1]])

        return distance

    def _merge(self, of: Callable[[int, int, int, int], np.ndarray]) -> dict[str, np.ndarray]:
        """Assumes the lock. Per dataset, the nearest use by any of its streams."""
        combined: dict[str, np.ndarray] = {}
        for dataset, *where in set(self._streams.values()):
            dist, old = of(*where), combined.get(dataset)
            combined[dataset] = dist if old is None or len(old) != len(dist) else np.minimum(old, dist)
        return combined

    def arrays(self) -> dict[str, np.ndarray]:
        """Per dataset, every cached shard's distance to its next use, a shard that a stream is
        at counting as in use (0): what eviction ranks residents by."""
        self.snapshot()
        with self._lock:
            return self._resident

    def distance(self, slot: Slot | None) -> float:
        """Shards until ``slot`` is next read by any active stream; ``inf`` when none will."""
        return self.snapshot()(slot)


class _Group:
    """The entries of one dataset as parallel arrays (shard index, size, last use), so that the
    distances of all of them are one numpy gather instead of a Python loop."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.index = np.empty(64, dtype=np.int64)
        self.size = np.empty(64, dtype=np.int64)
        self.used = np.empty(64, dtype=np.int64)

    def add(self, key: str, index: int, size: int, used: int) -> int:
        n = len(self.keys)
        if n == len(self.index):
            self.index, self.size, self.used = (np.resize(a, 2 * n) for a in (self.index, self.size, self.used))
        self.keys.append(key)
        self.index[n], self.size[n], self.used[n] = index, size, used
        return n

    def pop(self, pos: int) -> str | None:
        """Remove position ``pos`` by moving the last entry there; returns that entry's key."""
        last = len(self.keys) - 1
        moved = self.keys.pop()
        if pos == last:
            return None
        self.keys[pos] = moved
        self.index[pos], self.size[pos], self.used[pos] = self.index[last], self.size[last], self.used[last]
        return moved


class SmartPolicy:
    """Belady's rule on the streams' known future: evict the entry whose next use is furthest
    away, and decline a newcomer that would itself be the first to go. Entries no active stream
    needs count as never used again; among those the least recently used goes first, so with no
    active stream this is plain LRU. Choosing costs a few numpy passes over the entries."""

    name = "smart"

    def __init__(self, future: FutureIndex) -> None:
        self.future = future
        self._groups: dict[str | None, _Group] = {}
        self._where: dict[str, tuple[str | None, int]] = {}
        self._tick = 0

    def on_insert(self, key: str, entry: Resident) -> None:
        dataset, index = entry.slot if entry.slot is not None else (None, -1)
        self._tick += 1
        pos = self._groups.setdefault(dataset, _Group()).add(key, index, entry.size, self._tick)
        self._where[key] = (dataset, pos)

    def on_access(self, key: str) -> None:
        dataset, pos = self._where[key]
        self._tick += 1
        self._groups[dataset].used[pos] = self._tick

    def on_remove(self, key: str) -> None:
        dataset, pos = self._where.pop(key)
        group = self._groups[dataset]
        moved = group.pop(pos)
        if moved is not None:
            self._where[moved] = (dataset, pos)
        if not group.keys:
            del self._groups[dataset]

    def victims(self, entries: Mapping[str, Resident], need: int, slot: Slot | None) -> list[str] | None:
        distance, nexts = self.future.snapshot(), self.future.arrays()
        groups = list(self._groups.values())
        dist = np.concatenate([_distances(nexts.get(ds) if ds is not None else None, g)
                               for ds, g in self._groups.items()] or [np.empty(0)])
        used = np.concatenate([g.used[: len(g.keys)] for g in groups] or [np.empty(0, np.int64)])
        size = np.concatenate([g.size[: len(g.keys)] for g in groups] or [np.empty(0, np.int64)])
        chosen = _furthest(dist, used, size, need)
        if len(chosen) and dist[chosen[-1]] < distance(slot):
            return None  # evicting it would lose a hit that comes sooner than the newcomer's
        starts = np.cumsum([0] + [len(g.keys) for g in groups])
        which = np.searchsorted(starts, chosen, side="right") - 1
        return [groups[g].keys[i - starts[g]] for g, i in zip(which.tolist(), chosen.tolist())]


def _furthest(dist: np.ndarray, used: np.ndarray, size: np.ndarray, need: int, few: int = 16) -> np.ndarray:
    """Positions to evict, furthest next use first and the oldest among equals, until they free
    ``need`` bytes. Sorts only the few furthest (one eviction usually frees enough); sorts all
    when those are not enough."""
    pick = np.arange(len(dist))
    if len(dist) > 2 * few:
        cutoff = np.partition(dist, len(dist) - few)[len(dist) - few]
        above, at = np.flatnonzero(dist > cutoff), np.flatnonzero(dist == cutoff)
        if len(at) > few:  # many equals (say, all never needed again): the oldest of them
            at = at[np.argpartition(used[at], few)[:few]]
        pick = np.concatenate([above, at])
        if size[pick].sum() < need:
            pick = np.arange(len(dist))
    order = pick[np.lexsort((used[pick], -dist[pick]))]
    return order[: int(np.searchsorted(np.cumsum(size[order]), need)) + 1]


def _distances(nexts: np.ndarray | None, group: _Group) -> np.ndarray:
    n = len(group.keys)
    out = np.full(n, NEVER)
    if nexts is not None:
        index = group.index[:n]
        ok = (index >= 0) & (index < len(nexts))
        out[ok] = nexts[index[ok]]
    return out


def make_policy(name: str, future: FutureIndex) -> Policy:
    """The policy a config names (``smart`` or ``lru``)."""
    if name == "smart":
        return SmartPolicy(future)
    if name == "lru":
        return LRUPolicy()
    raise ValueError(f"cache.policy: must be 'smart' or 'lru', got {name!r}")
