"""One client cannot hurt another (issue 17), through real server processes: a request whose
planning would stall the event loop is refused at once or runs in slices, so another stream's
largest gap between batches stays small."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from client import StreamingDataset
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def gaps_while(address: str, busy: threading.Event, done: threading.Event) -> list[float]:
    """Gaps between the batches of a small stream, from the moment ``busy`` is set to ``done``."""
    ds = StreamingDataset(address, dataset="stdlib", seq_len=256, batch_size=2, batches_per_message=1,
                          decode_ahead=0, fields=["tokens"])
    gaps: list[float] = []
    last = None
    for _ in ds:
        now = time.monotonic()
        if busy.is_set() and last is not None:
            gaps.append(now - last)
        last = now
        if done.is_set():
            break
    ds.close()
    return gaps


def test_a_huge_token_budget_job_is_refused_at_once(start_server):
    server = start_server(None)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenFeedStub(channel)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            next(iter(stub.StreamBatches(pb.StreamRequest(dataset="stdlib", seq_len=64, batch_size=1, world_size=65536,
                                                          max_tokens=64, batches_per_message=1), timeout=30)))
        assert time.monotonic() - t0 < 5
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_budget_pieces_per_message of 32768" in err.value.details()


def test_planning_a_large_token_budget_step_leaves_other_streams_served(start_server):
    """8,192 ranks with max_tokens: every rank plans a step of at least 8,192 pieces. It used to
    pick each piece's rank by scanning every rank on the event loop (about 10 s per step here)."""
    server = start_server(None)
    busy, done = threading.Event(), threading.Event()
    result: dict[str, list[float]] = {}
    reader = threading.Thread(target=lambda: result.setdefault("gaps", gaps_while(server.address, busy, done)))
    reader.start()
    big = StreamingDataset(server.address, dataset="stdlib", seq_len=64, batch_size=1, rank=4095, world_size=8192,
                           max_tokens=64, batches_per_message=1, decode_ahead=0)
    try:
        it = iter(big)
        busy.set()
        t0 = time.monotonic()
        for _ in range(2):
            batch = next(it)
        planned = time.monotonic() - t0
        assert batch["input_ids"].shape[1] == 64
    finally:
        done.set()
        big.close()
        reader.join(60)
    gaps = result["gaps"]
    assert len(gaps) > 10, gaps
    assert max(gaps) < 1.0, f"largest gap {max(gaps):.2f} s while a 8192-rank budget stream planned ({planned:.1f} s)"
