"""Limits and shutdown (issue 8): message sizes validated at start-up and matched by the client,
stream admission (count and memory), bounded request work, keepalive that idle clients survive,
half-open connections detected and resumed, and SIGTERM draining in a fixed order."""

from __future__ import annotations

import itertools
import logging
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import RequestError, StreamingDataset
from client.transport import Keepalive
from tokenfeed.wire import RETRY_AFTER_KEY
from server.config import ServerSettings, largest_batch_bytes
from tests.conftest import ROOT, jsonl_config, make_documents, write_jsonl
from tests.resume_helpers import same_batches, take
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

SEQ, BATCH = 64, 4


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data"
    write_jsonl(path, make_documents(300, seed=4), files=3)
    return path


def request(**fields) -> pb.StreamRequest:
    return pb.StreamRequest(**{"dataset": "docs", "seq_len": SEQ, "batch_size": BATCH, "world_size": 1, **fields})


def stub(address: str, **options) -> tuple[grpc.Channel, pb_grpc.TokenFeedStub]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                      *options.items()])
    return channel, pb_grpc.TokenFeedStub(channel)


class Reconnects(logging.Handler):
    """Sets ``seen`` when the client logs that it reconnects."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "reconnecting in" in record.getMessage():
            self.count += 1
            self.seen.set()


@pytest.fixture
def reconnects():
    handler, logger = Reconnects(), logging.getLogger("client.transport")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


# ---- message sizes --------------------------------------------------------------------------------
def run_cli(tmp_path, config: dict, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "limits.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "server", "serve", "--port", "0", "--config", str(path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_message_limit_too_small_for_the_largest_batch_stops_the_server(tmp_path, data):
    result = run_cli(tmp_path, jsonl_config(data, max_seq_len=8192, max_batch_size=1024, max_message_bytes="4MiB"))
    assert result.returncode == 2, result.stderr
    for word in ("server", "max_message_bytes (4194304)", "max_batch_size=1024", "max_seq_len=8192"):
        assert word in result.stderr
    assert "Traceback" not in result.stderr
    # Unset, the limit is what the largest batch needs (4 bytes a token: the widest wire dtype).
    settings = ServerSettings(max_seq_len=8192, max_batch_size=1024)
    assert settings.max_message_bytes >= largest_batch_bytes(8192, 1024)


def test_largest_messages_pass_both_limits_and_larger_ones_are_refused_up_front(start_server, data):
    server = start_server(jsonl_config(data, max_seq_len=4096, max_batch_size=64, max_message_bytes="16MiB"))
    # 16 batches of 64 x 4097 uint16 tokens: 8.4 MB a message, twice gRPC's default receive limit.
    ds = StreamingDataset(server.address, "docs", seq_len=4096, batch_size=64, batches_per_message=16)
    assert len(take(ds, 20)) == 20
    with pytest.raises(RequestError, match="batches_per_message.*max message size of 16777216") as info:
        next(iter(StreamingDataset(server.address, "docs", seq_len=4096, batch_size=64, batches_per_message=32)))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ---- admission ------------------------------------------------------------------------------------
def test_streams_past_max_streams_are_refused_fast_and_retried(start_server, data, reconnects):
    server = start_server(jsonl_config(data, max_streams=3))
    channel, feed = stub(server.address)
    admitted = [feed.StreamBatches(request(seed=s)) for s in range(3)]
    for call in admitted:
        next(call)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        next(feed.StreamBatches(request(seed=9)))
    assert time.monotonic() - t0 < 2.0
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 3 concurrent streams" in info.value.details() and "max_streams" in info.value.details()
    assert dict(info.value.trailing_metadata())[RETRY_AFTER_KEY]
    for call in admitted:  # the admitted streams go on as if nothing happened
        assert all(isinstance(m, pb.BatchChunk) for m in itertools.islice(call, 50))
    # A StreamingDataset treats the refusal as "retry later" and gets in once a slot frees.
    got: list = []
    waiter = threading.Thread(target=lambda: got.extend(take(StreamingDataset(server.address, "docs", SEQ, BATCH), 3)))
    waiter.start()
    assert reconnects.seen.wait(20), "the client did not retry the refused stream"
    admitted[0].cancel()
    waiter.join(30)
    assert len(got) == 3
    channel.close()


def test_stream_memory_budget_admits_what_fits(start_server, data):
    # Largest message: 64 x 257 x 4 + 1 MiB; the budget holds it and a bit more.
    server = start_server(jsonl_config(data, max_seq_len=256, max_batch_size=64, stream_memory_bytes="1300KiB"))
    channel, feed = stub(server.address)
    big = feed.StreamBatches(request(seq_len=256, batch_size=64, batches_per_message=30))  # ~1 MB charged
    next(big)
    with pytest.raises(grpc.RpcError) as info:
        next(feed.StreamBatches(request(seq_len=256, batch_size=64, batches_per_message=30)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "stream_memory_bytes" in info.value.details()
    assert isinstance(next(feed.StreamBatches(request())), pb.BatchChunk), "a small stream still fits"
    big.cancel()
    channel.close()


def test_requests_that_would_make_the_server_walk_without_end_are_refused(start_server, data):
    server = start_server(jsonl_config(data))
    channel, feed = stub(server.address)
    first = next(feed.StreamBatches(request()))
    cursor = first.cursors[0]
    far = pb.Cursor()
    far.CopyFrom(cursor)
    far.epoch = 1 << 63
    cases = [
        (request(world_size=1 << 20, batch_size=1024, rank=1), "max_rows_per_step"),
        (request(step_stride=1 << 31), "max_rows_per_step"),
        (request(first_step=7, step_stride=2), "first_step"),
        (request(cursor=far), "cursor.epoch"),
    ]
    for req, words in cases:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            next(feed.StreamBatches(req, timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert words in info.value.details() and time.monotonic() - t0 < 2.0
    assert isinstance(next(feed.StreamBatches(request())), pb.BatchChunk)
    channel.close()


# ---- keepalive and half-open connections -------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("server_interval_s, survives", [(0.5, True), (5.0, False)])
def test_an_idle_client_pinging_within_the_agreed_interval_keeps_its_connection(start_server, data,
                                                                              server_interval_s, survives):
    """The client pings every second (gRPC's floor) through long idle gaps, with a stream open and
    with none; a server that accepts that never sends a too_many_pings GOAWAY, so the connection
    stays READY. The control case (a server that expects pings 5 s apart) shows the test sees one."""
    server = start_server(jsonl_config(data, min_client_ping_interval_s=server_interval_s))
    states: list[grpc.ChannelConnectivity] = []
    channel = grpc.insecure_channel(server.address, options=Keepalive(time_s=1.0, timeout_s=5.0).options())
    channel.subscribe(states.append, try_to_connect=True)
    feed = pb_grpc.TokenFeedStub(channel)
    call = feed.StreamBatches(request())
    next(call)
    time.sleep(3.0)  # idle with the stream open (the client reads nothing: flow control stops the server)
    assert all(isinstance(m, pb.BatchChunk) for m in itertools.islice(call, 300))
    call.cancel()
    time.sleep(4.5)  # idle between epochs: no call at all
    assert feed.Describe(pb.DescribeRequest(), timeout=10).datasets[0].name == "docs"
    ready = states.index(grpc.ChannelConnectivity.READY)
    dropped = [s for s in states[ready:] if s != grpc.ChannelConnectivity.READY]
    assert (not dropped) == survives, states
    channel.close()


@pytest.mark.integration
@pytest.mark.parametrize("then", ["resume", "kill"])
def test_a_frozen_server_is_detected_and_the_stream_resumes_exactly(start_server, data, monkeypatch, reconnects,
                                                                   then):
    """SIGSTOP makes the connection half-open: the kernel still holds it, nothing answers. The
    client's keepalive notices, it reconnects from its cursor, and gets every batch exactly once
    after SIGCONT, or from a fresh server after the frozen one is killed."""
    monkeypatch.setenv("TOKENFEED_KEEPALIVE_S", "1")
    monkeypatch.setenv("TOKENFEED_KEEPALIVE_TIMEOUT_S", "1")
    server = start_server(jsonl_config(data))
    got: list = []
    started, back = threading.Event(), threading.Event()

    def consume() -> None:
        it = iter(StreamingDataset(server.address, "docs", SEQ, BATCH, seed=2))
        got.append(next(it))
        started.set()
        while not back.is_set():  # drains what its buffers hold, then waits on the frozen server
            got.append(next(it))
        got.extend(itertools.islice(it, 50))

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert started.wait(30)
    server.proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        assert reconnects.seen.wait(20), "the client never noticed the frozen server"
        detected_s = time.monotonic() - t0
    finally:
        server.proc.send_signal(signal.SIGCONT if then == "resume" else signal.SIGKILL)
    if then == "kill":
        server.proc.wait(10)
        server.start()
    back.set()
    consumer.join(60)
    assert not consumer.is_alive()
    reference = take(StreamingDataset(server.address, "docs", SEQ, BATCH, seed=2), len(got))
    assert same_batches(got, reference), "a batch was lost or repeated"
    assert detected_s < 10


# ---- shutdown -------------------------------------------------------------------------------------
@pytest.mark.integration
def test_sigterm_drains_in_order_and_clients_resume_exactly(start_server, data):
    server = start_server(jsonl_config(data, shutdown_grace_s=10))
    channel, feed = stub(server.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    reference = list(itertools.islice(feed.StreamBatches(request(seed=3)), 400))
    call = feed.StreamBatches(request(seed=3))
    got = [next(call) for _ in range(5)]
    server.proc.send_signal(signal.SIGTERM)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as info:
        got.extend(call)  # what was sent is whole; then the stream ends with a reason
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
    assert server.proc.wait(15) == 0
    log = server.log()
    assert "objects frozen out of the garbage collector" in log  # (start-up's, after it)
    order = [log.index(x) for x in ("NOT_SERVING", "drained 1 stream(s)", "stopped")]
    assert order == sorted(order), log
    server.start()  # resume from the last batch received: exact
    resumed = feed.StreamBatches(request(seed=3, cursor=got[-1].cursors[-1]))
    got += list(itertools.islice(resumed, 400 - len(got)))
    assert [m.tokens for m in got] == [m.tokens for m in reference]
    channel.close()


@pytest.mark.integration
def test_a_client_that_stopped_reading_does_not_hold_up_shutdown(start_server, data):
    """Its stream ends after the message it was assembling, like any other (gRPC holds one
    message per stream; the handler is not stuck behind flow control), well before the grace."""
    server = start_server(jsonl_config(data, shutdown_grace_s=10))
    channel, feed = stub(server.address)
    call = feed.StreamBatches(request())
    next(call)  # and read no more
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    assert time.monotonic() - t0 < 5
    assert "drained 1 stream(s)" in server.log()
    channel.close()


@pytest.mark.integration
def test_a_ring_client_that_stopped_reading_does_not_hold_up_shutdown_and_resumes_exactly(start_server, data):
    """A rank on the server's host that stopped reading (a trainer in an evaluation): its stream
    waits for a free slot of the rank's shared-memory ring, assembling nothing, so it ends at once
    rather than after the grace period. The rank reads what its ring holds, then resumes on the
    restarted server from its cursor: the batches of an uninterrupted stream."""
    from tests.test_metrics import metrics_url, poll, scrape, value

    server = start_server(jsonl_config(data, shutdown_grace_s=10, metrics_port=0))
    opts = {"seq_len": SEQ, "batch_size": BATCH, "seed": 3, "batches_per_message": 1}
    reference = take(StreamingDataset(server.address, "docs", **opts), 40)
    ds = StreamingDataset(server.address, "docs", **opts)
    it = iter(ds)
    got = [next(it) for _ in range(5)]
    url, sent = metrics_url(server), [-1.0]

    def ring_full() -> bool:  # the server sent nothing more over the meters' last flushes (0.1 s)
        before, sent[0] = sent[0], value(scrape(url), "tokenfeed_sent_messages_total")
        time.sleep(0.3)
        return sent[0] == before
    poll(ring_full)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    assert time.monotonic() - t0 < 4, server.log()[-2000:]
    assert "drained 1 stream(s)" in server.log()
    server.start()
    got += [next(it) for _ in range(35)]
    assert same_batches(got, reference)
    ds.close()


def test_default_max_streams_leaves_headroom_for_1024_ranks_on_4_replicas():
    """256 ranks a replica was exactly the old default: a rank that failed over, or reconnected
    before its old stream closed, was refused until its deadline (bench_scale jobstart). The
    default admits twice that many a replica; the memory budget still bounds them."""
    from server.serve.limits import Admission
    settings = ServerSettings()
    admission = Admission(settings.max_streams, int(settings.stream_memory_bytes))
    tickets = [admission.admit(1 << 20) for _ in range(2 * 1024 // 4)]  # 1 MiB each: a 16-batch message
    assert admission.streams == 512
    for t in tickets:
        t.release()
    assert admission.streams == 0
