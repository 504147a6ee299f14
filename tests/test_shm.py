"""Tokens through a shared-memory ring when the client is on the server's host: the same batches
as inline, a slot never overwritten before the client is done with it, inline whenever the
server cannot use the ring, and a clear refusal of a malformed offer."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from client import StreamingDataset
from client.transport import Backoff, Channel, stream_batches
from tests.conftest import jsonl_config
from tokenfeed import shm, wire
from tokenfeed.shm import ClientRing, ServerRing
from tokenfeed.v1 import tokenfeed_pb2 as pb

SEQ, BATCH = 64, 2


@pytest.fixture
def ring_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory both sides use for rings (the client reads ``TOKENFEED_SHM_DIR``)."""
    d = tmp_path / "shm"
    d.mkdir()
    monkeypatch.setenv("TOKENFEED_SHM_DIR", str(d))
    return d


def request(bpm: int = 1) -> pb.StreamRequest:
    return pb.StreamRequest(dataset="docs", seq_len=SEQ, batch_size=BATCH, world_size=1, batches_per_message=bpm)


def batches(address: str, n: int, **kw) -> list[dict[str, torch.Tensor]]:
    out = []
    for batch in StreamingDataset(address, "docs", seq_len=SEQ, batch_size=BATCH, **kw):
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


def chunks(address: str, n: int, slots: int, bpm: int = 1) -> list:
    """The first ``n`` chunks of a stream that offers a ring of ``slots`` (tokens copied out)."""
    channel = Channel(address, 16 << 20)
    stream = stream_batches(channel, lambda cursor, step: request(bpm), None, 0, 1, Backoff(deadline_s=5),
                            ring_from=lambda: ClientRing(slots, bpm * BATCH * (SEQ + 1) * 2))
    out = []
    try:
        for chunk, i in stream:
            if i == 0:
                out.append((chunk.HasField("shm_slot"), wire.decode_chunk(chunk).copy()))
                if len(out) == n:
                    return out
    finally:
        stream.close()
        channel.close()
    raise AssertionError("stream ended")


def test_tokens_come_through_the_ring_and_match_the_inline_stream(start_server, corpus, ring_dir):
    path, _ = corpus
    server = start_server(jsonl_config(path, shared_memory_dir=str(ring_dir)))
    inline = chunks(server.address, 40, slots=2, bpm=1)  # 40 messages through 2 slots: 20 laps
    assert all(used for used, _ in inline), "the server did not write into the ring"
    assert list(ring_dir.iterdir()) == [], "the client left its ring file behind"
    want = batches(server.address, 40, shared_memory=False)
    got = batches(server.address, 40, shared_memory=True, batches_per_message=3, decode_ahead=0)
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert all(np.array_equal(t[0, :, :-1], w["input_ids"].numpy()) for (_, t), w in zip(inline, want))
    assert "tokens through shared memory" in server.log()


def test_a_slot_is_not_rewritten_until_the_client_is_done_with_it(start_server, corpus, ring_dir):
    path, _ = corpus
    server = start_server(jsonl_config(path, shared_memory_dir=str(ring_dir)))
    expected = [t for _, t in chunks(server.address, 3, slots=8)]
    ring = ClientRing(2, BATCH * (SEQ + 1) * 2)
    req = request()
    req.shared_memory.CopyFrom(ring.spec())
    channel = grpc.insecure_channel(server.address)
    call = channel.unary_stream("/tokenfeed.v1.TokenFeed/StreamBatches",
                                request_serializer=pb.StreamRequest.SerializeToString,
                                response_deserializer=pb.BatchChunk.FromString)(req)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        first, second = next(call), next(call)
        assert (first.shm_slot, second.shm_slot) == (0, 1)
        held = np.frombuffer(ring.view(0, expected[0].nbytes), dtype="<u2").copy()
        third = pool.submit(next, call)
        with pytest.raises(concurrent.futures.TimeoutError):  # both slots held: the server waits
            third.result(timeout=0.5)
        assert np.array_equal(np.frombuffer(ring.view(0, expected[0].nbytes), dtype="<u2"), held)
        assert np.array_equal(held.reshape(expected[0].shape), expected[0])
        ring.release(1)  # done with message 0: its slot may take message 2
        msg = third.result(timeout=30)
        assert msg.shm_slot == 0
        got = np.frombuffer(ring.view(0, expected[2].nbytes), dtype="<u2").reshape(expected[2].shape)
        assert np.array_equal(got, expected[2])
    finally:
        call.cancel()
        pool.shutdown()
        channel.close()
        ring.close()
    # the abandoned stream took nothing down: a new one is served
    assert len(batches(server.address, 3, shared_memory=True)) == 3


