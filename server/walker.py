"""Walkers: a forward-only position in a dataset's (or mixture's) global row sequence that
loads shards lazily, skips rows by their counts alone, and copies out the rows it takes."""

from __future__ import annotations

import asyncio
import weakref

import numpy as np

from server.dataset import Dataset
from server.errors import FailedPrecondition
from server.mixture import Mixture
from server.schedule import Locator
from server.store import ShardStore

#: Provenance record fields (one int64 each): row in batch, column, length, source, shard,
#: document in shard, offset in document.
PROVENANCE_FIELDS = 7


class Walker:
    """Position in one dataset's sequence: epoch, shard ordinal, row inside that shard."""

    def __init__(self, store: ShardStore, ds: Dataset, seed: int, seq_len: int, packing: str,
                 start: Locator, source: int = 0) -> None:
        self.store, self.ds, self.seed, self.seq_len, self.packing = store, ds, seed, seq_len, packing
        self.row, self.epoch, self.shard, self.shard_row = start.row, start.epoch, start.shard, start.shard_row
        self.source = source
        self._rows: int | None = None
        self._ahead_from: tuple[int, int] | None = None
        # Tells the cache (eviction by next use) and the prefetcher where this walker is; close()
        # ends it, and so does dropping the walker (a safety net for callers that do not close).
        self._follow = store.follow(ds, seed)
        weakref.finalize(self, self._follow.close)

    def locator(self) -> Locator:
        return Locator(self.row, self.epoch, self.shard, self.shard_row)

    def close(self) -> None:
        """The stream ended: its pending prefetches are cancelled."""
        self._follow.close()

    async def _shard_rows(self) -> int:
        if self._rows is None:
            self._follow.at(self.epoch, self.shard)
            self._rows = await self.store.num_rows(self.ds, self.seed, self.epoch, self.shard, self.seq_len,
                                                   self.packing)
            if self.shard_row > self._rows:
                raise FailedPrecondition(
                    f"cursor points at row {self.shard_row} of shard {self.shard} (epoch {self.epoch}) of "
                    f"{self.ds.name!r}, which has {self._rows} rows: the cursor does not belong to this dataset")
        return self._rows

    async def _ready(self) -> int:
        """Move past exhausted shards; return the rows left in the current one (> 0)."""
        empty = 0
        while (left := await self._shard_rows() - self.shard_row) == 0:
            empty += 1
            if empty > self.ds.num_shards:
                raise FailedPrecondition(f"dataset {self.ds.name!r} has no tokens to serve")
            self.shard, self.shard_row, self._rows = self.shard + 1, 0, None
            if self.shard == self.ds.num_shards:
                self.epoch, self.shard = self.epoch + 1, 0
        return left

    async def skip(self, n: int) -> None:
        assert n >= 0, n
        crossed = 0
        while n:
            step = min(n, await self._ready())
            self.shard_row += step
            self.row += step
            n -= step
            crossed += 1
            if crossed % 64 == 0:  # counts already known never suspend: let other streams run
                await asyncio.sleep(0)

    def take_now(self, out: np.ndarray, firsts: list[int], ends: list[int]) -> list[Locator] | None:
        """The fast path, without awaiting: batch ``i`` is rows ``firsts[i] ...`` (``out[i]``) and
        is followed by the position ``ends[i]``. Works only when all of them lie in the current
        shard and its rows are packed in memory; returns the locators at ``ends``, else None and
        nothing moved."""
        rows = self._rows
        if rows is None or self.shard_row + (ends[-1] - self.row) > rows or firsts[0] < self.row:
            return None
        packed = self.store.packed_now(self.ds, self.seed, self.epoch, self.shard, self.seq_len, self.packing)
        if packed is None:
            return None
        base = self.shard_row - self.row  # shard row = global row + base, inside this shard
        index = np.asarray(firsts, dtype=np.int64)[:, None] + np.arange(out.shape[1]) + base
        out[...] = packed.row_view(0, packed.rows)[index]
        self.row, self.shard_row = ends[-1], ends[-1] + base
        return [Locator(end, self.epoch, self.shard, end + base) for end in ends]

    async def take(self, out: np.ndarray, provenance: list[np.ndarray] | None = None) -> int:
        """Fill ``out`` ([rows, seq_len + 1]) with the next rows; return the epoch of the first.
        With ``provenance``, append the records of where each piece of each row came from."""
        filled, first_epoch = 0, None
        while filled < len(out):
            step = min(len(out) - filled, await self._ready())
            first_epoch = self.epoch if first_epoch is None else first_epoch
            packed = await self.store.packed(self.ds, self.seed, self.epoch, self.shard, self.seq_len, self.packing)
            if self._ahead_from != (self.epoch, self.shard):  # taking from a new shard: pack the next
                self._ahead_from = (self.epoch, self.shard)
                self.store.pack_ahead(self.ds, self.seed, self.epoch, self.shard + 1, self.seq_len, self.packing)
            out[filled : filled + step] = packed.row_view(self.shard_row, self.shard_row + step)
            if provenance is not None:
                seg = packed.row_segments(self.shard_row, self.shard_row + step)
                rec = np.empty((len(seg), PROVENANCE_FIELDS), dtype=np.int64)
                rec[:, 0] = seg[:, 0] - self.shard_row + filled
                rec[:, 1:3] = seg[:, 1:3]
                rec[:, 3] = self.source
                rec[:, 4] = self.store.shard_index(self.ds, self.seed, self.epoch, self.shard)
                rec[:, 5:7] = seg[:, 3:5]
                provenance.append(rec)
            filled += step
            self.shard_row += step
            self.row += step
        return int(first_epoch)


