"""Async access to shards: cache lookups, single-flight loads off the event loop, packing."""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from typing import Any

import numpy as np

from server.cache import ShardCache
from server.dataset import Dataset
from server.packing import PackedShard, TokenizedShard, concat_rows, pack_concat
from server.schedule import doc_order, shard_order


@functools.lru_cache(maxsize=256)
def _shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    return shard_order(seed, epoch, num_shards)


class ShardStore:
    """Loads each shard once however many streams want it, and keeps recent ones warm."""

    def __init__(self, cache: ShardCache, executor: Executor, packed_slots: int = 16) -> None:
        self.cache = cache
        self.executor = executor
        self._inflight: dict[Hashable, asyncio.Task] = {}
        self._packed: OrderedDict[Hashable, PackedShard] = OrderedDict()
        self._packed_slots = packed_slots

    @staticmethod
    def shard_index(ds: Dataset, seed: int, epoch: int, ordinal: int) -> int:
        """The shard at position ``ordinal`` of epoch ``epoch``'s order."""
        return int(_shard_order(seed, epoch, ds.num_shards)[ordinal])

    async def _once(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the executor, sharing one run among concurrent callers. A caller that is
        cancelled does not cancel the load that others wait for."""
        task = self._inflight.get(key)
        if task is None:
            loop = asyncio.get_running_loop()
            task = loop.create_task(self._run(key, loop.run_in_executor(self.executor, fn)))
            self._inflight[key] = task
        return await asyncio.shield(task)

    async def _run(self, key: Hashable, fut: asyncio.Future) -> Any:
        try:
            return await fut
        finally:
            self._inflight.pop(key, None)

    async def tokenized(self, ds: Dataset, index: int) -> TokenizedShard:
        key = (ds.fingerprint, index)
        hit = self.cache.get(key)
        if hit is not None:
            return hit

        def load() -> TokenizedShard:
            shard = ds.tokenize_shard(index)
            self.cache.put(key, shard)
            return shard

        return await self._once(("tok",) + key, load)

    async def num_rows(self, ds: Dataset, seed: int, epoch: int, ordinal: int, seq_len: int) -> int:
        """Rows of a shard in an epoch; needs only its token count once that is known."""
        index = self.shard_index(ds, seed, epoch, ordinal)
        tokens = ds.shard_tokens.get(index)
        if tokens is None:
            tokens = (await self.tokenized(ds, index)).num_tokens
        return concat_rows(tokens, seq_len)

    async def packed(self, ds: Dataset, seed: int, epoch: int, ordinal: int, seq_len: int) -> PackedShard:
        """A shard's rows for one epoch (documents shuffled by seed and epoch)."""
        index = self.shard_index(ds, seed, epoch, ordinal)
        key = ("packed", ds.fingerprint, index, seed, epoch, seq_len)
        hit = self._packed.get(key)
        if hit is not None:
            self._packed.move_to_end(key)
            return hit
        tok = await self.tokenized(ds, index)

        def pack() -> PackedShard:
            order = doc_order(seed, epoch, index, tok.num_docs)
            return pack_concat(tok, order, seq_len, ds.info.pad_id)

        packed = await self._once(key, pack)
        self._packed[key] = packed
        while len(self._packed) > self._packed_slots:
            self._packed.popitem(last=False)
        return packed
