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


def gaps_while(address: str, started: threading.Event, busy: threading.Event, enough: threading.Event,
               done: threading.Event, gaps: list[float]) -> None:
    """Append to ``gaps`` the gaps between the batches of a small stream, from the moment ``busy`` is
    set to ``done``; ``started`` is set once its first batch has come, ``enough`` at 11 gaps."""
    ds = StreamingDataset(address, dataset="stdlib", seq_len=256, batch_size=2, batches_per_message=1,
                          decode_ahead=0, fields=["tokens"])
    last = None
    try:
        for _ in ds:
            now = time.monotonic()
            started.set()
            if busy.is_set() and last is not None:
                gaps.append(now - last)
                if len(gaps) > 10:
                    enough.set()
            last = now
            if done.is_set():
                break
    finally:
        started.set()
        enough.set()
        ds.close()


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
    started, busy, enough, done = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    gaps: list[float] = []
    reader = threading.Thread(target=gaps_while, args=(server.address, started, busy, enough, done, gaps))
    reader.start()
    assert started.wait(60), "the small stream never got its first batch"
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
        # The big stream's planning may be quick now; keep it open until the small stream has shown
        # enough gaps to judge, whatever the machine's speed.
        enough.wait(60)
    finally:
        done.set()
        big.close()
        reader.join(60)
    assert len(gaps) > 10, gaps
    assert max(gaps) < 1.0, f"largest gap {max(gaps):.2f} s while a 8192-rank budget stream planned ({planned:.1f} s)"
