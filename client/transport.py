"""One stream from a cursor, reopened with jittered exponential backoff when the server goes away
(or a keepalive ping goes unanswered: a half-open connection); TLS and bearer-token credentials."""

from __future__ import annotations

import atexit
import logging
import os
import random
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.experimental

from client.errors import ServerUnavailable, from_rpc_error
from tokenfeed import shm, wire
from tokenfeed.shm import ClientRing
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: Codes after which the stream is reopened from the cursor (the server went away or restarted).
#: A server bug (UNKNOWN, INTERNAL) is raised at once rather than retried until the deadline.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}
#: A RESOURCE_EXHAUSTED carrying this trailing metadata key is a server at its stream limit: retried
#: like UNAVAILABLE. Without it (e.g. a local message-size limit) it is raised.
_LOOPBACK = ("127.", "localhost", "[::1]", "::1", "unix:")
#: How long one connection attempt may take (TCP and TLS handshakes, the server's first HTTP/2
#: frame). gRPC's default is 20 s: a replica that vanished without a reset (a deleted pod's IP that
#: drops packets) or froze held a stream that long before it could fail over (measured: a socket
#: that never accepts fails a call after 20.0 s by default, 1.0 s with 1 s here).
CONNECT_TIMEOUT_S = 5.0


def retryable(err: grpc.RpcError) -> bool:
    """Whether reopening the stream from its cursor may succeed."""
    if err.code() in RETRYABLE:
        return True
    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        return any(key == wire.RETRY_AFTER_KEY for key, _ in trailing or ())
    return False


def ring_broke(err: grpc.RpcError) -> bool:
    """Whether the server ended the call because the call's shared-memory ring broke under it
    (something truncated the file): reopening from the cursor with tokens inline goes on."""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return any(key == shm.BROKEN_KEY for key, _ in trailing or ())


