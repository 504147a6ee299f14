"""A client cannot hurt the server through its shared-memory ring (issue 17, contract 9): a ring
truncated under a running stream ends that stream with a clear status while the server and every
other stream go on exactly; a ring file another user owns is never used; a client whose ring
broke reconnects with tokens inline and loses nothing."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import StreamingDataset
from client.transport import Backoff, Channel, stream_batches
from tests.conftest import jsonl_config
from tests.resume_helpers import same_batches
from tokenfeed import shm, wire
from tokenfeed.shm import ClientRing, RingBroken, ServerRing
from tokenfeed.v1 import tokenfeed_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SEQ, BATCH = 64, 2
SLOT = BATCH * (SEQ + 1) * 2  # one batch of uint16 tokens per message
NOBODY = 65534

#: Giving a file to another user needs root (CI runs as root, as scripts/test.sh needs for apt).
ROOT_NEEDED = "this test chowns a file to another uid: run the suite as root (CI does)"


@pytest.fixture
def ring_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory both sides use for rings (the client reads ``TOKENFEED_SHM_DIR``)."""
    d = tmp_path / "shm"
    d.mkdir()
    monkeypatch.setenv("TOKENFEED_SHM_DIR", str(d))
    return d


def request(ring: ClientRing | None = None) -> pb.StreamRequest:
    req = pb.StreamRequest(dataset="docs", seq_len=SEQ, batch_size=BATCH, world_size=1, batches_per_message=1)
    if ring is not None:
        req.shared_memory.CopyFrom(ring.spec())
    return req


def open_call(channel: grpc.Channel, req: pb.StreamRequest) -> Iterator[pb.BatchChunk]:
    """A raw ``StreamBatches`` call: the test decides what to read from the ring, and when."""
    return channel.unary_stream("/tokenfeed.v1.TokenFeed/StreamBatches",
                                request_serializer=pb.StreamRequest.SerializeToString,
                                response_deserializer=pb.BatchChunk.FromString)(req, timeout=60)


