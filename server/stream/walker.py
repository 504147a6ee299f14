"""Walkers: a forward-only position in a dataset's (or mixture's) global row sequence that
loads shards lazily, skips rows by their counts alone, and copies out the rows it takes."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import numpy as np

from server import metrics
from server.stages.dataset import Dataset
from server.errors import FailedPrecondition
from server.stages.mixture import Mixture
from server.stages.order import Locator, locate
from server.stages.served import Served
from server.supply.store import ShardStore
from tokenfeed.constants import PROVENANCE_FIELDS

#: int64s per provenance record (``tokenfeed.constants.PROVENANCE_FIELDS`` names them).
PROVENANCE_WIDTH = len(PROVENANCE_FIELDS)
#: Rows a mixture assigns between two turns of the event loop (a few ms of work).
ASSIGN_ON_LOOP_ROWS = 4096


class Walker:
    """Position in one dataset's sequence: epoch, shard ordinal, row inside that shard."""

    def __init__(self, store: ShardStore, ds: Dataset, seed: int, seq_len: int, packing: str,
                 start: Locator, source: int = 0, ahead_rows: int = 0) -> None:
        self.store, self.ds, self.seed, self.seq_len, self.packing = store, ds, seed, seq_len, packing
        self.ahead_rows = ahead_rows  # rows past the current shard to keep packed ahead
        self.row, self.epoch, self.shard, self.shard_row = start.row, start.epoch, start.shard, start.shard_row
        self.source = source
        self._rows: int | None = None
        self._ahead_from: tuple[int, int] | None = None  # the shard the last pack-ahead started from
        self._ahead_to: tuple[int, int, int] | None = None  # furthest shard asked for, global row at its end
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
        if (self._rows is not None and n > self._rows - self.shard_row  # past this shard (whose row
                and (where := self._locate(self.epoch, self.shard, self.shard_row + n)) is not None):
            # count is checked), every count known: jump (the ranks of a large job skip most rows)
            self.epoch, self.shard, self.shard_row, self._rows = where
            self.row += n
            self._follow.at(self.epoch, self.shard)
            return
        crossed = 0
        while n:
            step = min(n, await self._ready())
            self.shard_row += step
            self.row += step
            n -= step
            crossed += 1
            if crossed % 64 == 0:  # counts already known never suspend: let other streams run
                await asyncio.sleep(0)

    def take_now(self, out: np.ndarray, firsts: list[int],
                 ends: list[int]) -> tuple[list[Locator], list[int]] | None:
        """The fast path, without awaiting: batch ``i`` is rows ``firsts[i] ...`` (``out[i]``) and
        is followed by the position ``ends[i]``. Works when every row it crosses lies in a shard
        whose row count is known and every row it takes lies in a shard packed in memory (the
        batches may span shards); returns the locators at ``ends`` and each batch's epoch (that of
        its first row, as ``take`` returns: a message's batches may straddle an epoch's end), else
        None and nothing moved."""
        if self._rows is None or firsts[0] < self.row:
            return None
        store, ds = self.store, self.ds
        epoch, shard, shard_row, rows, row = self.epoch, self.shard, self.shard_row, self._rows, self.row
        empty = 0  # empty shards in a row
        copies: list[tuple[int, int, Any, int, int]] = []  # (batch, row in batch, packed, shard row, n)
        locators: list[Locator] = []
        epochs: list[int] = []  # of each batch's first row
        width = out.shape[1]
        for i, (first, end) in enumerate(zip(firsts, ends)):
            filled = 0
            for target, taking in ((first, False), (first + width, True), (end, False)):
                while row < target:
                    if not taking and target - row > rows - shard_row:  # past this shard: jump there
                        where = self._locate(epoch, shard, shard_row + target - row)
                        if where is not None:
                            epoch, shard, shard_row, rows = where
                            row = target
                            break
                    if shard_row == rows:  # move into the next shard, if its row count is known
                        shard += 1
                        if shard == ds.num_shards:
                            epoch, shard = epoch + 1, 0
                        known = store.rows_now(ds, self.seed, epoch, shard, self.seq_len, self.packing)
                        empty = empty + 1 if known == 0 else 0
                        if known is None or empty > ds.num_shards:  # (nothing but empty shards: the
                            return None                             # slow path says so)
                        shard_row, rows = 0, known
                        continue
                    step = min(target - row, rows - shard_row)
                    if taking:
                        packed = store.packed_now(ds, self.seed, epoch, shard, self.seq_len, self.packing)
                        if packed is None:
                            return None
                        if not filled:  # the batch's first row, in the shard it lies in
                            epochs.append(epoch)
                        copies.append((i, filled, packed, shard_row, step))
                        filled += step
                    shard_row, row = shard_row + step, row + step
            locators.append(Locator(end, epoch, shard, shard_row))
        for i, at, packed, first_row, n in copies:
            out[i, at : at + n] = packed.row_view(first_row, first_row + n)
        self.epoch, self.shard, self.shard_row, self._rows, self.row = epoch, shard, shard_row, rows, row
        # Where the stream is now; not every shard it crossed (a rank of a large job crosses dozens
        # per chunk: telling each would churn the prefetcher's windows). Cheap when unchanged.
        self._follow.at(epoch, shard)
        self._pack_ahead()
        return locators, epochs

    def _locate(self, epoch: int, shard: int, offset: int) -> tuple[int, int, int, int] | None:
        """``order.locate`` over this walker's counts: the ranks of a large job skip most rows."""
        store, ds, seed, seq_len, packing = self.store, self.ds, self.seed, self.seq_len, self.packing
        return locate(lambda e: store.epoch_rows(ds, seed, e, seq_len, packing), epoch, shard, offset)

    def _pack_ahead(self) -> None:
        """On entering a shard, keep packing the shards that hold the next ``ahead_rows`` rows
        (at least the next shard; at most a quarter of the hot tier's shards and bytes, so that the
        shards other ranks of a job still read are not evicted to make room), so that crossing
        into them neither waits for decompression and packing nor leaves the fast path. Each
        shard is asked for once per walker: the walk resumes where the last call stopped."""
        here = (self.epoch, self.shard)
        if self._ahead_from == here:
            return
        self._ahead_from = here
        store, ds, n = self.store, self.ds, self.ds.num_shards
        if self._ahead_to is None or self._ahead_to[:2] <= here:  # restart from this shard
            self._ahead_to = (*here, self.row - self.shard_row + (self._rows or 0))
        epoch, shard, row_end = self._ahead_to
        max_shards = max(1, store.hot_slots // 4)
        max_rows = max(1, store.hot_max_bytes // 4 // (self.seq_len * ds.dtype.itemsize))
        target = self.row + min(self.ahead_rows, max_rows)
        while (epoch * n + shard) - (self.epoch * n + self.shard) < max_shards:
            shard += 1
            if shard == n:
                epoch, shard = epoch + 1, 0
            asked = store.pack_ahead(ds, self.seed, epoch, shard, self.seq_len, self.packing)
            rows = store.rows_now(ds, self.seed, epoch, shard, self.seq_len, self.packing)
            if rows is None or not asked:  # not known until packed, or refused: ask again from here
                shard, epoch = (shard - 1, epoch) if shard else (n - 1, epoch - 1)
                break
            row_end += rows
            if row_end >= target:
                break
        self._ahead_to = (epoch, shard, row_end)

    async def take(self, out: np.ndarray, provenance: list[np.ndarray] | None = None) -> int:
        """Fill ``out`` ([rows, seq_len + 1]) with the next rows; return the epoch of the first.
        With ``provenance``, append the records of where each piece of each row came from."""
        filled, first_epoch = 0, None
        while filled < len(out):
            step = min(len(out) - filled, await self._ready())
            first_epoch = self.epoch if first_epoch is None else first_epoch
            packed = await self.store.packed(self.ds, self.seed, self.epoch, self.shard, self.seq_len, self.packing)
            self._pack_ahead()
            out[filled : filled + step] = packed.row_view(self.shard_row, self.shard_row + step)
            if provenance is not None:
                seg = packed.row_segments(self.shard_row, self.shard_row + step)
                rec = np.empty((len(seg), PROVENANCE_WIDTH), dtype=np.int64)
                rec[:, 0] = seg[:, 0] - self.shard_row + filled
                rec[:, 1:3] = seg[:, 1:3]
                rec[:, 3] = self.source
                rec[:, 4] = self.store.shard_index(self.ds, self.seed, self.epoch, self.shard)
                rec[:, 5:7] = seg[:, 3:5]
                provenance.append(rec)
            filled += step
            self.shard_row += step
            self.row += step
        assert first_epoch is not None, "take() needs at least one row"
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

    async def _assign(self, n: int) -> list[int]:
        """Components of the next ``n`` rows. The rule is sequential (about 1 us a row): a long
        run (a rank of a large job skips the other ranks' rows) is assigned in slices with a turn
        of the event loop between them, so that it never stalls every other stream. (In a thread
        it held the GIL in long numpy-to-list conversions: the loop still stalled 0.35 s.)"""
        counts = [w.row for w in self.parts]
        out: list[int] = []
        while len(out) < n:
            if out:
                await asyncio.sleep(0)
            out += self.mix.schedule.assign(self.row + len(out), counts, min(ASSIGN_ON_LOOP_ROWS, n - len(out)))
        return out

    async def skip(self, n: int) -> None:
        assigned = await self._assign(n)
        for c, part in enumerate(self.parts):
            await part.skip(assigned.count(c))
        self.row += n

    async def take(self, out: np.ndarray, provenance: list[np.ndarray] | None = None) -> int:
        assigned = np.asarray(await self._assign(len(out)))
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
            metrics.MIXTURE_TOKENS.labels(self.mix.name, part.ds.name).inc(len(rows) * (out.shape[1] - 1))
            if provenance is not None and recs:
                rec = np.concatenate(recs)
                rec[:, 0] = rows[rec[:, 0]]  # component-local row -> row in this batch
                provenance.append(rec)
        self.row += len(out)
        return int(epoch or 0)


def make_walker(store: ShardStore, ds: Served, seed: int, seq_len: int, packing: str,
                start: Locator, ahead_rows: int = 0) -> Walker | MixtureWalker:
    """A walker over ``ds`` from ``start``; ``ahead_rows``: how far ahead to keep shards packed.
    The one place that tells a mixture from a dataset: their walks differ (a mixture interleaves
    its components' walks by its weight schedule)."""
    if isinstance(ds, Mixture):
        return MixtureWalker(store, ds, seed, seq_len, packing, start)
    (plain,) = ds.parts
    return Walker(store, plain, seed, seq_len, packing, start, ahead_rows=ahead_rows)