@pytest.mark.parametrize("server_side", ["other_dir", "disabled"])
def test_a_ring_the_server_cannot_use_means_tokens_inline(start_server, corpus, ring_dir, tmp_path, server_side):
    path, _ = corpus
    settings = ({"shared_memory_dir": str(tmp_path)} if server_side == "other_dir" else {"shared_memory": False})
    server = start_server(jsonl_config(path, **settings))
    got = chunks(server.address, 5, slots=2)
    assert not any(used for used, _ in got)
    assert list(ring_dir.iterdir()) == [], "the client left its ring file behind"
    want = [t for _, t in chunks(start_server(jsonl_config(path, shared_memory_dir=str(ring_dir))).address, 5, slots=2)]
    assert all(np.array_equal(a, b) for (_, a), b in zip(got, want))


@pytest.mark.parametrize(("change", "message"), [
    ({"slots": 0}, "shared_memory: slots must be in"),
    ({"slot_bytes": 10}, "cannot hold a message of"),
    ({"path": "/tmp/../etc/passwd"}, "path must name a tokenfeed ring"),
    ({"pipe": "/etc/passwd"}, "shared_memory.pipe: pipe must be the ring's path followed by '.pipe'"),
])
def test_a_malformed_offer_is_refused_with_the_field_named(start_server, corpus, ring_dir, change, message):
    path, _ = corpus
    server = start_server(jsonl_config(path, shared_memory_dir=str(ring_dir)))
    ring = ClientRing(2, BATCH * (SEQ + 1) * 2)
    req = request()
    req.shared_memory.CopyFrom(ring.spec())
    for key, value in change.items():
        setattr(req.shared_memory, key, value)
    channel = grpc.insecure_channel(server.address)
    try:
        with pytest.raises(grpc.RpcError) as err:
            next(channel.unary_stream("/tokenfeed.v1.TokenFeed/StreamBatches",
                                      request_serializer=pb.StreamRequest.SerializeToString,
                                      response_deserializer=pb.BatchChunk.FromString)(req))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
    finally:
        channel.close()
        ring.close()
    assert len(batches(server.address, 2)) == 2  # the server is still up for everyone else


def test_the_server_opens_only_the_clients_own_file(tmp_path):
    ring = ClientRing(2, 4096, str(tmp_path))
    directory = str(tmp_path)
    attached = ServerRing.attach(ring.spec(), directory)
    attached.write(0, b"abcd")
    assert bytes(ring.view(0, 4)) == b"abcd"
    attached.close()

    forged = ring.spec()
    forged.nonce = bytes(16)
    with pytest.raises(OSError, match="does not match"):
        ServerRing.attach(forged, directory)
    with pytest.raises(OSError, match="shared-memory directory"):
        ServerRing.attach(ring.spec(), str(tmp_path / "elsewhere"))
    link = tmp_path / "tokenfeed-1-0123456789abcdef"
    link.symlink_to(ring.path)
    linked = ring.spec()
    linked.path = str(link)
    with pytest.raises(OSError):  # O_NOFOLLOW: never through a link
        ServerRing.attach(linked, directory)
    ring.close()
    assert not os.path.exists(ring.path)
    with pytest.raises(FileNotFoundError):
        ServerRing.attach(ring.spec(), directory)


def test_no_ring_where_none_can_be_made(tmp_path, monkeypatch):
    from client.transport import make_ring

    monkeypatch.setenv("TOKENFEED_SHM_DIR", str(tmp_path / "missing"))
    assert make_ring(2, 4096) is None
    assert shm.default_dir() == str(tmp_path / "missing")


