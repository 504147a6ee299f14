"""Abuse by connections (issue 17, items 3 and 4). Health Watch and reflection streams need no token
and never end: they have their own cap, so a flood of them cannot take the slots trainers need.
Raw TCP connections that never speak are closed after the handshake timeout, beyond
``server.max_connections`` at once, and the server raises its open-file limit: they cannot use
up its descriptors. Every cap a client can meet says "retry" (the retry key) and the client does."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client import StreamingDataset
from client.transport import retryable
from tokenfeed.wire import RETRY_AFTER_KEY
from server.config import ServerSettings
from tests.conftest import jsonl_config, make_documents, write_jsonl
from tests.resume_helpers import same_batches, take
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

TOKEN = "alpha-0123456789abcdef"
SEQ, BATCH = 32, 2
#: Short enough to keep the file fast, long enough for a trainer to stream while the idle sockets
#: are still open (it needs well under a second).
HANDSHAKE_S = 4.0
#: Time for the server to close hundreds of sockets once the timeout passed, on a loaded machine.
SLACK_S = 3.0
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    write_jsonl(path, make_documents(60, seed=17), files=2)
    return path


class Reconnects(logging.Handler):
    """Sets ``seen`` when the client logs that it retries (so a test waits on it, not a sleep)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "reconnecting in" in record.getMessage():
            self.seen.set()


@pytest.fixture
def reconnects() -> Iterator[Reconnects]:
    handler, logger = Reconnects(), logging.getLogger("client.transport")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


# ---- helpers ----------------------------------------------------------------------------------------
def batches(address: str, n: int, **kw: object) -> list[dict]:
    """``n`` batches of a fresh trainer-side dataset: what a trainer gets."""
    return take(StreamingDataset(address, "docs", seq_len=SEQ, batch_size=BATCH, **kw), n)


def own_channel(address: str) -> grpc.Channel:
    """A channel with its own connection (channels with the same arguments share one)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def open_watches(channels: list[grpc.Channel], n: int) -> list[grpc.Future]:
    """``n`` health Watch calls spread over ``channels``; a watch never ends by itself."""
    stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
    return [stubs[i % len(stubs)].Watch(health_pb2.HealthCheckRequest(service="")) for i in range(n)]


def first_replies(calls: list) -> list[health_pb2.HealthCheckResponse | grpc.RpcError]:
    """Each call's first reply, or its error (a refused watch ends with one at once)."""
    out: list[health_pb2.HealthCheckResponse | grpc.RpcError] = []
    for call in calls:
        try:
            out.append(next(call))
        except grpc.RpcError as err:
            out.append(err)
    return out


def refusals(replies: list) -> list[grpc.RpcError]:
    return [r for r in replies if isinstance(r, grpc.RpcError)]


def says_retry(err: grpc.RpcError) -> bool:
    """RESOURCE_EXHAUSTED with the retry key, which the client treats as "retry later"."""
    keys = {key for key, _ in err.trailing_metadata() or ()}
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and RETRY_AFTER_KEY in keys and retryable(err)


def connect_idle(address: str, n: int) -> list[socket.socket]:
    """``n`` plain TCP connections that never send a byte (not even the HTTP/2 preface)."""
    host, port = address.rsplit(":", 1)
    return [socket.create_connection((host, int(port)), timeout=10) for _ in range(n)]


