"""Token-budget batches: every piece once, at most max_tokens per rank, LPT balance, exact resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client import StreamingDataLoader, StreamingDataset
from benchmarks._common import greedy, imbalance
from server.stages.order import lpt
from tests.conftest import jsonl_config
from tests.resume_helpers import check_resume, same_batches, save_after, take

SEQ, BUDGET = 256, 1024


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=60), ranks=st.integers(1, 8))
def test_lpt_is_never_worse_than_greedy_by_much(lengths, ranks):
    owner = lpt(lengths, ranks)
    assert len(owner) == len(lengths) and all(0 <= r < ranks for r in owner)  # every piece, to one rank
    # The `ranks` longest pieces go one to each rank (every rank is empty when they come), so no
    # rank is idle while there are pieces for it.
    longest = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))[:ranks]
    assert len({owner[i] for i in longest}) == len(longest)
    loads = np.bincount(owner, weights=lengths, minlength=ranks)
    assert loads.max() <= loads.mean() + max(lengths)  # Graham's bound for list scheduling
    # Graham's LPT bound, makespan <= (4/3 - 1/(3m)) OPT, against greedy's assignment (which is
    # at least OPT): never worse than greedy by more than a third, whatever greedy's budget.
    for budget in (max(lengths), -(-sum(lengths) // ranks), sum(lengths)):
        baseline = np.bincount(greedy(lengths, ranks, budget), weights=lengths, minlength=ranks).max()
        assert loads.max() <= (4 / 3 - 1 / (3 * ranks)) * baseline + 1e-9


def test_lpt_balances_better_than_greedy():
    rng = random.Random(0)
    lpt_ratios, greedy_ratios = [], []
    for _ in range(200):
        lengths = [int(rng.lognormvariate(5, 1)) % 1000 + 1 for _ in range(30)]
        budget = -(-sum(lengths) // 4) + 1000
        lpt_ratios.append(imbalance(lengths, lpt(lengths, 4), 4))
        greedy_ratios.append(imbalance(lengths, greedy(lengths, 4, budget), 4))
    assert np.median(lpt_ratios) < 1.05 < np.median(greedy_ratios)


@pytest.fixture
def budget_server(start_server, corpus):
    path, docs = corpus
    return start_server(jsonl_config(path, shard_bytes=32 << 10)), docs


def dataset(address: str, world: int, rank: int, **kw) -> StreamingDataset:
    return StreamingDataset(address, "docs", seq_len=SEQ, max_tokens=BUDGET, seed=2, rank=rank, world_size=world, **kw)


def test_steps_respect_the_budget_and_cover_every_document(budget_server):
    server, docs = budget_server
    world = 3
    per_rank = [take(dataset(server.address, world, r), 150) for r in range(world)]
    tokens_per_step = []
    for step in range(150):
        loads = []
        for r in range(world):
            batch = per_rank[r][step]
            assert batch["input_ids"].shape == (1, BUDGET)
            loads.append(int((batch["input_ids"] != 257).sum()))
            # segments: cu_seqlens starts at each piece and after each EOS
            assert batch["cu_seqlens"][-1] == BUDGET
        assert max(loads) <= BUDGET
        tokens_per_step.append(loads)
    loads = np.array(tokens_per_step[:-1], dtype=float)
    assert np.median(loads.max(axis=1) / loads.mean(axis=1)) < 1.1  # balanced ranks
    # provenance: in global order, the pieces of the first epoch tile every document exactly once
    prov = [dataset(server.address, world, r, provenance=True) for r in range(world)]
    prov_batches = [take(ds, 150) for ds in prov]
    assert all(same_batches([{"input_ids": b["input_ids"]} for b in prov_batches[r]],
                            [{"input_ids": b["input_ids"]} for b in per_rank[r]]) for r in range(world))
    pieces: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for s in range(150):
        for r in range(world):
            for _, _, length, _, shard, doc, offset in prov_batches[r][s]["provenance"].tolist():
                got = pieces.setdefault((shard, doc), [])
                if (offset, length) in got:  # second epoch begins
                    break
                got.append((offset, length))
    lengths = sorted(len(d.encode()) + 1 for d in docs)
    assert len(pieces) == len(docs)
    tiled = []
    for got in pieces.values():
        got.sort()
        assert [o for o, _ in got] == list(range(0, got[-1][0] + 1, SEQ))
        tiled.append(sum(n for _, n in got))
    assert sorted(tiled) == lengths


def test_budget_resume_and_elastic_resume(budget_server):
    server, _ = budget_server
    ref = take(dataset(server.address, 2, 1), 30)
    for k in (0, 4, 17):
        check_resume(lambda: StreamingDataLoader(dataset(server.address, 2, 1), num_workers=2),
                     lambda: dataset(server.address, 2, 1), ref, k)
    # elastic: a 2-rank job's state continues as a 3-rank job; the pieces both consumed are
    # exactly a prefix of the global piece sequence (nothing lost, nothing repeated)
    def pieces(batches):
        return [tuple(rec[4:]) for b in batches for rec in b["provenance"].tolist()]

    before = [save_after(lambda r=r: dataset(server.address, 2, r, provenance=True), 6) for r in range(2)]
    after = []
    for r in range(3):
        ds = dataset(server.address, 3, r, provenance=True)
        ds.load_state_dict(before[0][1])
        after.append(take(ds, 5))
    consumed = pieces(before[0][0] + before[1][0]) + pieces([b for rank in after for b in rank])
    sequence = pieces(take(dataset(server.address, 1, 0, provenance=True), 60))
    assert len(consumed) == len(set(consumed))
    assert set(consumed) == set(sequence[: len(consumed)])


def test_bad_budget_requests(budget_server):
    server, _ = budget_server
    with pytest.raises(ValueError, match="max_tokens"):
        StreamingDataset(server.address, "docs", seq_len=SEQ, max_tokens=SEQ - 1)
    with pytest.raises(ValueError, match="packing"):
        StreamingDataset(server.address, "docs", seq_len=SEQ, max_tokens=BUDGET, packing="bfd")