def test_rings_left_by_killed_clients_are_swept(tmp_path):
    """A client killed before its first message leaves its file; the next client removes files
    of processes that are gone, once they are old, and nothing else."""
    import subprocess
    import sys
    import time

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    old = time.time() - 2 * shm.STALE_S
    leftovers = {
        "stale": tmp_path / f"tokenfeed-{pid}-{'a' * 16}",          # creator gone, old: removed
        "young": tmp_path / f"tokenfeed-{pid}-{'b' * 16}",          # creator gone, recent: kept
        "alive": tmp_path / f"tokenfeed-{os.getpid()}-{'c' * 16}",  # creator alive: kept
        "other": tmp_path / "tokenfeed-notes.txt",                  # not a ring name: kept
    }
    for name, path in leftovers.items():
        path.write_bytes(b"x")
        if name != "young":
            os.utime(path, (old, old))
    assert shm.sweep(str(tmp_path)) == [str(leftovers["stale"])]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for k, p in leftovers.items() if k != "stale")


async def test_a_client_holding_its_ring_is_polled_by_the_time_it_has_been_idle():
    """A client that holds every slot (a rank with its first batch, waiting for the job's other
    ranks to start) is polled about as often as it has been idle, up to 0.25 s apart: at the pace's
    first guess (40 ms) each of a 1,024-rank job's ranks woke its server 50 times a second while
    the rest started, 0.6 of the machine's two cores on four replicas (issue 23)."""
    import asyncio

    from server.serve.ring import RingWriter

    class Held:  # a ring whose client frees nothing
        slots, slot_bytes, reads = 2, 1 << 12, 0

        def released(self) -> int:
            self.reads += 1
            return 0

    ring = Held()
    writer = RingWriter(ring)  # type: ignore[arg-type]
    writer.message = 2  # both slots written, none freed
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(writer.take((1, 4), np.dtype(np.uint16)), 2.0)
    polls = ring.reads // 2  # each poll reads the counter twice
    assert 5 <= polls <= 30, polls  # 2 s at 20 ms apart: about 100


def test_only_the_first_messages_are_written_before_the_client_frees_a_slot():
    """Until a client frees its first slot, two messages are written ahead, then as many as its
    ring holds: a 1,024-rank job's servers filled every rank's eight slots before the job's last
    rank held its first batch (issue 23)."""
    from server.serve.ring import RING_START_WINDOW, RingWriter

    class Ring:
        slots, slot_bytes, freed = 8, 1 << 12, 0

        def released(self) -> int:
            return self.freed

    ring = Ring()
    writer = RingWriter(ring)  # type: ignore[arg-type]
    assert [writer._writable(m) for m in range(4)] == [m < RING_START_WINDOW for m in range(4)]
    ring.freed = 1
    assert writer._writable(8) and not writer._writable(9)


# ---- messages through the ring's FIFO ------------------------------------------------------------
def raw_call(address: str, req: pb.StreamRequest) -> tuple[grpc.Channel, object]:
    channel = grpc.insecure_channel(address)
    return channel, channel.unary_stream("/tokenfeed.v1.TokenFeed/StreamBatches",
                                         request_serializer=pb.StreamRequest.SerializeToString,
                                         response_deserializer=pb.BatchChunk.FromString)(req)


def test_a_stream_offered_a_fifo_sends_its_messages_there_and_none_over_grpc(start_server, corpus, ring_dir):
    """The server says so in the call's initial metadata, writes each message's tokens into its
    slot and the rest into the FIFO, waits for the client to free a slot as before, and ends the
    stream (OK, the server up) once the client closes its end."""
    path, _ = corpus
    server = start_server(jsonl_config(path, shared_memory_dir=str(ring_dir)))
    expected = [t for _, t in chunks(server.address, 7, slots=8)]  # through the ring, messages over gRPC
    ring = ClientRing(2, BATCH * (SEQ + 1) * 2, pipe=True)
    req = request()
    req.shared_memory.CopyFrom(ring.spec())
    assert req.shared_memory.pipe == ring.path + shm.PIPE_SUFFIX
    channel, call = raw_call(server.address, req)
    try:
        assert (shm.PIPE_KEY, "1") in call.initial_metadata()
        ring.unlink()  # the server has both open
        assert ring.message(0.5) is not None and ring.message(0.5) is not None
        assert ring.message(0.5) is None, "a third message before the client freed a slot of two"
        ring.release(2)
        for m in range(2, 7):
            chunk = pb.BatchChunk.FromString(ring.message(30))
            assert chunk.shm_slot == m % 2 and len(chunk.cursors) == 1
            got = np.frombuffer(ring.view(chunk.shm_slot, expected[m].nbytes), dtype="<u2")
            assert np.array_equal(got.reshape(expected[m].shape), expected[m]), m
            ring.release(m + 1)
        ring.close()  # the client goes: the server's next write fails, its stream ends
        assert list(call) == [], "a message came over gRPC"
        assert call.code() == grpc.StatusCode.OK
    finally:
        call.cancel()
        channel.close()
        ring.close()
    assert list(ring_dir.iterdir()) == []
    assert len(batches(server.address, 3)) == 3  # the server is up for everyone else
    assert "messages through its FIFO" in server.log()


