"""Walkers: a forward-only position in a dataset's (or mixture's) global row sequence that
skips rows by their counts alone and copies out the rows it takes.

A walker is synchronous: it works with what the supply has now (``rows_now``, ``packed_now``)
and, where a shard's count or packed rows are missing, stops and says what it needs
(``Walker.need``). ``server.stream.walk`` yields that need as a request, the stream's driver
(``server.serve.drive``) awaits the supply for it, and the walk calls again: the driver is the
only place a walk waits, and nothing in ``server.stream`` imports asyncio."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from server import metrics
from server.errors import FailedPrecondition
from server.stages.dataset import Dataset
from server.stages.exclusion import Exclusion, KeptRows, Stages, absolute_row, relative_row
from server.stages.mixture import Mixture, WeightSchedule
from server.stages.order import Locator, locate
from server.stages.packing import PackedShard
from server.stages.served import Served
from server.supply.store import ShardStore
from tokenfeed.constants import PROVENANCE_FIELDS

#: int64s per provenance record (``tokenfeed.constants.PROVENANCE_FIELDS`` names them).
PROVENANCE_WIDTH = len(PROVENANCE_FIELDS)
#: Rows a mixture assigns between two turns of the event loop (a few ms of work).
ASSIGN_ON_LOOP_ROWS = 4096
#: Shards a skip crosses (their counts known) between two turns of the event loop.
CROSS_ON_LOOP_SHARDS = 64


@dataclass(frozen=True)
class Takes:
    """The rows a stream takes where it passes over most of the rows it walks (a rank of a
    many-rank job): ``width`` rows from global row ``first + k * period``, k = 0, 1, ..."""

    first: int
    width: int
    period: int


@dataclass(frozen=True)
class Need:
    """What a walk lacks to go on: shard ``ordinal`` of ``epoch`` of ``walker``'s dataset, its
    packed rows (``packed``) or only its row count."""

    walker: Walker
    epoch: int
    ordinal: int
    packed: bool


class _Lacking(Exception):
    """Raised inside a walk where the supply lacks something (``need`` says what); the public
    calls catch it and return False. Nothing moved since the last consistent state."""


class Walker:
    """Position in one dataset's sequence: epoch, shard ordinal, row inside that shard."""

    def __init__(self, store: ShardStore, ds: Dataset, seed: int, seq_len: int, packing: str,
                 start: Locator, source: int = 0, ahead_rows: int = 0, stages: Stages = (),
                 owner_row: int | None = None, takes: Takes | None = None) -> None:
        self.store, self.ds, self.seed, self.seq_len, self.packing = store, ds, seed, seq_len, packing
        self.ahead_rows = ahead_rows  # rows past the current shard to keep packed ahead
        # the rows it takes, where it passes over others: only their shards are packed ahead
        self.takes = takes if takes is not None and takes.period > takes.width else None
        self._ahead_take = 0  # the next take whose shards were not asked for yet
        self.row, self.epoch, self.shard, self.shard_row = start.row, start.epoch, start.shard, start.shard_row
        self.source = source
        #: what the last ``skip_now``/``take_now_rows`` that did not finish lacks (None: nothing,
        #: it only gave the event loop a turn)
        self.need: Need | None = None
        #: the epoch of the first row the last finished ``take_now_rows`` took
        self.first_epoch = 0
        self._rows: int | None = None
        self._empty = 0  # empty shards passed in a row (a dataset of nothing but empty shards stops)
        self._packed: tuple[int, int, PackedShard] | None = None  # given by ``supply`` for this shard
        self._counted: tuple[int, int, int] | None = None  # a shard's packed rows, counted by ``supply``
        self._to_skip = 0
        self._filled = 0  # rows of the take in progress already copied
        self._ahead_from: tuple[int, int] | None = None  # the shard the last pack-ahead started from
        self._ahead_to: tuple[int, int, int] | None = None  # furthest shard asked for, global row at its end
        # Tells the cache (eviction by next use) and the prefetcher where this walker is; close()
        # ends it, and so does dropping the walker (a safety net for callers that do not close).
        self._follow = store.follow(ds, seed)
        weakref.finalize(self, self._follow.close)
        # The plan's exclusions: stage ``_stage`` is in effect (-1: none yet); positions inside a
        # shard count the rows that stage keeps. The stages' rows are this walk's, or with
        # ``owner_row`` (a mixture's row: its components' rows are not the job's) its owner's, which
        # says when the next one begins (``next_stage_now``).
        self._stages, self._by_owner = stages, owner_row is not None
        here = self.row if owner_row is None else owner_row
        self._stage = sum(1 for r, _ in stages if r < here) - 1
        self._kept: tuple[tuple[int, int, int], KeptRows] | None = None  # the last shard's kept rows

    def locator(self) -> Locator:
        return Locator(self.row, self.epoch, self.shard, self.shard_row)

    def close(self) -> None:
        """The stream ended: its pending prefetches are cancelled."""
        self._follow.close()

    @property
    def has_stages(self) -> bool:
        """Whether a data plan's exclusions apply to this walk (now or from a later row)."""
        return bool(self._stages)

    def move_to(self, where: Locator, rows: int) -> None:
        """Go to ``where`` (a position another walk of the same sequence worked out: a job's step
        plan, ``server.stream.steps``), in a shard of ``rows`` rows, and tell the follower."""
        self.row, self.epoch, self.shard, self.shard_row = where.row, where.epoch, where.shard, where.shard_row
        self._rows, self._packed = rows, None
        self._follow.at(self.epoch, self.shard)

    # ---- what the supply gives after a ``need`` --------------------------------------------------
    def supply_rows(self, need: Need, rows: int) -> None:
        self._counted = (need.epoch, need.ordinal, rows)

    def supply_packed(self, need: Need, packed: PackedShard) -> None:
        if (need.epoch, need.ordinal) == (self.epoch, self.shard):
            self._packed = (need.epoch, need.ordinal, packed)

    def _set_rows(self, rows: int) -> None:
        if self.shard_row > rows:
            raise FailedPrecondition(
                f"cursor points at row {self.shard_row} of shard {self.shard} (epoch {self.epoch}) of "
                f"{self.ds.name!r}, which has {rows} rows: the cursor does not belong to this dataset")
        self._rows = rows

    def _lack(self, packed: bool) -> _Lacking:
        self.need = Need(self, self.epoch, self.shard, packed)
        return _Lacking()

    def _packed_here(self) -> PackedShard:
        """The current shard's packed rows: given by the supply, or in the hot tier."""
        if self._packed is not None and self._packed[:2] == (self.epoch, self.shard):
            return self._packed[2]
        packed = self.store.packed_now(self.ds, self.seed, self.epoch, self.shard, self.seq_len, self.packing)
        if packed is None:
            raise self._lack(packed=True)
        return packed

    # ---- the data plan's exclusions ------------------------------------------------------------
    @property
    def exclusion(self) -> Exclusion:
        """The exclusion in effect (an empty one when none is)."""
        return self._stages[self._stage][1] if self._stage >= 0 else Exclusion()

    def next_stage_now(self) -> None:
        """The next exclusion stage begins here: the position in this shard is counted in the rows
        it keeps (the rows before it were read or passed over under the previous stage)."""
        old, new = self.exclusion, self._stages[self._stage + 1][1]
        index = self.store.shard_index(self.ds, self.seed, self.epoch, self.shard)
        if old.touches(index) or new.touches(index):
            before = self._kept_rows(old, index)
            after = self._kept_rows(new, index)
            absolute = absolute_row(before[0] if before else None, index in old.shards, self.shard_row,
                                    before[1] if before else 0)
            self.shard_row = relative_row(after[0] if after else None, index in new.shards, absolute)
        self._stage += 1
        self._rows = None

    def _kept_rows(self, excl: Exclusion, index: int) -> tuple[KeptRows, int] | None:
        """The current shard's rows that ``excl`` keeps and its packed row count, where it drops documents."""
        docs = excl.docs.get(index)
        if docs is None:
            return None
        key = (self.epoch, self.shard, id(docs))
        if self._kept is None or self._kept[0] != key:
            self._kept = key, KeptRows(self._packed_here(), docs, self.ds.info.pad_id)
        return self._kept[1], self._kept[1]._packed.rows

    def _begin_stages(self) -> None:
        """Begin every stage whose row this walk has reached (a plain walk: its rows are the job's)."""
        stages = self._stages
        while not self._by_owner and self._stage + 1 < len(stages) and stages[self._stage + 1][0] <= self.row:
            self.next_stage_now()

    def _next_begin(self) -> int | None:
        """The row where this walk's next stage begins (None: none, or its owner says when)."""
        if self._by_owner or self._stage + 1 >= len(self._stages):
            return None
        return self._stages[self._stage + 1][0]

    # ---- the walk ------------------------------------------------------------------------------
    def _count(self) -> int:
        """The current shard's rows under the exclusion in effect (raises ``_Lacking``)."""
        excl = self.exclusion
        if excl:
            index = self.store.shard_index(self.ds, self.seed, self.epoch, self.shard)
            if index in excl.shards:
                return 0
            kept = self._kept_rows(excl, index)
            if kept is not None:
                return kept[0].rows
        rows = self.store.rows_now(self.ds, self.seed, self.epoch, self.shard, self.seq_len, self.packing)
        if rows is not None:
            return rows
        if self._counted is not None and self._counted[:2] == (self.epoch, self.shard):
            return self._counted[2]
        if self._packed is not None and self._packed[:2] == (self.epoch, self.shard):
            return self._packed[2].rows
        raise self._lack(packed=False)

    def _ready(self) -> int:
        """Move past exhausted shards; return the rows left in the current one (> 0). Raises
        ``_Lacking`` where a shard's count is not known yet."""
        while True:
            if self._rows is None:
                self._follow.at(self.epoch, self.shard)
                self._set_rows(self._count())
            assert self._rows is not None
            if left := self._rows - self.shard_row:
                self._empty = 0
                return left
            self._empty += self._rows == 0  # (the shard just finished is not empty)
            if self._empty > self.ds.num_shards:
                why = " (the data plan excludes every row of it)" if self.exclusion else ""
                raise FailedPrecondition(f"dataset {self.ds.name!r} has no tokens to serve{why}")
            self.shard, self.shard_row, self._rows, self._packed = self.shard + 1, 0, None, None
            if self.shard == self.ds.num_shards:
                self.epoch, self.shard = self.epoch + 1, 0

    def skip_now(self, n: int) -> bool:
        """Pass over ``n`` more rows (with those a previous call left). True when done; False when
        a shard's count is missing (``need``) or after ``CROSS_ON_LOOP_SHARDS`` shards (``need``
        None: give the loop a turn), to be called again (with 0)."""
        assert n >= 0, n
        self.need, self._to_skip = None, self._to_skip + n
        try:
            return self._skip_some()
        except _Lacking:
            return False

    def _skip_some(self) -> bool:
        for _ in range(CROSS_ON_LOOP_SHARDS):
            if self._to_skip and (begin := self._next_begin()) is not None and begin <= self.row:
                self._begin_stages()  # (a stage begins where a skip passes its row: split there)
            if not self._to_skip:
                return True
            n = self._to_skip
            begin = self._next_begin()
            if begin is not None and self.row < begin < self.row + n:
                n = begin - self.row
            rows = None if self.exclusion else self._rows if self._rows is not None else self._rows_from_counts()
            if (rows is not None
                    and n > rows - self.shard_row  # past this shard (whose row count is checked),
                    and (where := self._locate(self.epoch, self.shard, self.shard_row + n)) is not None):
                # every count known: jump (the ranks of a large job skip most rows)
                self.epoch, self.shard, self.shard_row, self._rows = where
                self._packed = None
                self.row += n
                self._to_skip -= n
                self._follow.at(self.epoch, self.shard)
                continue
            step = min(n, self._ready())
            self.shard_row += step
            self.row += step
            self._to_skip -= step
        return not self._to_skip

    def _rows_from_counts(self) -> int | None:
        """The current shard's rows from the epoch's counts, where every shard's is known, checked
        against the position (as ``_set_rows``), without telling the follower: a stream that begins
        with a skip past its start shard (every rank but the first of a job) is first seen where
        the skip lands, never at its start (which would take it for a stream that read there and
        left, and drop that epoch's packed shards while other ranks are still starting)."""
        cum = self.store.epoch_rows(self.ds, self.seed, self.epoch, self.seq_len, self.packing)
        if cum is None:
            return None
        rows = cum[self.shard + 1] - cum[self.shard]
        if self.shard_row > rows:
            self._set_rows(rows)  # raises: the cursor is not of this dataset
        return rows

    def take_now(self, out: np.ndarray, firsts: list[int],
                 ends: list[int]) -> tuple[list[Locator], list[int]] | None:
        """The fast path, without awaiting: batch ``i`` is rows ``firsts[i] ...`` (``out[i]``) and
        is followed by the position ``ends[i]``. Works when every row it crosses lies in a shard
        whose row count is known and every row it takes lies in a shard packed in memory (the
        batches may span shards); returns the locators at ``ends`` and each batch's epoch (that of
        its first row, as ``take`` returns: a message's batches may straddle an epoch's end), else
        None and nothing moved."""
        if self._rows is None or firsts[0] < self.row or self._stages:
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
            packed.copy_rows(first_row, first_row + n, out[i, at : at + n])
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
        if self.takes is not None and not self._stages and self._pack_ahead_takes(self.takes):
            return
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

    def _pack_ahead_takes(self, takes: Takes) -> bool:
        """``_pack_ahead`` for a stream that takes ``takes``: the shards of the rows it takes within
        ``ahead_rows``, each found by ``locate``, not the shards of every row it passes (a rank of a
        W-rank job passes W - 1 batches for each it takes: walking them all, each of its messages
        crossed up to a thousand shards, and the job's start grew with W squared; the other ranks
        pack ahead their own rows). Resumes at the first take not asked for yet. False where the
        counts to locate them are not all known yet (the caller walks shard by shard)."""
        store, ds, n = self.store, self.ds, self.ds.num_shards
        base = self.row - self.shard_row  # global row where the current shard begins
        if store.epoch_rows(ds, self.seed, self.epoch, self.seq_len, self.packing) is None:
            return False
        max_shards = max(1, store.hot_slots // 4)
        max_rows = max(1, store.hot_max_bytes // 4 // (self.seq_len * ds.dtype.itemsize))
        end = self.row + min(self.ahead_rows, max_rows)
        # the take under way or next (one whose last row lies ahead), unless later ones were asked for
        k = max(self._ahead_take, -(-(self.row - takes.first - takes.width + 1) // takes.period), 0)
        asked = 0
        while (row := takes.first + k * takes.period) < end and asked < max_shards:
            start = max(row, self.row)
            first = self._locate(self.epoch, self.shard, start - base + 1)  # the shard of its first row
            if first is None:
                break
            last: tuple[int, int, int, int] | None = first  # its last row's, mostly the same: no search
            if first[2] + (row + takes.width - 1 - start) > first[3]:
                last = self._locate(self.epoch, self.shard, row + takes.width - base)
            if last is None:
                break
            epoch, shard = first[:2]
            while True:
                if not store.pack_ahead(ds, self.seed, epoch, shard, self.seq_len, self.packing):
                    self._ahead_take = k  # refused (enough in flight): from this take next time
                    return True
                asked += 1
                if (epoch, shard) >= last[:2]:
                    break
                shard += 1
                if shard == n:
                    epoch, shard = epoch + 1, 0
            k += 1
        self._ahead_take = k
        return True

    def take_now_rows(self, out: np.ndarray, provenance: list[np.ndarray] | None = None) -> bool:
        """Fill ``out`` ([rows, seq_len + 1]) with the next rows, as far as packed shards are at
        hand; True when it is full (``first_epoch``: the epoch of its first row), False when a
        shard is missing (``need``): call again with the same ``out`` and ``provenance`` after
        the supply gave it. With ``provenance``, append the records of where each piece of each
        row came from."""
        self.need = None
        try:
            if not self._filled:
                self._begin_stages()
            return self._take_some(out, provenance)
        except _Lacking:
            return False

    def _take_some(self, out: np.ndarray, provenance: list[np.ndarray] | None) -> bool:
        while self._filled < len(out):
            left = self._ready()
            packed: PackedShard | KeptRows = self._packed_here()
            if excl := self.exclusion:
                kept = self._kept_rows(excl, self.store.shard_index(self.ds, self.seed, self.epoch, self.shard))
                if kept is not None:
                    packed = kept[0]
            if not self._filled:
                self.first_epoch = self.epoch
            self._pack_ahead()
            filled, step = self._filled, min(len(out) - self._filled, left)
            packed.copy_rows(self.shard_row, self.shard_row + step, out[filled : filled + step])
            if provenance is not None:
                seg = packed.row_segments(self.shard_row, self.shard_row + step)
                rec = np.empty((len(seg), PROVENANCE_WIDTH), dtype=np.int64)
                rec[:, 0] = seg[:, 0] - self.shard_row + filled
                rec[:, 1:3] = seg[:, 1:3]
                rec[:, 3] = self.source
                rec[:, 4] = self.store.shard_index(self.ds, self.seed, self.epoch, self.shard)
                rec[:, 5:7] = seg[:, 3:5]
                provenance.append(rec)
            self._filled += step
            self.shard_row += step
            self.row += step
        self._filled = 0
        return True

class MixtureWalker:
    """Position in a mixture: the mixture row, and one walker per component. Row ``g`` comes from
    the component the weight schedule assigns it to (a function of the components' counts)."""

    def __init__(self, store: ShardStore, mix: Mixture, seed: int, seq_len: int, packing: str,
                 start: Locator, schedule: WeightSchedule | None = None,
                 stages: dict[str, Stages] | None = None) -> None:
        self.store, self.mix, self.schedule = store, mix, schedule or mix.schedule
        self.row = start.row
        starts, stages = dict(start.components), stages or {}
        self.parts = [Walker(store, ds, seed, seq_len, packing, starts.get(ds.name, Locator()), source=i,
                             stages=stages.get(ds.name, ()), owner_row=self.row)
                      for i, ds in enumerate(mix.components)]
        #: mixture rows where a component's next exclusion stage begins, in order
        self._begins = sorted((r, c) for c, ds in enumerate(mix.components) for r, _ in stages.get(ds.name, ())
                              if r >= self.row)
        self.need: Need | None = None
        self.first_epoch = 0
        self._to_skip = 0  # rows not assigned to components yet
        #: the take in progress: each component's rows of ``out``, its rows and its provenance
        self._taking: list[tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]] | None = None
        self._taken = 0  # components whose part of the take in progress is done (in order)

    def locator(self) -> Locator:
        return Locator(row=self.row, components=tuple((w.ds.name, w.locator()) for w in self.parts))

    def close(self) -> None:
        for part in self.parts:
            part.close()

    def _assign(self, n: int) -> np.ndarray:
        """Components of the next ``n`` rows (the rule is sequential, about 1 us a row)."""
        counts = [w.row + w._to_skip for w in self.parts]  # (rows assigned, passed over or not)
        return np.asarray(self.schedule.assign(self.row, counts, n), dtype=np.int64)

    def _begin_stages(self) -> bool:
        """Begin each component's exclusion stage whose mixture row this walk has reached; False
        when a component lacks a shard to do it (``need``)."""
        while self._begins and self._begins[0][0] <= self.row:
            part = self.parts[self._begins[0][1]]
            try:
                part.next_stage_now()
            except _Lacking:
                self.need = part.need
                return False
            self._begins.pop(0)
        return True

    def skip_now(self, n: int) -> bool:
        """As ``Walker.skip_now``. A long run (a rank of a large job skips the other ranks' rows)
        is assigned ``ASSIGN_ON_LOOP_ROWS`` at a time with a turn of the event loop between them,
        so that it never stalls every other stream. (In a thread it held the GIL in long
        numpy-to-list conversions: the loop still stalled 0.35 s.)"""
        assert n >= 0, n
        self.need, self._to_skip = None, self._to_skip + n
        while True:
            for part in self.parts:  # each component passes over the rows assigned to it
                if part._to_skip and not part.skip_now(0):
                    self.need = part.need
                    return False
            if not self._to_skip:
                return True
            if not self._begin_stages():
                return False
            step = min(self._to_skip, ASSIGN_ON_LOOP_ROWS)
            if self._begins and self.row < self._begins[0][0] < self.row + step:  # a stage begins inside
                step = self._begins[0][0] - self.row
            assigned = self._assign(step)
            for c, part in enumerate(self.parts):
                part._to_skip += int(np.count_nonzero(assigned == c))
            self.row += step
            self._to_skip -= step
            if self._to_skip:  # the next slice after a turn of the loop
                return False

    def take_now_rows(self, out: np.ndarray, provenance: list[np.ndarray] | None = None) -> bool:
        """As ``Walker.take_now_rows``: each component fills its rows of ``out``."""
        self.need = None
        if self._taking is None:
            if not self._begin_stages():
                return False
            assigned = self._assign(len(out))
            self._taking = [(rows, np.empty((len(rows), out.shape[1]), dtype=out.dtype),
                             [] if provenance is not None else None)
                            for c in range(len(self.parts)) for rows in [np.flatnonzero(assigned == c)]]
        while self._taken < len(self.parts):
            rows, tmp, recs = self._taking[self._taken]
            part = self.parts[self._taken]
            if len(rows) and not part.take_now_rows(tmp, recs):
                self.need = part.need
                return False
            self._taken += 1
        epoch = None
        for c, (part, (rows, tmp, recs)) in enumerate(zip(self.parts, self._taking)):
            if not len(rows):
                continue
            epoch = part.first_epoch if epoch is None else min(epoch, part.first_epoch)
            out[rows] = tmp
            self.mix.rows_served[c] += len(rows)
            metrics.MIXTURE_TOKENS.labels(self.mix.name, part.ds.name).inc(len(rows) * (out.shape[1] - 1))
            if provenance is not None and recs:
                rec = np.concatenate(recs)
                rec[:, 0] = rows[rec[:, 0]]  # component-local row -> row in this batch
                provenance.append(rec)
        self._taking, self._taken = None, 0
        self.row += len(out)
        self.first_epoch = int(epoch or 0)
        return True


def make_walker(store: ShardStore, ds: Served, seed: int, seq_len: int, packing: str,
                start: Locator, ahead_rows: int = 0, schedule: WeightSchedule | None = None,
                stages: dict[str, Stages] | None = None, takes: Takes | None = None) -> Walker | MixtureWalker:
    """A walker over ``ds`` from ``start``; ``ahead_rows``: how far ahead to keep shards packed
    (``takes``: only those of the rows the stream takes);
    ``schedule`` and ``stages``: a data plan's mixture weights and exclusions (by dataset name).
    The one place that tells a mixture from a dataset: their walks differ (a mixture interleaves
    its components' walks by its weight schedule)."""
    if isinstance(ds, Mixture):
        return MixtureWalker(store, ds, seed, seq_len, packing, start, schedule, stages)
    (plain,) = ds.parts
    return Walker(store, plain, seed, seq_len, packing, start, ahead_rows=ahead_rows,
                  stages=(stages or {}).get(plain.name, ()), takes=takes)
