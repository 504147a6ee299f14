"""A job's steps, planned once for all of its ranks on this server.

Every rank of a W-rank job walks the same global sequence and takes ``batch_size`` rows of each
step: where a step's rows lie (which shards, from which row) is the same arithmetic for all of
them. Done per rank, each of a 64-rank job's messages located every batch's rows, looked up the
end of every step and asked for the shards ahead of every take: about 300 us of the event loop
a message, W times the same answers. ``StepPlans`` works each step out once (``StepPlan``: the
step's pieces, shard by shard, and the position after it) and keeps the shards of the steps
ahead packed once for the job; a rank's take is then a lookup and a copy per batch.

Only for what the counts alone decide: a plain dataset (not a mixture), no exclusions, no
provenance, an epoch's counts all known (``ShardStore.epoch_rows``: concat and pad packing).
Anything else, or a row not packed in memory, is the walker's own walk (``Walker.take_now``)."""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from server.stages.order import Dealing, Locator
from server.stages.packing import PackedShard
from server.stream.walker import Walker
from server.supply.store import PackedKey, ShardStore

#: Plans a job keeps (its ranks read within a few hundred steps of one another: the rings'
#: messages, 8 of 64 batches at most, bound how far one runs ahead); older ones are worked
#: out again when a late rank asks.
MAX_PLANS = 4096
#: A job's ranks on one server share plans from this world size on (one stream reads its steps
#: one after another, in one or two shards: its own walk is as fast).
MIN_WORLD = 4

#: A position as ``order.locate`` gives it: (epoch, shard, shard_row, rows of that shard).
Position = tuple[int, int, int, int]


@dataclass(frozen=True)
class StepPlan:
    """Where one step's rows lie: piece ``j`` is ``pieces[j] = (epoch, shard, shard_row, n)``,
    the step's rows ``offsets[j] ... offsets[j] + n`` (no empty pieces); ``end`` is the position
    after the step (``locator`` the job's cursor there)."""

    offsets: list[int]
    pieces: list[tuple[int, int, int, int]]
    end: Position
    locator: Locator
    keys: list[PackedKey]  # the hot tier's key of each piece's shard (worked out once for the job's ranks)


class _Counts:
    """Positions from an epoch's counts alone: every shard's is known, so every epoch holds the
    same rows ``total``, and absolute position ``epoch * total + x`` is one division and one
    bisection of that epoch's cumulative rows."""

    __slots__ = ("_cums", "_key", "_store", "total")

    def __init__(self, store: ShardStore, key: tuple[object, ...], cum: list[int], epoch: int) -> None:
        self._store, self._key = store, key
        self._cums: dict[int, list[int] | None] = {epoch: cum}
        self.total = cum[-1]

    def cum(self, epoch: int) -> list[int] | None:
        if epoch in self._cums:
            return self._cums[epoch]
        ds, seed, seq_len, packing = self._key
        cum = self._store.epoch_rows(ds, seed, epoch, seq_len, packing)  # type: ignore[arg-type]
        if len(self._cums) > 8:
            self._cums.pop(min(self._cums))
        self._cums[epoch] = cum
        return cum

    def start(self, at: int) -> Position | None:
        """The shard holding the row at absolute position ``at`` (past empty shards)."""
        epoch, x = divmod(at, self.total)
        cum = self.cum(epoch)
        if cum is None:
            return None
        s = bisect.bisect_right(cum, x) - 1
        return epoch, s, x - cum[s], cum[s + 1] - cum[s]

    def end(self, at: int) -> Position | None:
        """The position after the row before ``at`` (> 0): the end of a shard where ``at`` falls
        on a boundary, as a walk leaves it (``order.locate``)."""
        epoch, x = divmod(at - 1, self.total)
        cum = self.cum(epoch)
        if cum is None:
            return None
        s = bisect.bisect_left(cum, x + 1) - 1
        return epoch, s, x + 1 - cum[s], cum[s + 1] - cum[s]


