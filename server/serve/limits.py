"""Stream admission and limits: how many streams, how much message memory, how far a request may
make the server skip, how big a message can get; the keepalive the server enforces; and what
holds connections and descriptors: a connection cap, handshake and idle timeouts, the open-file
limit, and a cap on the streams anyone may open without a token (health Watch, reflection)."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Gauge

from server.config import ServerSettings
from server.errors import InvalidArgument, TokenfeedError
from server.metrics import REGISTRY
from server.stream.params import StreamParams
from server.stream.walker import PROVENANCE_WIDTH
# On a refusal worth retrying: the client may retry (with backoff) after about this many ms; other
# RESOURCE_EXHAUSTED (a local message-size limit) carry no such key and are not retried.
from tokenfeed.constants import RETRY_AFTER_KEY

log = logging.getLogger(__name__)

#: Trailing metadata key on a RESOURCE_EXHAUSTED admission refusal: the client may retry (with
#: backoff) after about this many milliseconds. Other RESOURCE_EXHAUSTED (a local message-size
#: limit) carry no such key and are not retried.

#: Cursor positions beyond this are refused: far from any real job, and far enough from the
#: uint64 limit that counting onwards cannot overflow a protobuf field.
MAX_POSITION = 1 << 62
#: Serialized size bounds of one cursor (plus one per mixture component), step and epoch entry.
_CURSOR_BYTES, _COMPONENT_BYTES = 160, 96

ADMITTED = Gauge("tokenfeed_admitted_streams", "Streams holding an admission slot now.", registry=REGISTRY)
CHARGED = Gauge("tokenfeed_stream_memory_charged_bytes",
                "Message bytes charged to open streams (at most server.stream_memory_bytes).", registry=REGISTRY)
REJECTED = Counter("tokenfeed_streams_rejected_total", "Streams refused at admission, by reason.", ["reason"],
                   registry=REGISTRY)
LOOP_TASKS = Gauge("tokenfeed_event_loop_tasks", "asyncio tasks alive on the server's event loop.", registry=REGISTRY)
PROBE_STREAMS = Gauge("tokenfeed_probe_streams", "Open health Watch and reflection streams "
                      "(at most server.max_health_watches).", registry=REGISTRY)
for _reason in ("max_streams", "memory", "draining", "max_health_watches"):
    REJECTED.labels(_reason)


class Overloaded(TokenfeedError):
    """The server is at a limit right now; retry later or elsewhere (RESOURCE_EXHAUSTED)."""


class ShuttingDown(TokenfeedError):
    """The server is draining; continue on another replica or after the restart (UNAVAILABLE)."""

    def __init__(self) -> None:
        super().__init__("server is shutting down; reconnect (to another replica) from the cursor")


def message_bound(params: StreamParams) -> int:
    """The most bytes one message of this stream can take: its tokens, worst-case provenance
    (every document is at least 2 tokens, EOS included, so a row of ``w`` tokens holds at most
    ``w // 2 + 1`` pieces), token-budget piece starts, cursors and the rest."""
    rows, width = (1, params.max_tokens + 1) if params.max_tokens else (params.batch_size, params.seq_len + 1)
    per_batch = rows * width * params.dataset.dtype.itemsize
    if params.provenance:
        per_batch += rows * (width // 2 + 1) * PROVENANCE_WIDTH * 8 + 8
    if params.max_tokens:  # a varint piece start per piece; split pieces may be 1 token long
        per_batch += 5 * width + 8
    components = len(params.dataset.components)
    per_batch += _CURSOR_BYTES + components * _COMPONENT_BYTES + 24
    return params.batches_per_message * per_batch + 4096


def packing_charge(params: StreamParams) -> int:
    """Bytes of one packed shard of a padded packing (``pad``, ``split``, ``bfd``, token budgets):
    a table of ``rows x (seq_len + 1)`` tokens, at most ``docs + tokens // seq_len`` rows, so it
    grows with the requested ``seq_len`` (a 1 MiB shard of 1,000 short documents packed ``pad`` at
    seq_len 65,536 is 131 MB). From the counts known now (all of them for prepared data; a raw
    shard's once it was read). ``concat`` rows are a view of the shard's own tokens: not charged."""
    if params.packing == "concat":
        return 0
    parts = params.dataset.parts
    rows = max((docs + ds.shard_tokens.get(i, 0) // params.seq_len
                for ds in parts for i, docs in ds.shard_docs.items()), default=0)
    return rows * (params.seq_len + 1) * params.dataset.dtype.itemsize


def stream_charge(params: StreamParams) -> int:
    """Bytes a stream may hold at once: one message, for token-budget batches the whole step it
    plans (every rank's pieces: ``world_size * max_tokens`` tokens, twice for overhead), and for
    padded packings the packed shard it reads (``packing_charge``)."""
    held = 2 * params.world_size * params.max_tokens * params.dataset.dtype.itemsize if params.max_tokens else 0
    return message_bound(params) + held + packing_charge(params)


def check_request(params: StreamParams, settings: ServerSettings) -> int:
    """Refuse requests whose work, messages or memory are out of bounds; return the stream's
    memory charge (``stream_charge``).

    ``first_step`` is below ``step_stride`` in every request a client makes (a worker's offset
    in the round robin); with ``max_rows_per_step`` it bounds how many rows the server walks
    between two batches: work done before anything is sent, in one go on the event loop."""
    p, stride = params, params.step_stride
    if p.first_step >= stride:
        raise InvalidArgument("first_step", f"must be below step_stride={stride}, got {p.first_step}")
    per_rank = max(1, p.max_tokens // p.seq_len) if p.max_tokens else p.batch_size  # rows (pieces) per rank
    rows = p.world_size * per_rank * stride
    if rows > settings.max_rows_per_step:
        raise InvalidArgument("world_size", f"world_size x {'max_tokens / seq_len' if p.max_tokens else 'batch_size'} "
                              f"x step_stride = {rows} rows per step, above the server's max_rows_per_step of "
                              f"{settings.max_rows_per_step}")
    planned = p.world_size * per_rank * stride * p.batches_per_message  # pieces planned per message
    if p.max_tokens and planned > settings.max_budget_pieces_per_message:
        raise InvalidArgument("world_size", f"world_size x max_tokens / seq_len x step_stride x batches_per_message = "
                              f"{planned} pieces planned per token-budget message, above the server's "
                              f"max_budget_pieces_per_message of {settings.max_budget_pieces_per_message} (every rank "
                              "plans every step); ask for fewer batches per message, use fixed-size batches at this "
                              "scale, or raise server.max_budget_pieces_per_message")
    start = p.start
    for field, value in [("row", start.row + p.skip_rows), ("epoch", start.epoch)] + [
            (f"components[{i}].{f}", getattr(loc, f)) for i, (_, loc) in enumerate(start.components)
            for f in ("row", "epoch")]:
        if value >= MAX_POSITION:
            raise InvalidArgument(f"cursor.{field}", f"must be below 2**62, got {value}")
    bound = message_bound(p)
    if bound > settings.max_message_bytes:
        # Named after what to change: one batch alone too large, else the batches per message.
        one = message_bound(dataclasses.replace(p, batches_per_message=1))
        field = ("max_tokens" if p.max_tokens else "batch_size") if one > settings.max_message_bytes \
            else "batches_per_message"
        raise InvalidArgument(field, f"messages of this stream ({p.batches_per_message} batch(es) of "
                              f"{1 if p.max_tokens else p.batch_size} x {p.max_tokens or p.seq_len} tokens) may take "
                              f"{bound} bytes (provenance, piece starts and cursors included), above the server's "
                              f"max message size of {int(settings.max_message_bytes)} bytes; ask for fewer or "
                              "smaller batches")
    charge = stream_charge(p)
    if charge > settings.stream_memory_bytes:
        packed = packing_charge(p)
        field, what = (("seq_len", f"packing={p.packing!r} at this seq_len makes packed shards of {packed} bytes")
                       if packed * 2 > charge else ("max_tokens", "world_size x max_tokens"))
        raise InvalidArgument(field, f"{what}: this stream needs {charge} bytes of server memory, above "
                              f"server.stream_memory_bytes ({int(settings.stream_memory_bytes)})")
    return charge


class Admission:
    """Counts open streams and the message bytes they may hold, against ``max_streams`` and
    ``stream_memory_bytes``; ``drain()`` refuses new streams and tells open ones to end.

    Memory: a stream holds one message at a time (the batches it assembles, then their encoding
    while gRPC sends them), so the resident memory of all streams stays within a small multiple
    (about 3: the token array, the payload, the serialized message) of ``stream_memory_bytes``.
    """

    def __init__(self, max_streams: int, memory_bytes: int) -> None:
        self.max_streams, self.memory_bytes = max_streams, memory_bytes
        self.streams = self.charged = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        try:  # the loop this server runs on: its task count is a leak detector (scraped from a thread)
            loop = asyncio.get_running_loop()
            LOOP_TASKS.set_function(lambda: len(asyncio.all_tasks(loop)))
        except RuntimeError:
            pass

    def admit(self, charge: int) -> Ticket:
        """A slot and ``charge`` bytes, held until ``Ticket.release()``; raises when out of either."""
        if self.draining:
            REJECTED.labels("draining").inc()
            raise ShuttingDown()
        if self.streams >= self.max_streams:
            REJECTED.labels("max_streams").inc()
            raise Overloaded(f"server is at its limit of {self.max_streams} concurrent streams "
                             "(server.max_streams); retry later or use another replica")
        if self.charged + charge > self.memory_bytes:
            REJECTED.labels("memory").inc()
            raise Overloaded(f"server's stream memory budget is in use ({self.charged} of {self.memory_bytes} bytes, "
                             f"server.stream_memory_bytes; this stream needs {charge}); retry later")
        self._add(1, charge)
        return Ticket(self, charge)

    def _add(self, streams: int, charge: int) -> None:
        self.streams += streams
        self.charged += charge
        ADMITTED.set(self.streams)
        CHARGED.set(self.charged)
        if self.streams:
            self._idle.clear()
        else:
            self._idle.set()

    def drain(self) -> int:
        """Refuse new streams; open ones end after the message they are assembling. Returns how
        many were open."""
        self.draining = True
        return self.streams

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every admitted stream to end; whether they did."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


class Ticket:
    """One admitted stream's share; ``release()`` (idempotent) gives it back."""

    def __init__(self, admission: Admission, charge: int) -> None:
        self._admission: Admission | None = admission
        self._charge = charge

    def release(self) -> None:
        if self._admission is not None:
            self._admission._add(-1, -self._charge)
            self._admission = None


def server_options(settings: ServerSettings, max_connections: int | None = None) -> list[tuple[str, int]]:
    """Message limits, keepalive, and what bounds connections (gRPC core channel arguments).

    Keepalive: clients ping (by default every 10 s, also between epochs when no call is open);
    the server accepts pings ``min_client_ping_interval_s`` apart, with or without calls, so an
    idle client never gets a too_many_pings GOAWAY.

    Connections (each holds a descriptor): at most ``max_connections`` (default
    ``settings.max_connections``) per listening address, more are closed as they are accepted;
    one that has not finished its TLS and HTTP/2 handshake (sent its SETTINGS) within
    ``handshake_timeout_s`` is closed, so a raw TCP connection that sends nothing holds its slot
    that long at most; one with no open call for ``connection_idle_s`` gets a GOAWAY. Pings do
    not count as calls: a trainer between epochs loses its idle connection and its next call
    opens a new one (gRPC does that on its own; a call caught by the GOAWAY fails UNAVAILABLE and
    the client resumes from its cursor). No ``grpc.max_connection_age_ms``: it would end every
    stream older than the age, and a stream lasts an epoch."""
    ms = lambda s: int(s * 1000)
    return [
        ("grpc.max_send_message_length", int(settings.max_message_bytes)),
        ("grpc.max_receive_message_length", 4 << 20),  # requests are small
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_s)),
        ("grpc.http2.ping_timeout_ms", ms(settings.keepalive_timeout_s)),  # gRPC core times pings out by this
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.min_client_ping_interval_s)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_allowed_incoming_connections", max_connections or settings.max_connections),
        ("grpc.server_handshake_timeout_ms", ms(settings.handshake_timeout_s)),
        ("grpc.max_connection_idle_ms", ms(settings.connection_idle_s)),
    ]


