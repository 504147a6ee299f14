"""The async prefetcher: keeps the next shards of every active stream loading ahead of it."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Hashable, KeysView
from typing import TYPE_CHECKING

from server.supply.cache_policy import FutureIndex, Slot

if TYPE_CHECKING:
    from server.stages.dataset import Dataset

log = logging.getLogger(__name__)
_ids = itertools.count()

#: The shards a stream will read next, nearest first: slot -> (dataset, shard index).
Window = dict[Slot, "tuple[Dataset, int]"]
#: Windows a prefetcher keeps worked out (``Prefetcher.window``): a job's ranks are within a few
#: messages of one another, far fewer shards than this apart.
MAX_WINDOWS = 1024


class Prefetcher:
    """Loads the shards that followed streams will read next, each once however many want it.

    Bounded three ways: ``depth`` shards ahead of each stream's *current* position (which moves
    only as its client consumes, so a slow consumer never makes it run ahead), ``concurrency``
    loads at once, and ``room()``: prefetched entries live in the cache and may take only a
    share of its budget. A load no stream wants any more is cancelled while it waits; one
    already running in a thread finishes (threads cannot be interrupted) and its result stays
    cached for whoever comes next.

    Args:
        warm: loads one shard into the cache (the store's single-flight prefetch load).
        depth: shards kept loading ahead of each stream.
        concurrency: loads running at once, across all streams.
        room: whether prefetched data may take more memory now.
    """

    def __init__(self, warm: Callable[[Dataset, int], Awaitable[object]], *, depth: int, concurrency: int,
                 room: Callable[[], bool] = lambda: True) -> None:
        self.depth = depth
        self._warm, self._room = warm, room
        self._sem = asyncio.Semaphore(concurrency)
        self._tasks: dict[Slot, asyncio.Task] = {}
        self._waiting: set[Slot] = set()
        self._wanters: dict[Slot, set[Hashable]] = {}
        self._windows: dict[Hashable, KeysView[Slot]] = {}
        self._window_of: dict[tuple[str, int, int, int], Window] = {}
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._n = dict.fromkeys(("prefetch_started", "prefetch_done", "prefetch_cancelled",
                                 "prefetch_skipped_memory", "prefetch_errors"), 0)

    def window(self, ds: Dataset, seed: int, epoch: int, ordinal: int,
               shard_index: Callable[[Dataset, int, int, int], int]) -> Window:
        """The ``depth`` shards after shard ``ordinal`` of ``epoch``'s order (``shard_index``: the
        shard at a position), nearest first, for ``want``. Worked out once for the streams that
        pass the same place: a job's ranks each report every shard they move into (64 ranks of a
        job on small shards: the same window 64 times a shard, about 8% of the loop's time)."""
        key = (ds.fingerprint, seed, epoch, ordinal)
        hit = self._window_of.get(key)
        if hit is None:
            n = ds.num_shards
            hit = {}
            for k in range(1, min(self.depth, n - 1) + 1):
                index = shard_index(ds, seed, *divmod(epoch * n + ordinal + k, n))
                hit[(ds.fingerprint, index)] = (ds, index)
            if len(self._window_of) >= MAX_WINDOWS:
                del self._window_of[next(iter(self._window_of))]
            self._window_of[key] = hit
        return hit

    def want(self, stream: Hashable, new: Window) -> None:
        """Set the shards ``stream`` will read next (a ``window``, never changed afterwards): new
        ones start loading, ones that left its window (and that no other stream wants) are
        cancelled if still waiting."""
        old = self._windows.get(stream)
        if old is not None:
            for slot in old - new.keys():
                self._unwant(stream, slot)
        for slot, target in new.items():  # nearest first: the semaphore serves in arrival order
            if old is None or slot not in old:
                self._wanters.setdefault(slot, set()).add(stream)
                if slot not in self._tasks:
                    self._start(slot, *target)
        self._windows[stream] = new.keys()

    def forget(self, stream: Hashable) -> None:
        """A stream closed: drop its window, cancelling what only it was waiting for."""
        for slot in self._windows.pop(stream, set()):
            self._unwant(stream, slot)

    def _unwant(self, stream: Hashable, slot: Slot) -> None:
        wanters = self._wanters.get(slot)
        if wanters is None:
            return
        wanters.discard(stream)
        if not wanters:
            del self._wanters[slot]
            task = self._tasks.get(slot)
            if task is not None and slot in self._waiting:
                task.cancel()

    def _start(self, slot: Slot, ds: Dataset, index: int) -> None:
        self._waiting.add(slot)
        self._idle.clear()
        task = asyncio.get_running_loop().create_task(self._run(slot, ds, index), name=f"prefetch {ds.name}#{index}")
        self._tasks[slot] = task
        # Bookkeeping in a callback, not a ``finally``: a task cancelled before it ever ran skips its body.
        task.add_done_callback(lambda t: self._done(slot, t))

    async def _run(self, slot: Slot, ds: Dataset, index: int) -> None:
        async with self._sem:
            self._waiting.discard(slot)
            if not self._room():
                self._n["prefetch_skipped_memory"] += 1
                return
            self._running += 1
            self._n["prefetch_started"] += 1
            try:
                await self._warm(ds, index)
            except Exception as err:  # not fatal: the stream will load the shard itself
                self._n["prefetch_errors"] += 1
                log.warning("prefetch of shard %d of %s failed: %s", index, ds.name, err)
            else:
                self._n["prefetch_done"] += 1
            finally:
                self._running -= 1

    def _done(self, slot: Slot, task: asyncio.Task) -> None:
        if task.cancelled():
            self._n["prefetch_cancelled"] += 1
        self._waiting.discard(slot)
        if self._tasks.get(slot) is task:
            del self._tasks[slot]
        self._wanters.pop(slot, None)
        if not self._tasks:
            self._idle.set()

    async def idle(self) -> None:
        """Wait until no prefetch task is left."""
        await self._idle.wait()

    async def close(self) -> None:
        """Cancel every prefetch and wait for them to end (server shutdown)."""
        self._windows.clear()
        self._wanters.clear()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> dict[str, int]:
        """Queue depth (waiting for a slot), in-flight loads, and counters."""
        return {**self._n, "prefetch_queue_depth": len(self._waiting), "prefetch_inflight": self._running,
                "prefetch_streams": len(self._windows)}


