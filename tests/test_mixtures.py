"""Mixtures and curricula (deterministic, exact proportions, resumable) and provenance."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from client import StreamingDataLoader, StreamingDataset
from tests.conftest import ROOT, make_documents, write_jsonl
from tests.resume_helpers import check_resume, same_batches, save_after, take

SEQ = 32


@pytest.fixture(scope="module")
def mix_server(module_servers, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    config = {"datasets": {}}
    for name, seed in (("web", 1), ("books", 2), ("code", 3)):
        write_jsonl(root / name, [f"{name}:{d}" for d in make_documents(80, seed=seed)], files=2)
        config["datasets"][name] = {"source": {"type": "jsonl", "paths": [str(root / name / "*.jsonl")],
                                               "shard_bytes": 8192}}
    config["datasets"]["mix"] = {"mixture": {"web": 0.7, "books": 0.3}}
    config["datasets"]["curriculum"] = {"mixture": {
        "weights": {"web": 1, "books": 1, "code": 1}, "interpolation": "linear",
        "schedule": [{"at_row": 0, "weights": {"web": 1.0}}, {"at_row": 4000, "weights": {"books": 1, "code": 1}}]}}
    return module_servers(config)


def sources_of(batches: list[dict]) -> np.ndarray:
    """The component of every row (all pieces of a row come from one component)."""
    out = []
    for b in batches:
        prov = b["provenance"].numpy()
        per_row = {}
        for row, src in prov[:, [0, 3]].tolist():
            assert per_row.setdefault(row, src) == src, "a row mixes components"
        out += [per_row[r] for r in range(b["input_ids"].shape[0])]
    return np.array(out)


def test_realised_proportions_within_one_percent(mix_server):
    ds = StreamingDataset(mix_server.address, "mix", seq_len=SEQ, batch_size=100, provenance=True)
    batches = take(ds, 100)  # 10,000 rows
    src = sources_of(batches)
    share = np.bincount(src, minlength=2) / len(src)
    assert abs(share[0] - 0.7) < 0.01 and abs(share[1] - 0.3) < 0.01, share
    info = ds.describe()
    assert [s.name for s in info.sources] == ["web", "books"]
    assert [round(s.weight, 3) for s in info.sources] == [0.7, 0.3]
    served = np.array([s.rows_served for s in info.sources])
    assert served.sum() >= 10_000 and abs(served[0] / served.sum() - 0.7) < 0.01
    again = take(StreamingDataset(mix_server.address, "mix", seq_len=SEQ, batch_size=100, provenance=True), 20)
    assert same_batches(again, batches[:20])  # deterministic
    other_seed = take(StreamingDataset(mix_server.address, "mix", seq_len=SEQ, batch_size=100, seed=5), 1)
    assert not np.array_equal(other_seed[0]["input_ids"], batches[0]["input_ids"])


def test_curriculum_follows_its_schedule(mix_server):
    ds = StreamingDataset(mix_server.address, "curriculum", seq_len=SEQ, batch_size=200, provenance=True)
    src = sources_of(take(ds, 30))  # 6,000 rows: linear ramp over the first 4,000, then flat
    first, middle, last = src[:400], src[1800:2200], src[5000:6000]
    assert np.mean(first == 0) > 0.85
    assert 0.4 < np.mean(middle == 0) < 0.6
    assert np.mean(last == 0) == 0 and abs(np.mean(last == 1) - 0.5) < 0.01


@pytest.mark.parametrize("dataset", ["mix", "curriculum"])
def test_mixture_resume_and_elastic_resume_are_exact(mix_server, dataset):
    def make(world=2, rank=1, workers=0):
        ds = StreamingDataset(mix_server.address, dataset, seq_len=SEQ, batch_size=16, seed=4, rank=rank,
                              world_size=world)
        return StreamingDataLoader(ds, num_workers=workers) if workers else ds

    ref = take(make(), 60)
    for k in (0, 7, 50):
        state = check_resume(lambda: make(workers=2), make, ref, k)
    assert len(state["components"]) == (2 if dataset == "mix" else 3)
    # elastic: 2 ranks -> 3 ranks, global order kept
    _, state = save_after(lambda: make(2, 0), 10)
    resumed = [take(_loaded(make(3, r), state), 4) for r in range(3)]
    glob = take(make(1, 0), 20 + 12)
    assert same_batches([resumed[b % 3][b // 3] for b in range(12)], glob[20:])


def _loaded(ds, state):
    ds.load_state_dict(state)
    return ds


def test_provenance_points_at_the_exact_documents(mix_server):
    ds = StreamingDataset(mix_server.address, "web", seq_len=SEQ, batch_size=8, provenance=True, packing="concat")
    info = ds.describe()
    docs = {d.split(" ")[0].split(":", 1)[1]: (d.encode() + b"\x00") for d in
            (f"web:{d}" for d in make_documents(80, seed=1))}
    seen: dict[tuple[int, int], bytes] = {}
    checked = 0
    for batch in take(ds, 120):
        ids = batch["input_ids"].numpy()
        for row, col, length, source, shard, doc, offset in batch["provenance"].tolist():
            assert source == 0 and 0 <= shard < info.num_shards
            piece = ids[row, col : col + length]
            raw = bytes(int(t) if t < 256 else 0 for t in piece)  # EOS -> the trailing 0 marker
            if offset == 0 and b" " in raw:  # the piece holds the document's id
                key = raw.decode(errors="replace").split(" ")[0].split(":", 1)[1]
                seen[(shard, doc)] = docs[key]
            if (shard, doc) in seen:
                assert seen[(shard, doc)][offset : offset + length] == raw
                checked += 1
        covered = np.zeros(ids.shape, dtype=int)
        for row, col, length, *_ in batch["provenance"].tolist():
            covered[row, col : col + length] += 1
        assert np.array_equal(covered, (ids != 257).astype(int))  # every real token, exactly once
    assert checked > 200


@pytest.mark.parametrize("mixture, words", [
    ({"web": 1, "nope": 1}, ["datasets.bad.mixture", "unknown dataset 'nope'"]),
    ({"web": 1, "mix": 1}, ["'mix' is itself a mixture"]),
    ({"web": -1}, ["weights must be >= 0"]),
])
def test_bad_mixture_configs(tmp_path, mixture, words):
    write_jsonl(tmp_path / "web", make_documents(5))
    config = {"datasets": {"web": {"source": {"type": "jsonl", "paths": [str(tmp_path / "web" / "*.jsonl")]}},
                           "mix": {"mixture": {"web": 1}}, "bad": {"mixture": mixture}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--port", "0", "--config", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    for word in words:
        assert word in out.stderr, out.stderr