@dataclass(frozen=True)
class Keepalive:
    """Client keepalive: a ping every ``time_s`` (with or without a call open); one unanswered for
    ``timeout_s`` closes the connection, so a frozen or vanished server (a half-open connection)
    fails the stream with UNAVAILABLE and it resumes from its cursor. The server accepts pings
    this often (``server.min_client_ping_interval_s``, default 5 s, must stay below ``time_s``).
    Environment: ``TOKENFEED_KEEPALIVE_S``, ``TOKENFEED_KEEPALIVE_TIMEOUT_S``."""

    time_s: float = 10.0
    timeout_s: float = 10.0

    @classmethod
    def from_env(cls) -> Keepalive:
        try:
            return cls(time_s=float(os.environ.get("TOKENFEED_KEEPALIVE_S", cls.time_s)),
                       timeout_s=float(os.environ.get("TOKENFEED_KEEPALIVE_TIMEOUT_S", cls.timeout_s)))
        except ValueError as err:
            raise ValueError(f"TOKENFEED_KEEPALIVE_S / TOKENFEED_KEEPALIVE_TIMEOUT_S must be seconds: {err}") from None

    def options(self) -> list[tuple[str, int]]:
        return [("grpc.keepalive_time_ms", int(self.time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.timeout_s * 1000)),
                # gRPC core also times every ping out after this (default 60 s), whichever is first
                ("grpc.http2.ping_timeout_ms", int(self.timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0)]  # a server-streaming client never sends data


@dataclass(frozen=True)
class Tls:
    """PEM bytes for a TLS channel: the CA bundle that signs the server's certificate (``None``:
    the system roots) and, for mutual TLS, the client's certificate chain and key."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def load(cls, ca: str | None, cert: str | None, key: str | None) -> Tls | None:
        """Read the files (errors name the argument); ``None`` when none is given (plaintext)."""
        if (cert is None) != (key is None):
            raise ValueError("tls_cert and tls_key go together (the client certificate of mutual TLS)")
        if ca is None and cert is None:
            return None
        return cls(*(_read(name, path) for name, path in (("tls_ca", ca), ("tls_cert", cert), ("tls_key", key))))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def _read(name: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(os.path.expanduser(path), "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"{name}: cannot read {path}: {err.strerror}") from None


@dataclass(frozen=True)
class Backoff:
    """Reconnect policy: full-jitter exponential backoff, bounded by a total deadline. Where there
    are other replicas, a stream whose replica fails for ``failover_s`` moves to the next one."""

    initial_s: float = 0.05
    max_s: float = 2.0
    deadline_s: float = 60.0
    failover_s: float = 1.0

    def delays(self) -> Iterator[float]:
        """Sleep times until the deadline runs out."""
        start, delay = time.monotonic(), self.initial_s
        while (left := self.deadline_s - (time.monotonic() - start)) > 0:
            yield min(random.uniform(0, delay), left)
            delay = min(delay * 2, self.max_s)


class Channel:
    """A gRPC channel created lazily in the process that uses it (gRPC is not fork-safe)."""

    def __init__(self, address: str, max_message_bytes: int, *, token: str | None = None, tls: Tls | None = None,
                 keepalive: Keepalive | None = None, read_on_caller: bool = False,
                 server_name: str | None = None) -> None:
        self.address = address
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", 4 << 20),
            ("grpc.min_reconnect_backoff_ms", int(CONNECT_TIMEOUT_S * 1000)),  # gRPC's minimum connect timeout
            *(keepalive or Keepalive.from_env()).options()]
        if server_name is not None and tls is not None:
            # a replica found by name is dialled by IP: its certificate names the name, not the IP
            self._options.append(("grpc.ssl_target_name_override", server_name))
        if read_on_caller:
            # StreamBatches read on the calling thread. gRPC's default is a channel thread that takes
            # each message and wakes the reader: two thread switches per message, which cost a trainer
            # reading in step (decode_ahead=0) about 9% of its CPU per token at 16 batches per
            # message. Behind a decode-ahead thread that channel thread overlaps receiving with
            # decoding, and reading on the caller measured slower, so it stays. Either way the call
            # can be cancelled from another thread.
            self._options.append((grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1))
        self._tls = tls
        if token is not None and (not token or not token.isascii() or not token.isprintable() or " " in token):
            raise ValueError("token must be non-empty printable ASCII without spaces")
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        if token and tls is None and not address.startswith(_LOOPBACK):
            log.warning("sending a bearer token to %s without TLS: anyone on the path can read it "
                        "(pass tls_ca=... to encrypt)", address)
        self._pid: int | None = None
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.TokenFeedStub | None = None
        self._stream: Any = None

    @property
    def stub(self) -> pb_grpc.TokenFeedStub:
        if self._pid != os.getpid():  # new process (or first use): never reuse a forked channel
            self._channel = (grpc.secure_channel(self.address, self._tls.credentials(), options=self._options)
                             if self._tls is not None else grpc.insecure_channel(self.address, options=self._options))
            # (grpc_tools writes the stub class without annotations)
            self._stub = pb_grpc.TokenFeedStub(self._channel)  # type: ignore[no-untyped-call]
            # StreamBatches with a deserializer that leaves the tokens in the received bytes
            self._stream = self._channel.unary_stream(
                "/tokenfeed.v1.TokenFeed/StreamBatches", request_serializer=pb.StreamRequest.SerializeToString,
                response_deserializer=wire.parse_chunk)
            self._pid = os.getpid()
        assert self._stub is not None
        return self._stub

    @property
    def stream_batches(self) -> Any:
        """The ``StreamBatches`` callable; responses are ``wire.ReceivedChunk`` (or ``BatchChunk``)."""
        self.stub  # noqa: B018 - creates the channel in this process
        return self._stream

    def close(self) -> None:
        if self._channel is not None and self._pid == os.getpid():
            self._channel.close()
        self._channel = self._stub = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pid": None, "_channel": None, "_stub": None}

    def describe(self, dataset: str = "", timeout: float = 30.0, tokenizer_files: bool = False) -> pb.DescribeResponse:
        try:
            info: pb.DescribeResponse = self.stub.Describe(
                pb.DescribeRequest(dataset=dataset, tokenizer_files=tokenizer_files),
                timeout=timeout, wait_for_ready=True, metadata=self.metadata)
            return info
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.address) from None


#: Called when a stream's replica keeps failing: a channel to another replica, or None if there is none.
FailOver = Callable[[], Channel | None]

#: Streams still open, closed at interpreter exit while gRPC is still importable (a suspended
#: iterator is otherwise finalised during module teardown and fails noisily).
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _close_live_streams() -> None:
    for stream in list(_LIVE):
        stream.close()


def stream_batches(channel: Channel, request_from: Callable[[pb.Cursor | None, int], pb.StreamRequest],
                   cursor: pb.Cursor | None, first_step: int, stride: int, backoff: Backoff,
                   ring_from: Callable[[], ClientRing | None] | None = None,
                   fail_over: FailOver | None = None) -> BatchStream:
    """See ``BatchStream``; the stream is closed at exit if it is still open."""
    stream = BatchStream(channel, request_from, cursor, first_step, stride, backoff, ring_from, fail_over)
    _LIVE.add(stream)
    return stream


def is_loopback(address: str) -> bool:
    """Whether ``address`` names this host (the server can then share memory with us)."""
    return address.startswith(_LOOPBACK)


def make_ring(slots: int, slot_bytes: int) -> ClientRing | None:
    """A new shared-memory ring offering a FIFO for the messages (without one where the directory
    holds no FIFO), or None where none can be made here (no such directory, full)."""
    for pipe in (True, False):
        try:
            return ClientRing(slots, slot_bytes, pipe=pipe)
        except OSError as err:
            log.debug("no shared-memory ring%s (%s)", " with a FIFO" if pipe else "; tokens come inline", err)
    return None


class BatchStream:
    """Yields ``(chunk, i)`` for every batch ``i`` of every chunk, reopening after a failure at
    the position after the last yielded batch (its cursor, then the rank's next step).
    ``close()`` may be called from any thread: it cancels the open call, and the stream ends.

    With ``ring_from``, each call offers a new shared-memory ring (see ``tokenfeed.shm``); a
    chunk whose tokens are in it is yielded with ``tokens`` a view of its slot, valid until the
    stream is asked for the batch after the chunk's last (the slot is then handed back).

    With ``fail_over``, a replica that keeps failing for ``backoff.failover_s`` is left: the call
    returns a channel to another replica (None: there is none) and the stream resumes there."""

    def __init__(self, channel: Channel, request_from: Callable[[pb.Cursor | None, int], pb.StreamRequest],
                 cursor: pb.Cursor | None, first_step: int, stride: int, backoff: Backoff,
                 ring_from: Callable[[], ClientRing | None] | None = None, fail_over: FailOver | None = None) -> None:
        # The generator gets the control, not the stream: no reference cycle, so a stream dropped
        # by its consumer is finalised (its call cancelled) at once, not at the next GC.
        self._control = _Control()
        self._batches = _batches(self._control, channel, request_from, cursor, first_step, stride, backoff,
                                 ring_from, fail_over)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[pb.BatchChunk, int]:
        return next(self._batches)

    def close(self) -> None:
        self._control.closed = True
        call = self._control.call
        if call is not None:
            call.cancel()


class _Control:
    closed = False
    call: Any = None


class _Outage:
    """A stream failing since its last message: the backoff's delays (bounded by its deadline in
    all, over every replica tried) and when its current replica began failing."""

    def __init__(self, backoff: Backoff) -> None:
        self.delays = backoff.delays()
        self.replica_since = time.monotonic()

    def replica_failing_s(self) -> float:
        return time.monotonic() - self.replica_since


def _batches(control: _Control, channel: Channel, request_from: Callable[[pb.Cursor | None, int], pb.StreamRequest],
             cursor: pb.Cursor | None, first_step: int, stride: int, backoff: Backoff,
             ring_from: Callable[[], ClientRing | None] | None,
             fail_over: FailOver | None = None) -> Iterator[tuple[pb.BatchChunk, int]]:
    outage: _Outage | None = None
    while not control.closed:
        request = request_from(cursor, first_step)
        ring = ring_from() if ring_from is not None else None  # a new one per call (see tokenfeed.shm)
        if ring is not None:
            request.shared_memory.CopyFrom(ring.spec())
        call = control.call = channel.stream_batches(request, metadata=channel.metadata)
        try:
            for seq, chunk in enumerate(_messages(call, ring)):
                outage = None
                if ring is not None:
                    ring.unlink()  # the server has it open (or never will): nothing to leave behind
                    if chunk.HasField("shm_slot"):
                        nbytes = (chunk.num_batches * chunk.rows * (chunk.seq_len + 1)
                                  * wire.numpy_dtype(chunk.dtype).itemsize)
                        chunk = wire.ReceivedChunk(chunk, ring.view(chunk.shm_slot, nbytes))
                for i in range(chunk.num_batches):
                    yield chunk, i
                    cursor, first_step = chunk.cursors[i], stride - 1
                if ring is not None:
                    ring.release(seq + 1)
        except grpc.RpcError as err:
            if control.closed:
                return
            if ring is not None and ring_broke(err):  # no second ring: whatever broke it may again
                log.warning("the shared-memory ring of the stream from %s broke (%s); going on with tokens inline",
                            channel.address, err.details())
                ring_from = None
                continue
            if not retryable(err):
                raise from_rpc_error(err, channel.address) from None
            outage = outage or _Outage(backoff)
            channel = _reconnect(err, channel, outage, backoff, fail_over)
        finally:
            call.cancel()
            if ring is not None:
                ring.close()


#: How often a stream reading its FIFO looks at its call meanwhile (the call, not the FIFO, notices
#: a server that froze or whose host vanished: its keepalive fails it).
PIPE_POLL_S = 0.5


def _messages(call: Any, ring: ClientRing | None) -> Iterator[Any]:
    """The call's messages: read from the ring's FIFO where the server took it (the call's initial
    metadata says so; the call then ends with its status once the FIFO is closed), else the call's."""
    if ring is None or not ring.piped or not any(k == shm.PIPE_KEY for k, _ in call.initial_metadata() or ()):
        return iter(call)
    return _piped(call, ring)


def _piped(call: Any, ring: ClientRing) -> Iterator[Any]:
    while True:
        try:
            data = ring.message(PIPE_POLL_S)
            if data is None and call.done():  # what the server wrote before the call ended comes first
                data = ring.message(0)
                if data is None:
                    break
        except EOFError:  # the server closed it: the call is ending
            break
        if data is not None:
            yield wire.parse_chunk(data)
    yield from call  # its end: a status raised (RpcError), or none (OK)


def _reconnect(err: grpc.RpcError, channel: Channel, outage: _Outage, backoff: Backoff,
               fail_over: FailOver | None) -> Channel:
    """The channel to reopen the stream on after ``err``: the same one after a backoff sleep, or at
    once one to the next replica once this one has failed for ``backoff.failover_s``. Raises
    ``ServerUnavailable`` once the outage has lasted the backoff's deadline."""
    delay = next(outage.delays, None)
    if delay is None:
        raise ServerUnavailable(
            f"tokenfeed server {channel.address} unreachable for {backoff.deadline_s:.0f}s: "
            f"{err.code().name}: {err.details()}", code=err.code(), details=err.details() or "",
        ) from None
    if fail_over is not None:
        if outage.replica_failing_s() >= backoff.failover_s:
            outage.replica_since = time.monotonic()
            moved = fail_over()
            if moved is not None:  # resume from the cursor there at once: it is another server
                return moved
        # the last try on this replica at its budget's end, not up to a backoff step later
        delay = min(delay, max(0.0, backoff.failover_s - outage.replica_failing_s()))
    log.warning("stream from %s broke (%s: %s); reconnecting in %.2fs", channel.address,
                err.code().name, err.details(), delay)
    time.sleep(delay)
    return channel
