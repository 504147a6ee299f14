"""Bad states are refused before any data flows; server crashes and replicas lose nothing."""

from __future__ import annotations

import copy
import threading
import time

import grpc
import pytest

from client import RequestError, ServerUnavailable, StreamingDataLoader, StreamingDataset
from client.state import _checksum
from tests.conftest import jsonl_config, make_documents, write_jsonl
from tests.resume_helpers import resume, same_batches, save_after, take

SEQ, BATCH = 64, 4


@pytest.fixture
def served(start_server, tmp_path):
    path = tmp_path / "corpus"
    write_jsonl(path, make_documents(120, seed=9), files=2)
    config = jsonl_config(path, shard_bytes=16 << 10)
    return start_server(config), config, path


def dataset(address: str, **kw) -> StreamingDataset:
    args = {"dataset": "docs", "seq_len": SEQ, "batch_size": BATCH, "seed": 1, **kw}
    return StreamingDataset(address, **args)


def forge(state: dict, position: dict | None = None, **fields) -> dict:
    """A state edited with a valid checksum: what a buggy tool or a hand edit could produce."""
    body = {k: v for k, v in copy.deepcopy(state).items() if k != "checksum"}
    body.update(fields)
    body["position"].update(position or {})
    return {**body, "checksum": _checksum(body)}


def test_states_of_another_sequence_or_damaged_are_refused(served):
    server, _, _ = served
    _, state = save_after(lambda: dataset(server.address), 5)
    refusals = [
        (dataset(server.address, dataset="other"), state, "dataset='docs'"),
        (dataset(server.address, seed=2), state, "seed=1"),
        (dataset(server.address, seq_len=32), state, "seq_len=64"),
        (dataset(server.address), forge(state, packing="bfd"), "packing='bfd'"),
        (dataset(server.address), forge(state, version=99), "version 99"),
        (dataset(server.address), {k: v for k, v in state.items() if k != "position"}, "damaged"),
        (dataset(server.address), {**state, "position": {**state["position"], "row": 1}}, "damaged"),
        (dataset(server.address), "not a state", "must be a dict"),
        (dataset(server.address), forge(state, position={"row": -3}), "negative"),
    ]
    for ds, bad, words in refusals:
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            ds.load_state_dict(bad)


def test_forged_positions_are_refused_by_the_server(served):
    server, _, _ = served
    _, state = save_after(lambda: dataset(server.address), 5)
    ds = dataset(server.address)
    ds.load_state_dict(forge(state, position={"shard_row": 10**6}))
    with pytest.raises(RequestError, match="cursor points at row 1000000") as info:
        next(iter(ds))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    ds.load_state_dict(forge(state, position={"shard": 999}))
    with pytest.raises(ValueError, match="cursor.shard"):
        next(iter(ds))
    ds.load_state_dict(forge(state, fingerprint="0" * 16))
    with pytest.raises(ValueError, match="fingerprint"):
        next(iter(ds))


def test_changed_dataset_content_is_refused_after_restart(served):
    server, _, path = served
    _, state = save_after(lambda: dataset(server.address), 5)
    server.stop()
    with (path / "part-000.jsonl").open("a") as f:
        f.write('{"text": "a new document"}\n')
    server.start()
    ds = dataset(server.address)
    ds.load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint.*content or tokenizer changed"):
        next(iter(ds))


@pytest.mark.integration
@pytest.mark.parametrize("workers,ahead", [(0, 2), (2, 2), (0, 0)])  # ahead 0: read on the trainer's thread
def test_sigkill_and_cold_restart_lose_and_repeat_nothing(served, workers, ahead, caplog):
    server, _, _ = served
    # One batch per message: at most a ring's 8 messages (plus 2 decoded ahead) are in flight
    # when the server dies, so the 40 batches after the kill need the reconnect.
    rank1 = {"world_size": 2, "rank": 1, "batches_per_message": 1, "decode_ahead": ahead}
    reference = take(dataset(server.address, **rank1), 60)
    loader = StreamingDataLoader(dataset(server.address, **rank1), num_workers=workers)
    it = iter(loader)
    got = [next(it) for _ in range(20)]
    assert "messages through its FIFO" in server.log()  # (the server's death closes the FIFO: EOF, then the call)
    server.kill()  # mid-stream: batches may sit in flight in the client's buffers
    restarter = threading.Thread(target=server.start)
    restarter.start()  # the client retries with backoff while the server boots (cold cache)
    t0 = time.monotonic()
    got.append(next(it))
    reconnect_s = time.monotonic() - t0
    restarter.join()
    got += [next(it) for _ in range(39)]
    assert same_batches(got, reference), "a batch was lost or repeated across the restart"
    assert reconnect_s < 30
    if workers == 0:  # the reconnect happened in this process: its backoff was logged
        assert "reconnecting in" in caplog.text


def test_any_replica_continues_any_stream(served, start_server):
    server, config, _ = served
    replica = start_server(config)
    reference = take(dataset(server.address, world_size=3, rank=2), 15)
    _, state = save_after(lambda: dataset(server.address, world_size=3, rank=2), 8)
    resumed = resume(lambda: dataset([replica.address] * 3, world_size=3, rank=2), state, 7)
    assert same_batches(resumed, reference[8:])


def test_unreachable_server_fails_within_the_deadline(served):
    server, _, _ = served
    address = server.address
    server.stop()
    ds = dataset(address, reconnect_deadline_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=address) as info:
        next(iter(ds))
    assert time.monotonic() - t0 < 10
    assert isinstance(info.value, ConnectionError)
