"""The global order as arithmetic (server/stages/order.py): properties over counts, seeds and world
sizes, with no files, cache, store or event loop."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from server.stages.order import Dealing, doc_order, epoch_rows, locate, shard_order

counts = st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(origin=st.integers(0, 10**6), world=st.integers(1, 64), batch=st.integers(1, 16), steps=st.integers(1, 20))
def test_every_row_of_the_job_is_dealt_to_exactly_one_rank_and_step(origin, world, batch, steps):
    deal = Dealing(origin, world, batch)
    taken = Counter(deal.first_row(t, r) + i for t in range(steps) for r in range(world) for i in range(batch))
    assert set(taken) == set(range(origin, origin + steps * world * batch))
    assert set(taken.values()) == {1}
    for t in range(steps):  # a cursor after step t is where step t + 1 begins
        assert deal.end_of_step(t) == deal.first_row(t + 1, 0)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 1000), n=st.integers(1, 200))
def test_orders_are_permutations_fixed_by_seed_and_epoch(seed, epoch, n):
    order = shard_order(seed, epoch, n)
    assert sorted(order.tolist()) == list(range(n))
    assert order.tolist() == shard_order(seed, epoch, n).tolist()
    assert sorted(doc_order(seed, epoch, 3, n).tolist()) == list(range(n))


def walk(rows_of, seed: int, epoch: int, shard: int, offset: int) -> tuple[int, int, int, int]:
    """Where ``offset`` rows after the start of a shard lie, found one shard at a time, the way a
    walker moves (it stops at the end of a shard when the row falls on a boundary)."""
    n_shards, row, left = len(rows_of), 0, offset
    while True:
        cum = epoch_rows(seed, epoch, rows_of)
        n = cum[shard + 1] - cum[shard]
        if left <= n - row:
            return epoch, shard, row + left, n
        left -= n - row
        shard, row = shard + 1, 0
        if shard == n_shards:
            epoch, shard = epoch + 1, 0


@settings(max_examples=300, deadline=None)
@given(rows_of=counts, seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 50), data=st.data())
def test_locate_lands_where_the_walk_does(rows_of, seed, epoch, data):
    total = sum(rows_of)
    shard = data.draw(st.integers(0, len(rows_of) - 1))
    cum = epoch_rows(seed, epoch, rows_of)
    here = cum[shard + 1] - cum[shard]
    # past the current shard (where the walker asks), up to a few epochs ahead
    offset = data.draw(st.integers(here + 1, here + 1 + 4 * total))
    found = locate(lambda e: epoch_rows(seed, e, rows_of), epoch, shard, offset)
    if total == 0:
        assert found is None  # an epoch without rows: the walker reports it
        return
    assert found == walk(rows_of, seed, epoch, shard, offset)


@settings(max_examples=100, deadline=None)
@given(rows_of=counts, seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 50))
def test_every_epoch_holds_every_shards_rows_once(rows_of, seed, epoch):
    cum = epoch_rows(seed, epoch, rows_of)
    order = shard_order(seed, epoch, len(rows_of))
    assert cum[-1] == sum(rows_of)
    assert [cum[k + 1] - cum[k] for k in range(len(rows_of))] == [rows_of[i] for i in order.tolist()]


def test_an_unknown_count_on_the_way_is_none():
    known = {0: [0, 5, 9]}
    assert locate(known.get, 0, 0, 12) is None  # epoch 1's counts are not known
    assert locate(known.get, 0, 0, 7) == (0, 1, 2, 4)
