"""The data plan's ``skip`` through a real server, against an uninterrupted reference: skipping k
global steps at step s reads what the reference reads from step s + k on, on 1 and 4 ranks and with
DataLoader workers; the plan travels in the state, so a resume (also on another world size) reads
the same batches; bad edits are refused."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from client import StreamingDataLoader, StreamingDataset
from client.loader import fork_safe_context
from client.plan import Edit
from client.state import STATE_VERSION
from tests.conftest import jsonl_config, make_documents, write_jsonl

pytestmark = pytest.mark.integration

SEQ, BATCH, SEED = 64, 2, 5
S, K = 3, 5  # skip K global steps at step S


@pytest.fixture(scope="module")
def address(module_servers: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    data = tmp_path_factory.mktemp("plan") / "data"
    write_jsonl(data, make_documents(120, seed=11, max_len=1500), files=3)
    return str(module_servers(jsonl_config(Path(data), shard_bytes=8 << 10)).address)


@pytest.fixture(scope="module")
def reference(address: str) -> list[torch.Tensor]:
    """Global batches of ``BATCH`` rows, uninterrupted: global batch g is rows [g*B, (g+1)*B)."""
    ds = StreamingDataset(address, "docs", seq_len=SEQ, batch_size=BATCH, seed=SEED, rank=0, world_size=1)
    return [b["input_ids"] for b in itertools.islice(ds, 120)]


def loader(address: str, rank: int, world: int, workers: int) -> StreamingDataLoader:
    ds = StreamingDataset(address, "docs", seq_len=SEQ, batch_size=BATCH, seed=SEED, rank=rank, world_size=world)
    return StreamingDataLoader(ds, num_workers=workers)


def expected(runs: list[tuple[int, int]], skips: dict[int, int], rank: int) -> list[int]:
    """The contract as arithmetic: the global batches rank ``rank`` reads in the last of ``runs``
    (``(world_size, steps)`` each, one after the other) with ``skips`` (``{at_step: k}``): a step
    passes ``world_size`` global batches, a skip reached at it ``k x world_size`` more first."""
    pos, t, out = 0, 0, []
    for i, (world, n) in enumerate(runs):
        for _ in range(n):
            pos += skips.get(t, 0) * world
            if i == len(runs) - 1:
                out.append(pos + rank)
            pos, t = pos + world, t + 1
    return out


def check(batches: list[dict[str, torch.Tensor]], indices: list[int], reference: list[torch.Tensor]) -> None:
    got = [b["input_ids"] for b in batches]
    assert len(got) == len(indices)
    for step, (x, g) in enumerate(zip(got, indices)):
        assert torch.equal(x, reference[g]), f"batch {step} is not global batch {g}"


def take(ld: Any, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(ld, n))


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (4, 0), (1, 2)])
def test_skip_equals_the_reference_from_s_plus_k(address, reference, world, workers):
    for rank in range(world):
        # planned ahead: one iteration crosses the skip
        ld = loader(address, rank, world, workers)
        ld.skip_steps(K, at_step=S)
        check(take(ld, S + 6), expected([(world, S + 6)], {S: K}, rank), reference)
        # applied when the job is at step S: a new iteration starts past the skipped steps
        ld = loader(address, rank, world, workers)
        it = iter(ld)
        first = [next(it) for _ in range(S)]
        del it
        ld.skip_steps(K)
        check(first + take(ld, 6), expected([(world, S + 6)], {S: K}, rank), reference)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_and_elastic_resume_read_the_same_batches(address, reference, workers):
    old, new, total = 4, 2, S + 7
    for saved_at in (S - 1, S, S + 2):  # the skip pending, due at the next step, already taken
        states = []
        for rank in range(old):
            ld = loader(address, rank, old, workers)
            ld.skip_steps(K, at_step=S)
            it = iter(ld)
            check([next(it) for _ in range(saved_at)], expected([(old, saved_at)], {S: K}, rank), reference)
            states.append(json.loads(json.dumps(ld.state_dict())))  # what a checkpoint stores
            del it
        assert all(s["plan"] == [{"op": "skip", "at_step": S, "steps": K}] for s in states)
        for world, source in ((old, None), (new, 0)):  # same world size: own state; resized: rank 0's
            for rank in range(world):
                ld = loader(address, rank, world, workers)
                ld.load_state_dict(states[rank if source is None else source])
                want = expected([(old, saved_at), (world, total - saved_at)], {S: K}, rank)
                check(take(ld, total - saved_at), want, reference)


def test_bad_edits_are_refused_naming_the_problem(address):
    ds = StreamingDataset(address, "docs", seq_len=SEQ, batch_size=BATCH, seed=SEED)
    with pytest.raises(ValueError, match="steps must be 0 or more"):
        ds.skip_steps(-1)
    it = iter(ds)
    [next(it) for _ in range(4)]
    del it
    with pytest.raises(ValueError, match="step 2 is in the past: the job has read 4 global steps"):
        ds.skip_steps(3, at_step=2)
    with pytest.raises(ValueError, match="unknown data plan edit 'drop'"):
        ds.apply(Edit("drop", 5))
    budget = StreamingDataset(address, "docs", seq_len=SEQ, batch_size=BATCH, seed=SEED, max_tokens=4 * SEQ)
    budget.skip_steps(2)
    with pytest.raises(ValueError, match="not supported with token-budget batches"):
        next(iter(budget))
    plain = DataLoader(StreamingDataset(address, "docs", seq_len=SEQ, batch_size=BATCH, seed=SEED), batch_size=None,
                       num_workers=2, multiprocessing_context=fork_safe_context())
    plain.dataset.skip_steps(2)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="needs client.StreamingDataLoader"):
        next(iter(plain))
    ds.skip_steps(3, at_step=6)
    state = ds.state_dict()
    state["plan"][0]["steps"] = 1  # edited by hand: the checksum no longer matches
    with pytest.raises(ValueError, match="checksum"):
        ds.load_state_dict(state)


def test_a_state_without_a_plan_keeps_version_1(address, reference):
    """Old states load as before, and a state without edits stays readable by older clients."""
    ds = StreamingDataset(address, "docs", seq_len=SEQ, batch_size=BATCH, seed=SEED)
    take(ds, 2)
    state = ds.state_dict()
    assert state["version"] == STATE_VERSION and "plan" not in state
    ds2 = StreamingDataset(address, "docs", seq_len=SEQ, batch_size=BATCH, seed=SEED)
    ds2.load_state_dict(state)
    check(take(ds2, 2), [2, 3], reference)
    ds2.skip_steps(1)
    assert ds2.state_dict()["version"] == STATE_VERSION + 1