# ---- descriptors ------------------------------------------------------------------------------------
#: Descriptors kept out of the connection cap: shard files read in worker threads, the disk cache,
#: the metrics port, gRPC's and asyncio's own pipes and epoll sets.
FD_RESERVE = 256
#: The fewest connections the cap is lowered to, however tight the open-file limit.
MIN_CONNECTIONS = 16


def raise_fd_limit() -> int | None:
    """Raise this process's soft open-file limit (RLIMIT_NOFILE) to its hard limit and return the
    soft limit in force (``None`` where there is none to read: not a Unix). Common practice for
    servers: the soft limit is often 1024 while the hard limit allows far more, and every
    connection holds a descriptor. Only the soft limit moves, which needs no privilege; where the
    hard limit is unlimited (macOS) the raise may be refused, and the soft limit stays."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-file limit raised from %d to %d (the hard limit)", soft, target)
        except (ValueError, OSError) as err:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, err)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(max_connections: int, fd_limit: int | None) -> int:
    """``max_connections``, lowered so that connections leave ``FD_RESERVE`` descriptors of
    ``fd_limit`` to the rest of the server (accept failing with EMFILE would lock every new
    client out, and a shard read failing with it would stall streams)."""
    if fd_limit is None or fd_limit - FD_RESERVE >= max_connections:
        return max_connections
    cap = max(MIN_CONNECTIONS, fd_limit - FD_RESERVE)
    log.warning("server.max_connections lowered from %d to %d: the open-file limit is %d (raise the hard limit, "
                "e.g. `ulimit -Hn` or the container's nofile ulimit, to allow more)", max_connections, cap, fd_limit)
    return cap


# ---- streams open to anyone ---------------------------------------------------------------------------
#: Streams that need no token and may stay open for ever: health Watch and server reflection.
OPEN_STREAM_METHODS = frozenset({
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})
#: How long a refused probe stream is told to wait (``RETRY_AFTER_KEY``): a slot frees only when
#: another watcher leaves.
PROBE_RETRY_AFTER_MS = 1000
#: Largest health Watch request (a service name): a watch holds its request as long as it is open,
#: and requests may otherwise take 4 MiB each.
MAX_WATCH_REQUEST_BYTES = 1024


class ProbeStreamLimit(grpc.aio.ServerInterceptor):
    """At most ``limit`` health Watch and reflection streams at once; more get RESOURCE_EXHAUSTED
    with ``RETRY_AFTER_KEY``. These streams need no token (probes must work without one) and a
    Watch never ends by itself, so without their own cap anyone could hold open as many as they
    like, and a cap on all calls would then refuse trainers. Data streams are admitted by
    ``Admission``; unary calls end at once: neither is counted here."""

    def __init__(self, limit: int, methods: frozenset[str] = OPEN_STREAM_METHODS) -> None:
        self.limit, self.methods = limit, methods
        self.open = 0
        PROBE_STREAMS.set(0)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method not in self.methods:
            return handler
        return _limited(handler, self)

    def take(self) -> bool:
        """A slot, if one is free (the counter is only touched on the event loop)."""
        if self.open >= self.limit:
            REJECTED.labels("max_health_watches").inc()
            return False
        self.open += 1
        PROBE_STREAMS.set(self.open)
        return True

    def give(self) -> None:
        self.open -= 1
        PROBE_STREAMS.set(self.open)

    async def refuse(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"server is at its limit of {self.limit} concurrent health Watch and reflection streams "
                            "(server.max_health_watches); retry later, or use health Check",
                            trailing_metadata=((RETRY_AFTER_KEY, str(PROBE_RETRY_AFTER_MS)),))


def _limited(handler: grpc.RpcMethodHandler, limit: ProbeStreamLimit) -> grpc.RpcMethodHandler:
    """``handler`` holding a slot of ``limit`` while it runs, however it ends (cancelled too)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(fn):  # reflection: yields its replies
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if not limit.take():
                    await limit.refuse(context)
                try:
                    async for reply in fn(request, context):
                        yield reply
                finally:
                    limit.give()
            return stream
        if inspect.iscoroutinefunction(fn):  # health Watch: writes with context.write
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if hasattr(request, "ByteSize") and request.ByteSize() > MAX_WATCH_REQUEST_BYTES:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"request of {request.ByteSize()} bytes; at most {MAX_WATCH_REQUEST_BYTES}")
                if not limit.take():
                    await limit.refuse(context)
                try:
                    return await fn(request, context)
                finally:
                    limit.give()
            return call
        raise TypeError(f"{fn!r}: ProbeStreamLimit limits asyncio handlers only")

    kinds = {"unary_stream": grpc.unary_stream_rpc_method_handler,
             "stream_stream": grpc.stream_stream_rpc_method_handler}
    for kind, make in kinds.items():
        fn = getattr(handler, kind)
        if fn is not None:
            return make(wrap(fn), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler  # a unary method: ends at once, nothing to hold