class StepPlans:
    """The plans of one job's steps on this server (``plans_for``), shared by its ranks here."""

    def __init__(self, store: ShardStore, walker: Walker, deal: Dealing, counts: _Counts, origin: int,
                 ahead_rows: int) -> None:
        self.store, self.deal, self._counts = store, deal, counts
        self.ds, self.seed, self.seq_len, self.packing = walker.ds, walker.seed, walker.seq_len, walker.packing
        self._origin = origin  # absolute position of global row 0
        self._plans: dict[int, StepPlan] = {}
        # the rows of each step that this server's ranks take (the job's other ranks may read elsewhere)
        self._lo, self._hi = deal.rows_per_step, 0
        max_rows = max(1, store.hot_max_bytes // 4 // (self.seq_len * self.ds.dtype.itemsize))
        self._ahead_steps = max(1, min(ahead_rows, max_rows) // deal.rows_per_step)
        self._asked = -1  # the last step whose shards were asked for ahead
        self._last_asked: tuple[int, int] | None = None  # its last shard (the next step's may be the same)

    def join(self, rank: int) -> None:
        """Rank ``rank`` reads here: the steps' shards it takes rows of are packed ahead."""
        b = self.deal.batch_size
        self._lo, self._hi = min(self._lo, rank * b), max(self._hi, (rank + 1) * b)

    def plan(self, step: int) -> StepPlan | None:
        """Step ``step``'s plan; None where a count it needs is not known. (Plans exist once an
        epoch's counts are all known, and a count, once known, never changes: they stay right.)"""
        hit = self._plans.get(step)
        if hit is not None:
            return hit
        counts, rows = self._counts, self.deal.rows_per_step
        at = self._origin + self.deal.first_row(step, 0)
        offsets: list[int] = []
        pieces: list[tuple[int, int, int, int]] = []
        where = counts.start(at)
        done = 0
        while where is not None:
            epoch, shard, shard_row, n = where
            n = min(n - shard_row, rows - done)
            if n:
                offsets.append(done)
                pieces.append((epoch, shard, shard_row, n))
                done += n
            if done == rows:
                break
            cum = counts.cum(epoch)
            where = None if cum is None else counts.start(epoch * counts.total + cum[shard + 1])
        end = counts.end(at + rows)
        if where is None or end is None:
            return None
        keys = [self.store.packed_key(self.ds, self.seed, e, shard, self.seq_len, self.packing)
                for e, shard, _, _ in pieces]
        plan = StepPlan(offsets, pieces, end, Locator(self.deal.end_of_step(step), *end[:3]), keys)
        if len(self._plans) >= MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        self._plans[step] = plan
        return plan

    def take(self, walker: Walker, out: np.ndarray, steps: list[int],
             rank: int) -> tuple[list[Locator], list[int]] | None:
        """``Walker.take_now`` for rank ``rank``'s batches of ``steps``: fill ``out[i]`` with its
        rows of step ``steps[i]``; the locators after each step and each batch's epoch (its first
        row's). None where a plan is not at hand or a row is not packed in memory: nothing moved."""
        if walker.row > self.deal.first_row(steps[0], rank):
            return None
        store, offset, width = self.store, rank * self.deal.batch_size, out.shape[1]
        copies: list[tuple[int, int, PackedShard, int, int]] = []  # (batch, row in batch, packed, shard row, n)
        epochs: list[int] = []
        locators: list[Locator] = []
        found: dict[PackedKey, PackedShard] = {}  # (a message's steps mostly lie in a few shards)
        plan: StepPlan | None = None
        for i, step in enumerate(steps):
            plan = self.plan(step)
            if plan is None:
                return None
            j = bisect.bisect_right(plan.offsets, offset) - 1
            epochs.append(plan.pieces[j][0])
            filled = 0
            while filled < width:
                epoch, shard, shard_row, n = plan.pieces[j]
                skip = offset + filled - plan.offsets[j]
                k = min(width - filled, n - skip)
                key = plan.keys[j]
                packed = found.get(key)
                if packed is None:
                    hit = store.packed_at(key)
                    if hit is None:  # (the walker's own walk waits for it; these and the next are asked for)
                        self._pack_ahead(steps[0], steps[-1])
                        return None
                    packed = found[key] = hit
                copies.append((i, filled, packed, shard_row + skip, k))
                filled += k
                j += 1
            locators.append(plan.locator)
        for i, at, packed, first_row, n in copies:
            packed.copy_rows(first_row, first_row + n, out[i, at : at + n])
        assert plan is not None
        walker.move_to(plan.locator, plan.end[3])
        self._pack_ahead(steps[0], steps[-1])
        return locators, epochs

    def _pack_ahead(self, first: int, last: int) -> None:
        """Keep the shards of steps ``first ... last`` and of the next steps packed, once for the
        job: those of the rows its ranks here take, up to ``ahead_rows`` after ``last`` (at most a
        quarter of the hot tier's bytes, and a quarter of its shards asked a call, as a walker's
        own pack-ahead). Each step's are asked for once (a refusal: again from there next time)."""
        target = last + self._ahead_steps
        if self._asked < first - 1:
            self._asked = first - 1
        asked, max_shards = 0, max(1, self.store.hot_slots // 4)
        while self._asked < target and asked < max_shards:
            plan = self.plan(self._asked + 1)
            if plan is None:
                return
            for (epoch, shard, _, n), offset in zip(plan.pieces, plan.offsets):
                if offset < self._hi and offset + n > self._lo and (epoch, shard) != self._last_asked:
                    if not self.store.pack_ahead(self.ds, self.seed, epoch, shard, self.seq_len, self.packing):
                        return  # refused (enough in flight): from this step next time
                    self._last_asked = (epoch, shard)
                    asked += 1
            self._asked += 1


_JOBS: weakref.WeakKeyDictionary[ShardStore, weakref.WeakValueDictionary[Hashable, StepPlans]] = \
    weakref.WeakKeyDictionary()


def plans_for(store: ShardStore, walker: Walker, deal: Dealing, rank: int, ahead_rows: int) -> StepPlans | None:
    """The plans of the job that ``walker`` (a rank's, at its start) deals by ``deal``, shared
    with its other ranks on ``store``'s server (as long as one holds them); None where plans do
    not apply (see the module docstring) or its epoch's counts are not known yet."""
    if walker.has_stages or deal.world_size < MIN_WORLD:
        return None
    ds, seed, seq_len, packing = walker.ds, walker.seed, walker.seq_len, walker.packing
    cum = store.epoch_rows(ds, seed, walker.epoch, seq_len, packing)
    if cum is None or not cum[-1] or walker.shard_row > cum[walker.shard + 1] - cum[walker.shard]:
        return None
    # global row 0's absolute position: the same for every rank of a job that starts from one cursor
    origin = walker.epoch * cum[-1] + cum[walker.shard] + walker.shard_row - walker.row
    key = (ds.fingerprint, seed, seq_len, packing, origin, deal)
    jobs = _JOBS.setdefault(store, weakref.WeakValueDictionary())
    plans = jobs.get(key)
    if plans is None:
        counts = _Counts(store, (ds, seed, seq_len, packing), cum, walker.epoch)
        plans = jobs[key] = StepPlans(store, walker, deal, counts, origin, ahead_rows)
    plans.join(rank)
    return plans