class MixtureWalker:
    """Position in a mixture: the mixture row, and one walker per component. Row ``g`` comes from
    the component the weight schedule assigns it to (a function of the components' counts)."""

    def __init__(self, store: ShardStore, mix: Mixture, seed: int, seq_len: int, packing: str,
                 start: Locator) -> None:
        self.mix = mix
        self.row = start.row
        starts = dict(start.components)
        self.parts = [Walker(store, ds, seed, seq_len, packing, starts.get(ds.name, Locator()), source=i)
                      for i, ds in enumerate(mix.components)]

    def locator(self) -> Locator:
        return Locator(row=self.row, components=tuple((w.ds.name, w.locator()) for w in self.parts))

    def close(self) -> None:
        for part in self.parts:
            part.close()

    def _assign(self, n: int) -> list[int]:
        counts = [w.row for w in self.parts]
        return self.mix.schedule.assign(self.row, counts, n)

    async def skip(self, n: int) -> None:
        assigned = self._assign(n)
        for c, part in enumerate(self.parts):
            await part.skip(assigned.count(c))
        self.row += n

    async def take(self, out: np.ndarray, provenance: list[np.ndarray] | None = None) -> int:
        assigned = np.asarray(self._assign(len(out)))
        epoch = None
        for c, part in enumerate(self.parts):
            rows = np.flatnonzero(assigned == c)
            if not len(rows):
                continue
            tmp = np.empty((len(rows), out.shape[1]), dtype=out.dtype)
            recs: list[np.ndarray] | None = [] if provenance is not None else None
            part_epoch = await part.take(tmp, recs)
            epoch = part_epoch if epoch is None else min(epoch, part_epoch)
            out[rows] = tmp
            self.mix.rows_served[c] += len(rows)
            if recs:
                rec = np.concatenate(recs)
                rec[:, 0] = rows[rec[:, 0]]  # component-local row -> row in this batch
                provenance.append(rec)
        self.row += len(out)
        return int(epoch or 0)


def make_walker(store: ShardStore, ds: Dataset | Mixture, seed: int, seq_len: int, packing: str,
                start: Locator) -> Walker | MixtureWalker:
    if isinstance(ds, Mixture):
        return MixtureWalker(store, ds, seed, seq_len, packing, start)
    return Walker(store, ds, seed, seq_len, packing, start)