def at_eof(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (EOF or reset); what it sent first (its HTTP/2
    SETTINGS) is read and dropped. Never blocks."""
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except BlockingIOError:
        return False


def closed_by_server(socks: list[socket.socket], deadline: float) -> set[socket.socket]:
    """The sockets the server has closed by ``deadline`` (woken by the selector, not polled); a
    deadline already passed looks once."""
    closed: set[socket.socket] = set()
    with selectors.DefaultSelector() as sel:
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        while len(closed) < len(socks):
            left = deadline - time.monotonic()
            for key, _ in sel.select(max(0.0, left)):
                if at_eof(key.fileobj):
                    closed.add(key.fileobj)
                    sel.unregister(key.fileobj)
            if left <= 0:
                break
    return closed


@contextlib.contextmanager
def soft_fd_limit(soft: int) -> Iterator[None]:
    """Run the block (a server start: the child inherits it) under a lower soft open-file limit,
    like a host whose default soft limit the idle connections can exhaust."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def hard_fd_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 30 if hard == resource.RLIM_INFINITY else hard


# ---- health Watch and reflection --------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.timeout(60)
def test_700_health_watches_leave_an_authenticated_trainer_its_batches(start_server, data: Path,
                                                                      tmp_path: Path) -> None:
    """Before the fix gRPC's cap on all calls (2 x max_streams + 64 = 576) filled with watches and
    the trainer got RESOURCE_EXHAUSTED without the retry key: a final error. Now watches beyond
    ``max_health_watches`` are refused (with the key) and trainers meet only their own cap."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN}\n")
    server = start_server(jsonl_config(data, auth_tokens_file=str(tokens)))
    reference = batches(server.address, 4, token=TOKEN)
    channels = [own_channel(server.address) for _ in range(7)]
    watches = open_watches(channels, 700)
    try:
        replies = first_replies(watches)
        assert same_batches(batches(server.address, 4, token=TOKEN, reconnect_deadline_s=20), reference)
        watching = [r for r in replies if not isinstance(r, grpc.RpcError)]
        assert len(watching) == ServerSettings().max_health_watches and {r.status for r in watching} == {SERVING}
        refused = refusals(replies)
        assert len(refused) == 700 - len(watching) and all(says_retry(e) for e in refused), refused[0]
        assert "max_health_watches" in refused[0].details()
        # Probes that poll (container HEALTHCHECK, Kubernetes) use Check: never capped.
        check = health_pb2_grpc.HealthStub(channels[0]).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == SERVING
    finally:
        for call in watches:
            call.cancel()
        for channel in channels:
            channel.close()


# ---- idle connections and descriptors -------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.timeout(60)
def test_500_idle_connections_neither_exhaust_descriptors_nor_stay_open(start_server, data: Path) -> None:
    """The server starts under a soft open-file limit below the flood (it raises it to the hard
    limit); 500 connections that never send the HTTP/2 preface do not keep a new client out, and
    the server closes every one of them within the handshake timeout."""
    assert os.path.isdir("/proc/self/fd") and hard_fd_limit() >= 2048, \
        "this check needs Linux and a hard open-file limit well above 500 (raise it: ulimit -Hn)"
    with soft_fd_limit(max(256, len(os.listdir("/proc/self/fd")) + 64)):
        server = start_server(jsonl_config(data, handshake_timeout_s=HANDSHAKE_S))
    idle = connect_idle(server.address, 500)
    connected = time.monotonic()
    try:
        got = batches(server.address, 4, reconnect_deadline_s=HANDSHAKE_S)  # the first channel here: a new connection
        still_open = len(idle) - len(closed_by_server(idle, time.monotonic()))
        assert still_open > 0, "the client got in only after the idle connections were gone"
        closed = closed_by_server(idle, connected + HANDSHAKE_S + SLACK_S)
        assert len(closed) == len(idle), f"{len(idle) - len(closed)} idle connections outlived the handshake timeout"
        assert same_batches(got, batches(server.address, 4))
    finally:
        for s in idle:
            s.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_connections_past_max_connections_are_closed_at_once_and_clients_get_in_later(
        start_server, data: Path, reconnects: Reconnects) -> None:
    """With 50 connection slots, 200 idle sockets: 150 are closed at once (not after the
    handshake timeout), a trainer's connection too; it retries (UNAVAILABLE is retryable) and
    gets in, with the right batches, once the handshake timeout has freed the slots."""
    server = start_server(jsonl_config(data, max_connections=50, handshake_timeout_s=HANDSHAKE_S))
    idle = connect_idle(server.address, 200)
    try:
        at_once = closed_by_server(idle, time.monotonic() + 1.0)  # well before the handshake timeout
        assert len(at_once) == 150
        got: list[dict] = []
        trainer = threading.Thread(target=lambda: got.extend(batches(server.address, 4)))
        trainer.start()
        assert reconnects.seen.wait(HANDSHAKE_S), "the trainer got a slot while all were held"
        trainer.join(HANDSHAKE_S + SLACK_S + 10)
        assert len(got) == 4
        assert len(closed_by_server(idle, time.monotonic())) == 200
        assert same_batches(got, batches(server.address, 4))
    finally:
        for s in idle:
            s.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_trainer_between_epochs_outlives_its_idle_connection(start_server, data: Path, reconnects: Reconnects,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Pings are not calls: a trainer that pings through a pause between epochs (no stream open)
    still loses its connection after ``connection_idle_s``, and its next stream opens a new one
    by itself: no error, no retry, and exactly the batches an uninterrupted trainer gets."""
    monkeypatch.setenv("TOKENFEED_KEEPALIVE_S", "1")
    server = start_server(jsonl_config(data, connection_idle_s=1.0, min_client_ping_interval_s=0.5))
    trainer = StreamingDataset(server.address, "docs", seq_len=SEQ, batch_size=BATCH)
    first = take(trainer, 3)
    idle = threading.Event()
    trainer._channel.stub  # noqa: B018 - the channel of this process, as the trainer uses it
    trainer._channel._channel.subscribe(lambda state: state == grpc.ChannelConnectivity.IDLE and idle.set())
    assert idle.wait(15), "the server never closed the idle connection"
    second = take(trainer, 3)
    assert not reconnects.seen.is_set()
    assert same_batches(first + second, batches(server.address, 6))


# ---- every cap says "retry" ----------------------------------------------------------------------------
def reflection_refusal(channel: grpc.Channel) -> grpc.RpcError | None:
    """The error a reflection stream gets, or None when it is served."""
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    try:
        next(call)
        return None
    except grpc.RpcError as err:
        return err
    finally:
        call.cancel()


def served_again(channel: grpc.Channel, deadline: float) -> bool:
    """Whether a reflection stream is served again before ``deadline``: the server frees the slots
    of cancelled watches as the cancellations reach it (nothing to wait on from here: retried)."""
    while (err := reflection_refusal(channel)) is not None and time.monotonic() < deadline:
        assert says_retry(err), err
        time.sleep(0.05)
    return err is None


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_every_cap_a_client_meets_says_retry_and_the_client_retries(start_server, data: Path,
                                                                   reconnects: Reconnects) -> None:
    """With one stream slot (gRPC's old cap on all calls: 2 x 1 + 64 = 66) and 70 watches: the
    watches past their cap, a reflection stream and a second data stream all get
    RESOURCE_EXHAUSTED with the retry key; a trainer retries until the slot frees, then streams."""
    server = start_server(jsonl_config(data, max_streams=1))
    channel = own_channel(server.address)
    holder = pb_grpc.TokenFeedStub(channel).StreamBatches(
        pb.StreamRequest(dataset="docs", seq_len=SEQ, batch_size=BATCH, world_size=1))
    watches = open_watches([channel], 70)
    try:
        next(holder)
        refused = refusals(first_replies(watches))
        assert len(refused) == 70 - ServerSettings().max_health_watches and all(says_retry(e) for e in refused)
        err = reflection_refusal(channel)
        assert err is not None and says_retry(err), err
        with pytest.raises(grpc.RpcError) as info:  # a watch holds its request: it must be small
            next(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="x" * 100_000)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            next(pb_grpc.TokenFeedStub(channel).StreamBatches(
                pb.StreamRequest(dataset="docs", seq_len=SEQ, batch_size=BATCH, world_size=1, seed=1)))
        assert says_retry(info.value) and "max_streams" in info.value.details()
        got: list[dict] = []
        trainer = threading.Thread(target=lambda: got.extend(batches(server.address, 4)))
        trainer.start()
        assert reconnects.seen.wait(20), "the trainer did not retry the refused stream"
        holder.cancel()
        trainer.join(30)
        assert len(got) == 4
    finally:
        holder.cancel()
        for call in watches:
            call.cancel()
    assert served_again(channel, deadline=time.monotonic() + 10), "cancelled watches kept their slots"
    channel.close()
    assert same_batches(got, batches(server.address, 4))  # retried: if the slot is still held, it waits