def take_batches(address: str, n: int, **kw) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` batches of a plain stream, copied (a ring's views do not outlive it)."""
    out = []
    for batch in StreamingDataset(address, "docs", seq_len=SEQ, batch_size=BATCH, reconnect_deadline_s=5, **kw):
        out.append({k: v.clone() for k, v in batch.items()})
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def break_ring_mid_stream(address: str, cut: int) -> grpc.RpcError:
    """A hostile client: offer a ring of two slots, take two messages through it (the server now
    waits for a free slot), truncate the file to ``cut`` bytes and, where the header survived,
    free a slot so the server writes into the truncated part. Returns how the stream ended."""
    ring = ClientRing(2, SLOT)
    channel = grpc.insecure_channel(address)
    call = open_call(channel, request(ring))
    try:
        assert [next(call).shm_slot for _ in range(2)] == [0, 1]
        os.truncate(ring.path, cut)
        if cut >= shm.HEADER_BYTES:  # our own mapping still covers the header: release is safe here
            ring.release(1)
        with pytest.raises(grpc.RpcError) as info:
            for message in call:  # never touch the (truncated) slots: we would kill ourselves
                assert message.HasField("shm_slot")
        return info.value
    finally:
        call.cancel()
        channel.close()
        ring.close()


@pytest.mark.parametrize("cut", [0, shm.HEADER_BYTES], ids=["to-zero", "to-header"])
def test_a_ring_truncated_mid_stream_ends_only_its_own_stream(start_server, corpus, ring_dir, cut):
    path, _ = corpus
    server = start_server(jsonl_config(path, shared_memory_dir=str(ring_dir)))
    want = take_batches(server.address, 30, shared_memory=False)
    started, hostile_done = threading.Event(), threading.Event()

    def normal() -> list[dict[str, torch.Tensor]]:
        """A well-behaved client through its own ring, streaming across the hostile one's attack."""
        out = []
        for batch in StreamingDataset(server.address, "docs", seq_len=SEQ, batch_size=BATCH, shared_memory=True,
                                      decode_ahead=0, reconnect_deadline_s=5):
            out.append({k: v.clone() for k, v in batch.items()})
            if len(out) == 10:
                started.set()
                assert hostile_done.wait(60), "the hostile client never finished"
            if len(out) == len(want):
                return out
        raise AssertionError("stream ended")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(normal)
        try:
            assert started.wait(60), "the normal stream never started"
            err = break_ring_mid_stream(server.address, cut)
        finally:
            hostile_done.set()
        assert server.proc.poll() is None, f"the server died (exit {server.proc.returncode})"
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (err.code(), err.details())
        assert "shared-memory ring" in err.details() and "without shared memory" in err.details(), err.details()
        got = future.result(timeout=60)
    assert same_batches(got, want), "the normal stream's batches changed"
    assert serving(server.address)
    assert server.log().count("tokens through shared memory") >= 2  # both clients went through rings
    assert "Traceback" not in server.log()


def test_a_ring_file_another_user_owns_is_never_used(start_server, corpus, ring_dir):
    assert os.geteuid() == 0, ROOT_NEEDED
    path, _ = corpus
    server = start_server(jsonl_config(path, shared_memory_dir=str(ring_dir)))
    want = take_batches(server.address, 3, shared_memory=False)
    ring = ClientRing(4, SLOT)  # room for all three messages: the server never waits on it
    os.chown(ring.path, NOBODY, NOBODY)
    channel = grpc.insecure_channel(server.address)
    call = open_call(channel, request(ring))
    try:
        got = [next(call) for _ in range(3)]
        assert not any(m.HasField("shm_slot") for m in got), "the server wrote into another user's file"
        for message, batch in zip(got, want):
            assert np.array_equal(wire.decode_chunk(message)[0, :, :-1], batch["input_ids"].numpy())
        assert not any(bytes(ring.view(slot, SLOT)).strip(b"\0") for slot in range(4)), "the file was written"
    finally:
        call.cancel()
        channel.close()
        ring.close()
    assert server.proc.poll() is None and serving(server.address)


def test_a_client_whose_ring_breaks_resumes_inline_exactly(start_server, corpus, ring_dir):
    """Something truncates a well-behaved client's ring (the client has already unlinked it): the
    server ends that call, and the client reconnects from its cursor with tokens inline."""
    path, _ = corpus
    server = start_server(jsonl_config(path, shared_memory_dir=str(ring_dir)))
    want = [b["input_ids"] for b in take_batches(server.address, 12, shared_memory=False)]
    handles: list[int] = []

    def ring_from() -> ClientRing:
        ring = ClientRing(1, SLOT)  # one slot: the server writes message m+1 only after we release m
        handles.append(os.open(ring.path, os.O_RDWR))  # the file outlives its name (unlinked at once)
        return ring

    channel = Channel(server.address, 16 << 20)
    stream = stream_batches(channel, lambda cursor, step: request_from(cursor), None, 0, 1, Backoff(deadline_s=5),
                            ring_from=ring_from)
    got, through_ring = [], []
    try:
        for chunk, i in stream:
            through_ring.append(chunk.HasField("shm_slot"))
            got.append(torch.from_numpy(wire.decode_chunk(chunk)[i, :, :-1].astype(np.int64)))
            if len(got) == 1:
                os.ftruncate(handles[0], shm.HEADER_BYTES)  # the server's next write would be past the end
            if len(got) == len(want):
                break
    finally:
        stream.close()
        channel.close()
        for fd in handles:
            os.close(fd)
    assert through_ring[0] and not any(through_ring[1:]), through_ring
    assert len(handles) == 1, "the client offered shared memory again after its ring broke"
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert server.proc.poll() is None and serving(server.address)


def request_from(cursor: pb.Cursor | None) -> pb.StreamRequest:
    req = request()
    if cursor is not None:
        req.cursor.CopyFrom(cursor)
    return req


@pytest.mark.parametrize("cut", [0, 41, shm.HEADER_BYTES, shm.HEADER_BYTES + SLOT // 2])
def test_a_truncated_ring_is_an_error_never_a_signal(tmp_path, cut):
    """The server side of a ring reads and writes the client's file with pread/pwrite: whatever
    the client did to the file, the server gets ``RingBroken`` (an OSError), never SIGBUS."""
    ring = ClientRing(2, SLOT, str(tmp_path))
    server = ServerRing.attach(ring.spec(), str(tmp_path))
    try:
        server.write(0, b"\1" * SLOT)
        assert bytes(ring.view(0, SLOT)) == b"\1" * SLOT
        os.truncate(ring.path, cut)
        with pytest.raises(RingBroken, match="truncated"):
            server.write(1, b"\2" * SLOT)
        if cut < 48:  # the released counter is gone
            with pytest.raises(RingBroken, match="truncated"):
                server.released()
    finally:
        server.close()
        ring.unlink()


def test_attach_refuses_a_file_another_user_owns(tmp_path):
    assert os.geteuid() == 0, ROOT_NEEDED
    ring = ClientRing(2, SLOT, str(tmp_path))
    os.chown(ring.path, NOBODY, NOBODY)
    with pytest.raises(OSError, match="owned by uid 65534"):
        ServerRing.attach(ring.spec(), str(tmp_path))
    ring.close()
