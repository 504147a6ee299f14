"""The data plan's ``exclude`` and ``weights`` edits through a real server, against uninterrupted
references: from the step of an exclusion the job reads the reference's rows without those that hold
a token of the excluded document or shard (nothing else moves); from the step of a weights edit the
mixture follows the new weights within a row; every case saved, resumed on the same world size and
elastically (4 ranks -> 2) reads the same rows; bad edits are refused naming the problem."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pytest
import torch

from client import RequestError, StreamingDataLoader, StreamingDataset
from client.plan import Edit
from tests.conftest import jsonl_config, make_documents, write_jsonl
from tests.test_metrics import metrics_url, poll, scrape, value

pytestmark = pytest.mark.integration

SEQ, BATCH, SEED = 32, 2, 7
S = 4  # the edits' step
NEW = {"web": 0.2, "books": 0.8}


@pytest.fixture(scope="module")
def address(module_servers: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("edits")
    config: dict[str, Any] = {"datasets": {}}
    for name, seed in (("docs", 11), ("web", 1), ("books", 2)):
        write_jsonl(root / name, [f"{name}:{d}" for d in make_documents(60, seed=seed, max_len=600)], files=2)
        config["datasets"][name] = {"source": {"type": "jsonl", "paths": [str(root / name / "*.jsonl")],
                                               "shard_bytes": 4096}}
    config["datasets"]["mix"] = {"mixture": {"web": 0.7, "books": 0.3}}
    return str(module_servers(config).address)


def dataset(address: str, name: str = "docs", rank: int = 0, world: int = 1, batch: int = BATCH) -> StreamingDataset:
    return StreamingDataset(address, name, seq_len=SEQ, batch_size=batch, seed=SEED, rank=rank, world_size=world,
                            provenance=True)


def rows_of(batches: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, set[tuple[int, int, int]]]]:
    """Every row in order, with the (source, shard, document) of each of its pieces."""
    out = []
    for b in batches:
        prov = b["provenance"].numpy()
        for r in range(b["input_ids"].shape[0]):
            pieces = prov[prov[:, 0] == r]
            out.append((b["input_ids"][r], {(int(s), int(h), int(d)) for s, h, d in pieces[:, [3, 4, 5]]}))
    return out


def take(it: Any, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(it, n))


@pytest.fixture(scope="module")
def reference(address: str) -> list[tuple[torch.Tensor, set[tuple[int, int, int]]]]:
    return rows_of(take(dataset(address), 90))


def job_rows(runs: list[tuple[int, list[list[dict]]]]) -> list[torch.Tensor]:
    """The job's rows from its ranks' batches: ``runs`` of (world size, each rank's batches)."""
    out = []
    for world, per_rank in runs:
        for t in range(len(per_rank[0])):
            out += [row for r in range(world) for row in per_rank[r][t]["input_ids"]]
    return out


def assert_rows(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) <= len(want)
    for i, (x, y) in enumerate(zip(got, want)):
        assert torch.equal(x, y), f"job row {i} differs"


@pytest.mark.parametrize("whole_shard", [False, True])
def test_exclusion_passes_over_exactly_the_rows_that_hold_it(address, reference, whole_shard):
    start = S * BATCH
    _, pieces = reference[start + 6]  # a document read soon after step S
    source, shard, doc = sorted(pieces)[0]
    hit = (lambda p: any(h == shard for _, h, _ in p)) if whole_shard else (lambda p: (source, shard, doc) in p)
    want = [x for x, _ in reference[:start]] + [x for x, p in reference[start:] if not hit(p)]
    ds = dataset(address)
    ds.apply(Edit.exclude(S, shard, None if whole_shard else doc))
    batches = take(ds, 40)
    assert_rows(job_rows([(1, [batches])]), want)
    after = rows_of(batches[S:])
    assert not any(hit(p) for _, p in after), "an excluded piece was read after its step"
    assert ds.state_dict()["plan"][0]["row"] == start


def run(address: str, name: str, world: int, edit: Edit, steps: int, state: dict | None = None,
        workers: int = 0) -> tuple[list[list[dict]], list[dict]]:
    """Each rank's next ``steps`` batches and states (after ``edit``, unless resumed from ``state``)."""
    per_rank, states = [], []
    for rank in range(world):
        ld = StreamingDataLoader(dataset(address, name, rank, world), num_workers=workers)
        if state is None:
            ld.apply(edit)
        else:
            ld.load_state_dict(state[rank] if isinstance(state, list) else state)
        it = iter(ld)
        per_rank.append(take(it, steps))
        states.append(json.loads(json.dumps(ld.state_dict())))
        del it
    return per_rank, states


@pytest.mark.parametrize(("name", "op"), [("docs", "exclude"), ("mix", "weights"), ("mix", "exclude")])
def test_resume_and_elastic_resume_read_the_same_rows(address, reference, name, op):
    """4 ranks saved before, at and after the edit's step, resumed on 4 and on 2 ranks: the job's rows
    are those of one rank that applies the edit at the same job row (rows do not depend on the world)."""
    if name == "docs":
        _, pieces = reference[S * 4 * BATCH + 3]
        source, shard, doc = sorted(pieces)[0]
        edit = Edit.exclude(S, shard, doc)
    elif op == "exclude":  # a document of a mixture's component, read soon after step S
        _, pieces = rows_of(take(dataset(address, "mix"), 4 * S + 4))[S * 4 * BATCH + 3]
        source, shard, doc = sorted(pieces)[0]
        edit = Edit.exclude(S, shard, doc, dataset=["web", "books"][source])
        after = rows_of(take(dataset_with(address, "mix", edit), 4 * S + 40))[S * BATCH:]
        assert not any((source, shard, doc) in p for _, p in after)
    else:
        edit = Edit.mixture_weights(S, NEW)
    for saved_at in (S - 1, S, S + 2):
        first, states = run(address, name, 4, edit, saved_at, workers=2 if saved_at == S else 0)
        assert all(s["plan"][0]["op"] == edit.op for s in states)
        for world, state in ((4, states), (2, states[0])):
            rest, _ = run(address, name, world, edit, 10, state)
            at_row = (min(saved_at, S) * 4 + max(0, S - saved_at) * world) * BATCH  # the job row at step S
            one = dataset(address, name)
            one.apply(dataclass_at(edit, at_row // BATCH))
            want = [row for b in take(one, (saved_at * 4 + 10 * world)) for row in b["input_ids"]]
            assert_rows(job_rows([(4, first), (world, rest)]), want)


def dataset_with(address: str, name: str, edit: Edit) -> StreamingDataset:
    ds = dataset(address, name)
    ds.apply(edit)
    return ds


def dataclass_at(edit: Edit, step: int) -> Edit:
    return Edit.from_json({**edit.to_json(), "at_step": step})


def test_weights_follow_the_new_weights_within_one_row(address):
    big = 50
    ref = take(dataset(address, "mix", batch=big), 4)
    ds = dataset(address, "mix", batch=big)
    ds.apply(Edit.mixture_weights(2, NEW))
    got = take(ds, 40)
    for x, y in zip(got[:2], ref[:2]):
        assert torch.equal(x["input_ids"], y["input_ids"])
    every = np.array([s for b in got for s in sources_of(b)])
    at = 2 * big  # the job row of step 2
    rows = np.arange(1, len(every) + 1)[:, None]
    old, new = np.array([0.7, 0.3]), np.array([NEW["web"], NEW["books"]])
    target = np.where(rows <= at, rows * old, at * old + (rows - at) * new)  # the edited schedule
    counts = np.cumsum(np.eye(2)[every], axis=0)
    assert np.abs(counts - target).max() < 1.0, "a component strayed a row from its target"
    since = counts[at:] - counts[at - 1]  # rows since the edit, against (rows since it) x new weights
    assert np.abs(since - (rows[at:] - at) * new).max() < 2.0
    src = every[at:]
    shares = np.bincount(src, minlength=2) / len(src)
    assert abs(shares[1] - 0.8) < 0.01, shares


def sources_of(batch: dict[str, torch.Tensor]) -> list[int]:
    prov = batch["provenance"].numpy()
    return [int(prov[prov[:, 0] == r][0, 3]) for r in range(batch["input_ids"].shape[0])]


def test_bad_edits_are_refused_naming_the_problem(address):
    with pytest.raises(ValueError, match="exclude: shard must be a shard id >= 0"):
        Edit.exclude(3, -2)
    with pytest.raises(ValueError, match="weights must be finite, 0 or more and not all 0"):
        Edit.mixture_weights(3, {"web": 0, "books": 0})
    with pytest.raises(ValueError, match="weights must be finite"):
        Edit.mixture_weights(3, {"web": -1, "books": 2})
    ds = dataset(address)
    ds.apply(Edit.exclude(0, 999))
    with pytest.raises(RequestError, match=r"INVALID_ARGUMENT: plan\[0\].shard: unknown shard 999 of 'docs'"):
        next(iter(ds))
    ds = dataset(address)
    ds.apply(Edit.exclude(0, 0, 10_000))
    with pytest.raises(RequestError, match="INVALID_ARGUMENT: plan: unknown document 10000 of shard 0 of 'docs'"):
        next(iter(ds))
    ds = dataset(address)
    ds.apply(Edit.mixture_weights(0, {"web": 1}))
    with pytest.raises(RequestError, match="'docs' is not a mixture"):
        next(iter(ds))
    mix = dataset(address, "mix")
    mix.apply(Edit.mixture_weights(0, {"code": 1}))
    with pytest.raises(RequestError, match="weights for 'code': not in the mixture"):
        next(iter(mix))
    mix = dataset(address, "mix")
    take(mix, 3)
    with pytest.raises(ValueError, match="weights for 'code': not in the mixture 'mix'"):
        mix.apply(Edit.mixture_weights(5, {"code": 1}))
    with pytest.raises(ValueError, match="step 1 is in the past: the job has read 3 global steps"):
        mix.apply(Edit.exclude(1, 0, 0, dataset="web"))


def test_describe_and_metrics_show_the_edits_streams_carry(start_server, tmp_path):
    write_jsonl(tmp_path / "data", make_documents(40, seed=3), files=1)
    server = start_server(jsonl_config(tmp_path / "data", shard_bytes=4096), extra_args=["--metrics-port", "0"])
    url = metrics_url(server)
    ds = StreamingDataset(server.address, "docs", seq_len=SEQ, batch_size=BATCH)
    ds.apply(Edit.exclude(0, 1))
    ds.skip_steps(1, at_step=0)
    it = iter(ds)
    next(it)  # the stream is open while the iterator lives
    described = StreamingDataset(server.address, "docs").describe_server()
    assert dict(described.plan_edits) == {"exclude": 1, "skip": 1}
    samples = scrape(url)
    assert value(samples, "tokenfeed_plan_edits", kind="exclude") == 1
    assert value(samples, "tokenfeed_plan_edits", kind="weights") == 0
    it.close()  # type: ignore[attr-defined]
    poll(lambda: value(scrape(url), "tokenfeed_plan_edits", kind="exclude") == 0)
    assert not StreamingDataset(server.address, "docs").describe_server().plan_edits


def test_a_server_killed_under_an_exclusion_resumes_the_same_rows(start_server, tmp_path):
    """The plan travels in every request: a replacement server continues the excluded stream exactly."""
    write_jsonl(tmp_path / "data", make_documents(60, seed=5, max_len=600), files=2)
    server = start_server(jsonl_config(tmp_path / "data", shard_bytes=4096))
    rows = rows_of(take(dataset(server.address), 12))
    source, shard, doc = sorted(rows[S * BATCH + 2][1])[0]
    edit = Edit.exclude(S, shard, doc)
    total = 600  # past an epoch, and more than the client and the socket buffer
    want = take(dataset_with(server.address, "docs", edit), total)
    ds = dataset_with(server.address, "docs", edit)
    it = iter(ds)
    got = take(it, S + 3)
    server.kill()  # mid-stream: the client reconnects from its cursor, with the plan, to the new process
    seen = len(server.lines)
    server.start()
    got += take(it, total - len(got))
    assert any("stream opened" in line for line in server.lines[seen:]), "the new server served nothing"
    assert_rows(job_rows([(1, [got])]), job_rows([(1, [want])]))
    assert not any((source, shard, doc) in p for _, p in rows_of(got[S:]))
