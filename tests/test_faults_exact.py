"""Exact under faults (issue 16), through real server processes: replicas with their own copies
of a corpus serve one job exactly; a damaged prepared shard is DATA_LOSS for every reader, never
a wrong batch; a read error is retried and never cached; a file rewritten under a running server
is refused. Every batch is compared with an uninterrupted reference."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from client import DataLossError, StreamingDataset
from client.errors import RequestError
from server.stages.order import shard_order
from conftest import ROOT, make_documents, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SEQ, B = 128, 4


def config(data: Path, **dataset: object) -> dict:
    return {"datasets": {"docs": {
        "source": {"type": "jsonl", "paths": [str(data / "*.jsonl")], "shard_bytes": 8 << 10}, **dataset}}}


def corpus(root: Path) -> Path:
    write_jsonl(root, make_documents(160, seed=5, max_len=3000), files=4)
    return root


def rows(address: str, rank: int, world: int, n: int, state: dict | None = None, dataset: str = "docs",
         **kw: object) -> tuple[list[np.ndarray], dict]:
    """``n`` batches of one rank as ``[B, SEQ + 1]`` rows (input_ids with the last label), and the state after."""
    ds = StreamingDataset(address, dataset=dataset, seq_len=SEQ, batch_size=B, seed=1, rank=rank, world_size=world,
                          fields=["tokens"], decode_ahead=0, **kw)
    if state is not None:
        ds.load_state_dict(state)
    out = [b["tokens"].numpy() for b in itertools.islice(iter(ds), n)]
    state = ds.state_dict()
    ds.close()
    return out, state


def reference(address: str, world: int, n: int, dataset: str = "docs") -> list[list[np.ndarray]]:
    return [rows(address, r, world, n, dataset=dataset)[0] for r in range(world)]


def copy_with_other_mtimes(src: Path, dst: Path, when: int) -> Path:
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        os.utime(p, ns=(when, when))
    return dst


def test_replicas_with_their_own_copies_serve_one_job_exactly(tmp_path, start_server):
    """Three replicas, each on its own copy (other paths, other mtimes): ranks spread over them
    get the reference's batches, and a cursor taken on one replica resumes exactly on another."""
    data = corpus(tmp_path / "data")
    ref_server = start_server(config(data))
    world, n = 3, 10
    ref = reference(ref_server.address, world, n)
    replicas = [start_server(config(copy_with_other_mtimes(data, tmp_path / f"copy{i}", 10**18 + i * 10**9)))
                for i in range(3)]
    for rank in range(world):
        first, state = rows(replicas[rank].address, rank, world, n // 2)
        rest, _ = rows(replicas[(rank + 1) % 3].address, rank, world, n - n // 2, state=state)
        for i, batch in enumerate(first + rest):
            assert np.array_equal(batch, ref[rank][i]), f"rank {rank} batch {i} differs from the reference"


def test_a_damaged_prepared_shard_is_data_loss_for_every_reader(tmp_path, start_server):
    """Eight ranks, each on its own fresh replica of a prepared dataset with one damaged shard:
    every batch a rank gets equals the intact reference; a rank whose rows lie in the damaged
    shard gets DATA_LOSS naming the file (never another shard's rows, never INTERNAL)."""
    data = corpus(tmp_path / "data")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config(data)))
    prep = tmp_path / "prepared"
    done = subprocess.run([sys.executable, "-m", "server", "prepare", "--config", str(tmp_path / "c.yaml"),
                           "--dataset", "docs", "--out", str(prep), "--workers", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    prepared = {"datasets": {"prep": {"source": {"type": "tokens", "path": str(prep)}}}}
    world, n = 8, 6
    ref = reference(start_server(prepared).address, world, n, dataset="prep")
    damaged = tmp_path / "damaged"
    shutil.copytree(prep, damaged)
    num_shards = len(list(prep.glob("shard-*.tft")))
    index = int(shard_order(1, 0, num_shards)[1])  # the second shard epoch 0 reads (seed 1)
    shard = damaged / f"shard-{index:06d}.tft"
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0x40  # one flipped bit
    shard.write_bytes(bytes(data_bytes))
    lost = served = 0
    for rank in range(world):
        server = start_server({"datasets": {"prep": {"source": {"type": "tokens", "path": str(damaged)}}}})
        ds = StreamingDataset(server.address, dataset="prep", seq_len=SEQ, batch_size=B, seed=1, rank=rank,
                              world_size=world, fields=["tokens"], decode_ahead=0, batches_per_message=1)
        got = []
        try:
            for batch in itertools.islice(iter(ds), n):
                got.append(batch["tokens"].numpy())
        except DataLossError as err:
            lost += 1
            assert f"({shard.name}) is damaged: checksum mismatch" in str(err) and "DATA_LOSS" in str(err)
        for i, batch in enumerate(got):
            assert np.array_equal(batch, ref[rank][i]), f"rank {rank} batch {i} is not the reference's"
        served += len(got)
        server.stop()
    # Each rank reads the first shard, then reaches the damaged one (the rows before it are exact).
    assert lost >= 1 and served >= world, (lost, served)


def test_a_read_error_is_retried_then_unavailable_and_never_cached(tmp_path, start_server):
    """A file renamed away: the server retries, gives up with UNAVAILABLE, caches nothing; the
    client reconnects from its cursor and, once the file is back, every batch is the reference's."""
    data = corpus(tmp_path / "data")
    world, n = 2, 12
    ref = reference(start_server(config(data)).address, world, n)
    retry = {"attempts": 3, "backoff_s": 0.02, "max_backoff_s": 0.05, "deadline_s": 1.0}
    server = start_server(config(data, retry=retry))
    away = data / "part-001.jsonl"
    os.rename(away, data / "hidden")
    gave_up = threading.Event()

    def restore_after_give_up() -> None:
        while not gave_up.is_set():
            if "giving up (UNAVAILABLE)" in server.log():
                gave_up.set()
            elif server.proc.poll() is not None:
                return
            else:
                gave_up.wait(0.02)
        os.rename(data / "hidden", away)

    threading.Thread(target=restore_after_give_up, daemon=True).start()
    for rank in range(world):
        got, _ = rows(server.address, rank, world, n, reconnect_deadline_s=60.0)
        for i, batch in enumerate(got):
            assert np.array_equal(batch, ref[rank][i]), f"rank {rank} batch {i} differs after the fault"
    assert gave_up.is_set() and "retry 1 of 2" in server.log()
    assert "broken_shard" not in server.log()


def test_a_file_rewritten_under_a_running_server_is_refused(tmp_path, start_server):
    data = corpus(tmp_path / "data")
    server = start_server(config(data, retry={"attempts": 1}))
    for path in sorted(data.glob("*.jsonl")):
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[::-1]))  # same bytes per line, other order: same size
    with pytest.raises(RequestError, match=r"FAILED_PRECONDITION: dataset 'docs': part-00\d\.jsonl was rewritten"):
        rows(server.address, 0, 1, 4)
    assert server.proc.poll() is None  # the server stays up for everyone else