def test_the_fifo_is_read_to_its_end_before_the_calls_status(start_server, corpus, ring_dir):
    """A stream the server ends (here: the client broke its ring) closes the FIFO before the
    status goes out: the client gets the messages written before the end, then the status. A
    server that cannot use the offered FIFO (a regular file by that name) sends the messages over
    gRPC instead."""
    path, _ = corpus
    server = start_server(jsonl_config(path, shared_memory_dir=str(ring_dir)))
    ring = ClientRing(4, BATCH * (SEQ + 1) * 2, pipe=True)
    req = request()
    req.shared_memory.CopyFrom(ring.spec())
    channel, call = raw_call(server.address, req)
    try:
        messages = list(itertools.islice(_piped_chunks(call, ring), 2))
        assert len(messages) == 2
        os.truncate(ring.path, 100)  # the client breaks its own ring: the server's next write fails
        ring.release(2)
        with pytest.raises(grpc.RpcError) as err:
            list(_piped_chunks(call, ring))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert any(k == shm.BROKEN_KEY for k, _ in err.value.trailing_metadata())
    finally:
        call.cancel()
        channel.close()
        ring.close()

    plain = ClientRing(2, BATCH * (SEQ + 1) * 2)
    open(plain.path + shm.PIPE_SUFFIX, "wb").close()  # not a FIFO
    req = request()
    req.shared_memory.CopyFrom(plain.spec())
    req.shared_memory.pipe = plain.path + shm.PIPE_SUFFIX
    channel, call = raw_call(server.address, req)
    try:
        assert not any(k == shm.PIPE_KEY for k, _ in call.initial_metadata())
        assert next(call).shm_slot == 0
    finally:
        call.cancel()
        channel.close()
        plain.close()


def _piped_chunks(call, ring: ClientRing):
    from client.transport import _messages

    return _messages(call, ring)


def test_fifo_messages_arrive_whole_however_the_bytes_are_split(tmp_path):
    """``ClientRing.message``: a message torn across reads waits for its rest; ``None`` on a
    timeout; ``EOFError`` once the server closed its end, after every message it wrote."""
    from tokenfeed.shm import ServerPipe

    ring = ClientRing(2, 4096, str(tmp_path), pipe=True)
    pipe = ServerPipe.attach(ring.spec())
    try:
        assert ring.message(0.01) is None
        framed = b"".join(b"".join(ServerPipe.frame(m)) for m in (b"first", b"", b"x" * 70_000))
        os.write(pipe.fd, framed[:3])  # part of the first length
        assert ring.message(0.01) is None
        os.write(pipe.fd, framed[3:20])
        assert ring.message(0.01) == b"first"
        assert ring.message(0.01) == b""
        assert ring.message(0.01) is None  # the third is not whole yet
        os.write(pipe.fd, framed[20:])
        assert ring.message(1) == b"x" * 70_000
        os.write(pipe.fd, b"".join(ServerPipe.frame(b"last")))
    finally:
        pipe.close()
    assert ring.message(1) == b"last"
    with pytest.raises(EOFError):
        ring.message(1)
    ring.close()
    assert list(tmp_path.iterdir()) == []


async def test_a_full_fifo_makes_the_server_wait_for_the_reader_and_a_closed_one_ends_the_stream(tmp_path):
    import asyncio

    from server.serve.ring import send_piped
    from tokenfeed.shm import ServerPipe

    ring = ClientRing(2, 4096, str(tmp_path), pipe=True)
    pipe = ServerPipe.attach(ring.spec())
    big = os.urandom(3 << 20)  # more than any FIFO holds
    sent = asyncio.create_task(send_piped(pipe, big))
    await asyncio.sleep(0.05)
    assert not sent.done(), "the whole message cannot be in the FIFO yet"
    assert await asyncio.to_thread(ring.message, 10) == big
    assert await asyncio.wait_for(sent, 10) is True
    ring.close()  # the client's end gone
    assert await send_piped(pipe, b"next") is False
    pipe.close()
