"""Contract 5: resuming from a state continues at the exact next batch (issue 3)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchdata.stateful_dataloader import StatefulDataLoader

from client import StreamingDataLoader, StreamingDataset
from client.loader import fork_safe_context
from tests.conftest import jsonl_config, make_documents, write_jsonl
from tests.resume_helpers import check_resume, resume, same_batches, save_after, take

SEQ, BATCH, SEED = 64, 4, 3


@pytest.fixture(scope="module")
def env(module_servers, tmp_path_factory):
    """A server on a ~10-shard corpus, and reference (uninterrupted) runs per rank."""
    path = tmp_path_factory.mktemp("corpus")
    write_jsonl(path, make_documents(150, seed=5), files=2)
    server = module_servers(jsonl_config(path, shard_bytes=16 << 10))
    refs: dict[tuple, list] = {}

    def dataset(world: int = 1, rank: int = 0, batch: int = BATCH, **kw) -> StreamingDataset:
        return StreamingDataset(server.address, "docs", seq_len=SEQ, batch_size=batch, seed=SEED,
                                rank=rank, world_size=world, **kw)

    def reference(world: int, rank: int, n: int, batch: int = BATCH) -> list:
        key = (world, rank, batch)
        if len(refs.get(key, [])) < n:
            refs[key] = take(dataset(world, rank, batch), n)
        return refs[key][:n]

    first = dataset()
    take(first, 1000)  # more than an epoch: every shard is tokenized, so describe knows the rows
    info = first.describe()
    rows_epoch = sum(-(-s.tokens // SEQ) for s in info.shards)
    assert info.num_shards >= 8 and rows_epoch > 1000 // 2
    return server, dataset, reference, rows_epoch


def epoch_batches(rows_epoch: int, world: int, rank: int, batch: int = BATCH) -> int:
    """How many of the rank's batches start inside epoch 0."""
    return sum(1 for b in range(rank, -(-rows_epoch // batch), world))


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_at_every_kind_of_stop_point(env, world, workers):
    _, dataset, reference, rows_epoch = env
    rank = world - 1
    n0 = epoch_batches(rows_epoch, world, rank)
    stops = [0, 1, random.Random(world * 10 + workers).randrange(2, n0 - 1), n0 - 1, n0]
    ref = reference(world, rank, n0 + 5)

    def make() -> StreamingDataLoader:
        return StreamingDataLoader(dataset(world, rank), num_workers=workers)

    for k in stops:
        state = check_resume(make, make, ref, k)
        assert len(json.dumps(state)) < 4096
        assert state["steps"] == k


def test_state_exactly_at_the_epoch_end(env):
    _, dataset, reference, rows_epoch = env
    ref = reference(1, 0, rows_epoch + 4, batch=1)
    state = check_resume(lambda: dataset(batch=1), lambda: dataset(batch=1), ref, rows_epoch)
    assert state["position"]["row"] == rows_epoch and state["position"]["epoch"] == 0
    resumed = resume(lambda: dataset(batch=1), state, 1)
    assert same_batches(resumed, ref[rows_epoch : rows_epoch + 1])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_resume_property(env, data):
    """Random world size, rank, stop point, and num_workers changed between save and load."""
    _, dataset, reference, rows_epoch = env
    world = data.draw(st.sampled_from([1, 2, 3, 4]), "world")
    rank = data.draw(st.integers(0, world - 1), "rank")
    k = data.draw(st.integers(0, epoch_batches(rows_epoch, world, rank) + 3), "k")
    save_workers, load_workers = data.draw(st.integers(0, 2), "save"), data.draw(st.integers(0, 2), "load")
    ref = reference(world, rank, k + 3)
    check_resume(lambda: StreamingDataLoader(dataset(world, rank), num_workers=save_workers),
                 lambda: StreamingDataLoader(dataset(world, rank), num_workers=load_workers), ref, k, n=3)


@pytest.mark.parametrize("workers", [0, 2])
def test_torchdata_stateful_dataloader(env, workers):
    _, dataset, reference, _ = env
    ref = reference(2, 1, 11)

    def make() -> StatefulDataLoader:
        return StatefulDataLoader(dataset(2, 1), batch_size=None, num_workers=workers,
                                  multiprocessing_context=fork_safe_context() if workers else None)

    for k in (0, 3, 7):
        check_resume(make, make, ref, k)


def test_plain_dataset_state(env):
    _, dataset, reference, _ = env
    ref = reference(2, 0, 13)
    check_resume(lambda: dataset(2, 0), lambda: dataset(2, 0), ref, 9)


@pytest.mark.parametrize("old, new", [(4, 2), (2, 3), (1, 4), (3, 1)])
def test_elastic_resume_at_a_step_boundary(env, old, new):
    """W ranks save after s steps; W' ranks load rank 0's (or any) state: the global sequence
    continues with nothing lost, nothing repeated, in global order."""
    _, dataset, reference, _ = env
    steps, after = 7, 5
    states, consumed = [], []
    for r in range(old):
        batches, state = save_after(lambda r=r: StreamingDataLoader(dataset(old, r), num_workers=r % 2), steps)
        consumed.append(batches)
        states.append(state)
    before = [consumed[b % old][b // old] for b in range(old * steps)]
    resumed = []
    for r in range(new):
        source = states[0] if r % 2 == 0 else states[-1]  # any old rank's state carries the job position
        resumed.append(resume(lambda r=r: StreamingDataLoader(dataset(new, r), num_workers=1), source, after))
    continued = [resumed[b % new][b // new] for b in range(new * after)]
    globally = reference(1, 0, old * steps + new * after)
    assert same_batches(before + continued, globally)


@pytest.mark.parametrize("packing", ["bfd", "pad"])
def test_resume_is_exact_for_every_packing(env, packing):
    _, dataset, _, _ = env
    ref = take(dataset(2, 1, packing=packing), 40)
    for k in (0, 5, 33):
        check_resume(lambda: StreamingDataLoader(dataset(2, 1, packing=packing), num_workers=2),
                     lambda: dataset(2, 1, packing=packing), ref, k)
    _, state = save_after(lambda: dataset(2, 1, packing=packing), 3)
    with pytest.raises(ValueError, match=f"packing='{packing}'"):
        dataset(2, 1).load_state_dict(state)