class Follower:
    """One stream's position, told to the cache's future index (for the smart policy) and to the
    prefetcher. ``at`` is cheap when the shard did not change; ``close`` must run when the stream
    ends, however it ends (use it as a context manager or in ``finally``)."""

    def __init__(self, ds: Dataset, seed: int, future: FutureIndex, prefetcher: Prefetcher | None,
                 shard_index: Callable[[Dataset, int, int, int], int],
                 moved: Callable[[Dataset, int, int | None, int | None], None] | None = None) -> None:
        self.id = ("stream", next(_ids))
        self.ds, self.seed = ds, seed
        self._future, self._prefetcher, self._shard_index = future, prefetcher, shard_index
        self._moved = moved  # (ds, seed, old epoch, new epoch) when the epoch changes; None: began / ended
        self._pos: tuple[int, int] | None = None
        self._closed = False
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def at(self, epoch: int, ordinal: int) -> None:
        """The stream is reading shard ``ordinal`` of epoch ``epoch``'s order."""
        if self._pos == (epoch, ordinal):
            return
        old = self._pos[0] if self._pos is not None else None
        self._pos = (epoch, ordinal)
        if self._moved is not None and old != epoch:
            self._moved(self.ds, self.seed, old, epoch)
        self._future.update(self.id, self.ds.fingerprint, self.seed, self.ds.num_shards, epoch, ordinal)
        prefetcher = self._prefetcher
        if prefetcher is not None and prefetcher.depth:
            prefetcher.want(self.id, prefetcher.window(self.ds, self.seed, epoch, ordinal, self._shard_index))

    def close(self) -> None:
        """Idempotent; safe from any thread (a garbage-collection finalizer may call it)."""
        if self._closed:
            return
        if self._loop is not None and not _in_loop(self._loop):
            try:
                self._loop.call_soon_threadsafe(self.close)
            except RuntimeError:  # the loop is closed: nothing is left to cancel
                pass
            return
        self._closed = True
        if self._moved is not None and self._pos is not None:
            self._moved(self.ds, self.seed, self._pos[0], None)
        self._future.remove(self.id)
        if self._prefetcher is not None:
            self._prefetcher.forget(self.id)

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
