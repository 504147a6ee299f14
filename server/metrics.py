"""Prometheus metrics of the data server: definitions, a gRPC interceptor, a scrape-time collector."""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from prometheus_client import (
    CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector, ProcessCollector,
    disable_created_metrics, start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenfeed import wire

if TYPE_CHECKING:
    from server.dataset import Dataset
    from server.mixture import Mixture
    from server.store import ShardStore

log = logging.getLogger(__name__)

#: The server's own registry (not prometheus_client's global one), so that a process may build
#: and stop several servers without "duplicated timeseries" errors.
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Latencies range from microseconds (a cached batch) to seconds (a cold shard behind a slow disk).
_FAST = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
         1.0, 2.5, 5.0, 10.0)
_SLOW = (1e-3, 5e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)

# ---- gRPC (labels: service and method of registered handlers, status code names) -----------------
RPC_STARTED = Counter("tokenfeed_rpc_started_total", "RPCs started.", ["service", "method"], registry=REGISTRY)
RPC_HANDLED = Counter("tokenfeed_rpc_handled_total", "RPCs finished, by gRPC status code.",
                      ["service", "method", "code"], registry=REGISTRY)
RPC_SECONDS = Histogram("tokenfeed_rpc_duration_seconds", "RPC duration (for streams: the stream's life).",
                        ["service", "method"], buckets=_SLOW, registry=REGISTRY)

# ---- streams (label: dataset, from the config) ---------------------------------------------------
ACTIVE_STREAMS = Gauge("tokenfeed_active_streams", "Batch streams open now.", ["dataset"], registry=REGISTRY)
FIRST_BATCH_SECONDS = Histogram("tokenfeed_stream_first_batch_seconds",
                                "From a stream's request to its first message being ready.", ["dataset"],
                                buckets=_SLOW, registry=REGISTRY)
ASSEMBLY_SECONDS = Histogram("tokenfeed_batch_assembly_seconds",
                             "Time to assemble one message of batches (waiting for shards included).",
                             ["dataset"], buckets=_FAST, registry=REGISTRY)
SENT_MESSAGES = Counter("tokenfeed_sent_messages_total", "Stream messages sent.", ["dataset"], registry=REGISTRY)
SENT_BATCHES = Counter("tokenfeed_sent_batches_total", "Batches sent.", ["dataset"], registry=REGISTRY)
SENT_ROWS = Counter("tokenfeed_sent_rows_total", "Rows sent.", ["dataset"], registry=REGISTRY)
SENT_TOKENS = Counter("tokenfeed_sent_tokens_total", "Input token positions sent (rows x seq_len).",
                      ["dataset", "packing"], registry=REGISTRY)
SENT_PAD_TOKENS = Counter("tokenfeed_sent_pad_tokens_total", "Input positions sent that hold PAD.",
                          ["dataset", "packing"], registry=REGISTRY)
SENT_BYTES = Counter("tokenfeed_sent_bytes_total", "Token payload bytes sent (after wire compression).",
                     ["dataset"], registry=REGISTRY)
SHARED_MEMORY_BYTES = Counter("tokenfeed_shared_memory_bytes_total",
                              "Token payload bytes written into clients' shared-memory rings (part of sent_bytes).",
                              ["dataset"], registry=REGISTRY)
PACKING_EFFICIENCY = Gauge("tokenfeed_packing_efficiency",
                           "Share of sent input positions that hold real tokens, since start.",
                           ["dataset", "packing"], registry=REGISTRY)

# ---- the event loop: every stream is served by one thread's loop --------------------------------
LOOP_LAG_SECONDS = Histogram(
    "tokenfeed_event_loop_lag_seconds",
    "How late the event loop ran a timer, sampled ten times a second: how long a stream that is ready "
    "waits for its turn. Tens of ms means the loop is the server's limit (more streams than it can serve "
    "at this rate; fewer batches per message, or another replica).", buckets=_FAST, registry=REGISTRY)

# ---- sources and tokenizers (labels: dataset, source type, tokenizer name, fixed reasons) --------
TOKENIZED_SHARDS = Counter("tokenfeed_tokenized_shards_total", "Shards read and tokenized.",
                           ["dataset", "source"], registry=REGISTRY)
SOURCE_BYTES = Counter("tokenfeed_source_read_bytes_total", "Bytes of shards read.", ["dataset", "source"],
                       registry=REGISTRY)
SHARD_LOAD_SECONDS = Histogram("tokenfeed_shard_load_seconds", "Time to read and tokenize one shard (per thread).",
                               ["dataset"], buckets=_SLOW, registry=REGISTRY)
TOKENIZER_TOKENS = Counter("tokenfeed_tokenizer_tokens_total", "Tokens produced by the tokenizer (EOS included).",
                           ["dataset", "tokenizer"], registry=REGISTRY)
TOKENIZER_DOCUMENTS = Counter("tokenfeed_tokenizer_documents_total", "Documents tokenized.",
                              ["dataset", "tokenizer"], registry=REGISTRY)
BROKEN_REASONS = ("truncated", "corrupt")
BROKEN_SHARDS = Counter("tokenfeed_broken_shards_total",
                        "Raw shards skipped whole because their content does not decode (the same on every replica).",
                        ["dataset", "source", "reason"], registry=REGISTRY)
RETRY_REASONS = ("missing_file", "permission_denied", "too_many_open_files", "timeout", "io_error")
SOURCE_RETRIES = Counter("tokenfeed_source_retries_total",
                         "Shard reads retried after an environment fault (never cached as broken).",
                         ["dataset", "source", "reason"], registry=REGISTRY)
SOURCE_UNAVAILABLE = Counter("tokenfeed_source_unavailable_total",
                             "Shard reads given up after their retries; the stream ended UNAVAILABLE.",
                             ["dataset", "source"], registry=REGISTRY)

# ---- mixtures -------------------------------------------------------------------------------------
MIXTURE_WEIGHT = Gauge("tokenfeed_mixture_weight", "Configured share of a mixture component.",
                       ["dataset", "source"], registry=REGISTRY)
MIXTURE_TOKENS = Counter("tokenfeed_mixture_tokens_total",
                         "Tokens served per mixture component; realised share = rate / sum of rates.",
                         ["dataset", "source"], registry=REGISTRY)


def broken_reason(err: BaseException) -> str:
    """Map the content fault that broke a shard to one of ``BROKEN_REASONS`` (a bounded label)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, EOFError) or "truncated" in str(cause):
            return "truncated"
        cause = cause.__cause__
    return "corrupt"


def count_broken_shard(dataset: str, source: str, err: BaseException) -> None:
    """Count a raw shard skipped because its content does not decode (``err``)."""
    BROKEN_SHARDS.labels(dataset, source, broken_reason(err)).inc()


def retry_reason(err: OSError) -> str:
    """Map an environment fault to one of ``RETRY_REASONS``."""
    if isinstance(err, FileNotFoundError):
        return "missing_file"
    if isinstance(err, PermissionError):
        return "permission_denied"
    if err.errno in (errno.EMFILE, errno.ENFILE):
        return "too_many_open_files"
    if isinstance(err, TimeoutError) or err.errno == errno.ETIMEDOUT:
        return "timeout"
    return "io_error"


def count_source_retry(dataset: str, source: str, err: OSError) -> None:
    """Count one retried shard read."""
    SOURCE_RETRIES.labels(dataset, source, retry_reason(err)).inc()


def count_source_unavailable(dataset: str, source: str) -> None:
    """Count one shard read given up after its retries."""
    SOURCE_UNAVAILABLE.labels(dataset, source).inc()


def observe_shard(dataset: str, source: str, tokenizer: str | None, shard_bytes: int, documents: int,
                  tokens: int, seconds: float) -> None:
    """Account one shard read and tokenized in ``seconds`` (once per shard, off the event loop).
    ``tokenizer`` is ``None`` for prepared token sources. Tokenizer throughput is
    ``rate(tokenfeed_tokenizer_tokens_total) / rate(tokenfeed_shard_load_seconds_sum)``."""
    TOKENIZED_SHARDS.labels(dataset, source).inc()
    SOURCE_BYTES.labels(dataset, source).inc(shard_bytes)
    SHARD_LOAD_SECONDS.labels(dataset).observe(seconds)
    TOKENIZER_TOKENS.labels(dataset, tokenizer or "none").inc(tokens)
    TOKENIZER_DOCUMENTS.labels(dataset, tokenizer or "none").inc(documents)


async def watch_loop_lag(interval_s: float = 0.1, observe: Callable[[float], None] = LOOP_LAG_SECONDS.observe) -> None:
    """Until cancelled: sleep ``interval_s`` on the running loop and observe how much later than
    asked it woke (a timer runs only after the callbacks that were ready before it)."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - t0 - interval_s))


def pad_positions(tokens: np.ndarray, pad_id: int) -> int:
    """PAD among the input positions of ``tokens`` (``[..., seq_len + 1]``). Every packing pads
    only the tail of a row, so only rows whose last input is PAD need counting: O(rows) for
    ``concat``, which pads one row per shard."""
    inputs = tokens[..., :-1]
    padded = inputs[..., -1] == pad_id
    if not padded.any():
        return 0
    return int(np.count_nonzero(inputs[padded] == pad_id))


class StreamMeter:
    """Accounting of one stream, observed once per message (never per token).

    Use as a context manager around the stream (it counts the stream as active), call ``sent``
    when a message is ready and ``resumed`` when the consumer asks for the next one, so that the
    assembly time excludes time spent blocked on the client.
    """

    def __init__(self, dataset: str, packing: str, pad_id: int) -> None:
        self.pad_id = pad_id
        self._active = ACTIVE_STREAMS.labels(dataset)
        self._first = FIRST_BATCH_SECONDS.labels(dataset)
        self._assembly = ASSEMBLY_SECONDS.labels(dataset)
        self._counters = [c.labels(dataset) for c in (SENT_MESSAGES, SENT_BATCHES, SENT_ROWS)]
        self._counters += [c.labels(dataset, packing) for c in (SENT_TOKENS, SENT_PAD_TOKENS)]
        self._counters.append(SENT_BYTES.labels(dataset))
        self._efficiency = PACKING_EFFICIENCY.labels(dataset, packing)
        self._totals = _PACKING_TOTALS.setdefault((dataset, packing), [0, 0])
        self._start = self._mark = time.perf_counter()
        self._messages = 0

    def __enter__(self) -> StreamMeter:
        self._active.inc()
        return self

    def __exit__(self, *exc: object) -> None:
        self._active.dec()

    def sent(self, tokens: np.ndarray, payload_bytes: int) -> None:
        """A message of ``tokens`` (``[batches, rows, seq_len + 1]``) is ready to go."""
        now = time.perf_counter()
        if self._messages == 0:
            self._first.observe(now - self._start)
        self._assembly.observe(now - self._mark)
        self._messages += 1
        batches, rows, width = tokens.shape
        positions = batches * rows * (width - 1)
        pads = pad_positions(tokens, self.pad_id)
        for counter, n in zip(self._counters, (1, batches, batches * rows, positions, pads, payload_bytes)):
            counter.inc(n)
        totals = self._totals
        totals[0] += positions
        totals[1] += pads
        self._efficiency.set(1.0 - totals[1] / totals[0] if totals[0] else 1.0)

    def resumed(self) -> None:
        """The consumer took the last message; the next one's assembly starts now."""
        self._mark = time.perf_counter()


#: (dataset, packing) -> [positions, pads]; written on the event loop only.
_PACKING_TOTALS: dict[tuple[str, str], list[int]] = {}


# ---- the gRPC interceptor ------------------------------------------------------------------------
def _code_name(context: grpc.aio.ServicerContext, err: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if err is None:
        return "OK"
    # A client that goes away cancels the handler task or closes the response generator.
    return "CANCELLED" if isinstance(err, (GeneratorExit, asyncio.CancelledError)) else "UNKNOWN"


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts RPCs by service, method and status code and times them. Labels come only from
    registered handlers (unknown methods are counted as ``unknown``), so cardinality is bounded."""

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            RPC_HANDLED.labels("unknown", "unknown", "UNIMPLEMENTED").inc()
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        return _instrumented(handler, service or "unknown", method or "unknown")


def _instrumented(handler: grpc.RpcMethodHandler, service: str, method: str) -> grpc.RpcMethodHandler:
    started, seconds = RPC_STARTED.labels(service, method), RPC_SECONDS.labels(service, method)

    def finish(context: grpc.aio.ServicerContext, t0: float, err: BaseException | None) -> None:
        seconds.observe(time.perf_counter() - t0)
        RPC_HANDLED.labels(service, method, _code_name(context, err)).inc()

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(fn):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started.inc()
                t0, err = time.perf_counter(), None
                try:
                    async for response in fn(request, context):
                        yield response
                except BaseException as e:
                    err = e
                    raise
                finally:
                    finish(context, t0, err)
            return stream
        if inspect.iscoroutinefunction(fn):
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started.inc()
                t0, err = time.perf_counter(), None
                try:
                    return await fn(request, context)
                except BaseException as e:
                    err = e
                    raise
                finally:
                    finish(context, t0, err)
            return call
        return fn  # a synchronous handler: left alone (this server has none)

    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for kind, make in kinds.items():
        fn = getattr(handler, kind)
        if fn is not None:
            return make(wrap(fn), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


# ---- the scrape-time collector: cache, prefetch and dataset state --------------------------------
def _number(value: Any) -> float | None:
    return None if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)


def _call_stats(owner: Any, name: str = "stats") -> dict[str, Any]:
    fn = getattr(owner, name, None)
    if not callable(fn):
        return {}
    try:
        stats = fn()
    except Exception:  # a scrape must never take the server down
        log.exception("%s.%s() failed during a metrics scrape", type(owner).__name__, name)
        return {}
    return dict(stats) if isinstance(stats, Mapping) else {}


def store_stats(store: ShardStore) -> dict[str, Any]:
    """``ShardStore.stats()``: the cache's numbers (``ShardCache.stats()``), the prefetcher's
    (``prefetch_*``) and the hot tier's (``hot_*``), as one flat dict."""
    return _call_stats(store)


def cache_tiers(stats: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Bytes and entries per tier: flat pairs ``<tier>_bytes`` + ``<tier>_entries`` (``memory``,
    ``disk``, and the store's ``hot`` tier of packed shards) and the cache's ``tiers``
    (``{tier: {"bytes", "entries"}}``)."""
    found: dict[str, Mapping[str, Any]] = {}
    for key, entries in stats.items():
        tier = key.removesuffix("_entries")
        if tier != key and f"{tier}_bytes" in stats:
            found[tier] = {"bytes": stats[f"{tier}_bytes"], "entries": entries}
    tiers = stats.get("tiers")
    found.update({str(t): v for t, v in tiers.items() if isinstance(v, Mapping)} if isinstance(tiers, Mapping) else {})
    out = {tier: {f: n for f in ("bytes", "entries") if (n := _number(v.get(f))) is not None}
           for tier, v in found.items()}
    return {tier: v for tier, v in out.items() if v}


def prefetch_stats(store: ShardStore, stats: Mapping[str, Any]) -> dict[str, float]:
    """Prefetch hits, wasted prefetches, queue depth and in-flight loads: the ``prefetch_*`` keys
    of the store's stats, its ``inflight_loads`` (demand and prefetch reads), and
    ``store.prefetch_stats()`` over them."""
    merged: dict[str, Any] = {k[len("prefetch_"):]: v for k, v in stats.items() if k.startswith("prefetch_")}
    merged["inflight"] = stats.get("inflight_loads")
    merged.update(_call_stats(store, "prefetch_stats"))
    return {k: n for k in ("hits", "queue_depth", "inflight", "wasted") if (n := _number(merged.get(k))) is not None}


_CACHE_COUNTERS = {
    "hits": "Cache lookups that found the shard.",
    "misses": "Cache lookups that did not find the shard.",
    "evictions": "Entries evicted to stay within the byte budget.",
    "expirations": "Entries dropped because they went unused for too long.",
    "admissions_declined": "Shards the cache chose not to admit.",
}
_PREFETCH = {
    "hits": (CounterMetricFamily, "tokenfeed_prefetch_hits", "Lookups served by a prefetched shard."),
    "wasted": (CounterMetricFamily, "tokenfeed_prefetch_wasted", "Prefetched shards evicted before any use."),
    "queue_depth": (GaugeMetricFamily, "tokenfeed_prefetch_queue_depth", "Shards waiting to be prefetched."),
    "inflight": (GaugeMetricFamily, "tokenfeed_inflight_loads",
                 "Shards being read from their source now (demand or prefetch)."),
}


class ServerCollector(Collector):
    """Reads the cache, the prefetcher, the datasets' bad-record counts and the mixtures' rows per
    component at scrape time, so the hot path pays nothing for them."""

    def __init__(self, datasets: Mapping[str, Dataset | Mixture], store: ShardStore) -> None:
        self.datasets, self.store = datasets, store

    def describe(self) -> list[Metric]:
        return []  # dynamic: the families depend on what the cache reports

    def collect(self) -> Iterator[Metric]:
        stats = store_stats(self.store)
        for name, doc in _CACHE_COUNTERS.items():
            if (v := _number(stats.get(name))) is not None:
                yield CounterMetricFamily(f"tokenfeed_cache_{name}", doc, value=v)
        hits, misses = _number(stats.get("hits")), _number(stats.get("misses"))
        if hits is not None and misses is not None:
            yield GaugeMetricFamily("tokenfeed_cache_hit_ratio", "Hits / lookups since start (NaN before any).",
                                    value=hits / (hits + misses) if hits + misses else math.nan)
        tiers = cache_tiers(stats)
        for field in ("bytes", "entries"):
            family = GaugeMetricFamily(f"tokenfeed_cache_{field}", f"Cache {field} held, per tier.", labels=["tier"])
            for tier, values in sorted(tiers.items()):
                if field in values:
                    family.add_metric([tier], values[field])
            yield family
        for name, doc in (("max_bytes", "The memory tier's byte budget."),
                          ("compression_ratio", "Raw bytes / stored bytes of cached shards.")):
            if (v := _number(stats.get(name))) is not None:
                yield GaugeMetricFamily(f"tokenfeed_cache_{name}", doc, value=v)
        for name, doc in (("hot_packs", "Shards packed for a (seed, epoch, seq_len, packing); more than once per "
                                        "shard and epoch means the streams spread wider than the hot tier."),
                          ("hot_evictions", "Packed shards dropped from the hot tier.")):
            if (v := _number(stats.get(name))) is not None:
                yield CounterMetricFamily(f"tokenfeed_{name}", doc, value=v)
        for key, v in prefetch_stats(self.store, stats).items():
            kind, name, doc = _PREFETCH[key]
            yield kind(name, doc, value=v)
        yield from self._datasets()

    def _datasets(self) -> Iterator[Metric]:
        bad = CounterMetricFamily("tokenfeed_bad_records", "Records skipped, by reason.",
                                  labels=["dataset", "source", "reason"])
        shards = GaugeMetricFamily("tokenfeed_dataset_shards", "Shards of a dataset (of a mixture: of its components).",
                                   labels=["dataset"])
        rows = CounterMetricFamily("tokenfeed_mixture_rows",
                                   "Rows served per mixture component; realised share = rate / sum of rates.",
                                   labels=["dataset", "source"])
        from server.mixture import Mixture  # (here: server.mixture imports server.dataset, which imports this module)

        for name, ds in sorted(self.datasets.items()):
            shards.add_metric([name], ds.num_shards)
            if isinstance(ds, Mixture):  # no source of its own: its components' bad records count under their names
                for part, served in zip(ds.components, list(ds.rows_served)):
                    rows.add_metric([name, part.name], served)
                continue
            for reason, count in sorted(ds.bad.snapshot().items()):
                if reason != "broken_shard":  # whole shards: tokenfeed_broken_shards_total
                    bad.add_metric([name, ds.source_config.type, reason], count)
        yield bad
        yield shards
        yield rows


def _mixture_weight(mix: Mixture, component: int) -> float:
    """A component's scheduled weight at the mixture's rows served so far (what Describe reports)."""
    return float(mix.schedule.weights_at(sum(mix.rows_served))[component])


# ---- the /metrics endpoint -----------------------------------------------------------------------
#: The bearer token /metrics requires (``server.metrics_token_file``/``_env``); ``None``: open. Set
#: by the server process at start (``server.auth.install_guards``): ``start_exporter`` sees no config.
_scrape_token: str | None = None


def require_scrape_token(token: str | None) -> None:
    """Make the /metrics endpoints started from now on require ``Authorization: Bearer <token>``
    (``None``: open)."""
    global _scrape_token
    _scrape_token = token


class MetricsExporter:
    """The /metrics HTTP endpoint (a daemon thread) and the collector of one running server; with
    ``token``, a scrape without ``Authorization: Bearer <token>`` gets 401."""

    def __init__(self, host: str, port: int, datasets: Mapping[str, Dataset | Mixture], store: ShardStore,
                 token: str | None = None) -> None:
        from server.mixture import Mixture  # (here: server.mixture imports server.dataset, which imports this module)

        disable_created_metrics()  # no *_created series: they double the output and nobody graphs them
        self._weights: list[tuple[str, str]] = []  # (mixture, component): gauges read from a mixture
        for name, ds in datasets.items():  # series exist (at 0) from the start, not from the first event
            for family in (ACTIVE_STREAMS, FIRST_BATCH_SECONDS, ASSEMBLY_SECONDS, SENT_MESSAGES, SENT_BATCHES,
                           SENT_ROWS, SENT_BYTES):
                family.labels(name)
            for packing in wire.PACKINGS:
                SENT_TOKENS.labels(name, packing)
                SENT_PAD_TOKENS.labels(name, packing)
            if isinstance(ds, Mixture):  # no source or tokenizer of its own; weights read at scrape time
                for i, part in enumerate(ds.components):
                    MIXTURE_WEIGHT.labels(name, part.name).set_function(functools.partial(_mixture_weight, ds, i))
                    self._weights.append((name, part.name))
                continue
            source, tokenizer = ds.source_config.type, ds.info.name if ds.tokenizer else "none"
            for reason in BROKEN_REASONS:
                BROKEN_SHARDS.labels(name, source, reason)
            TOKENIZED_SHARDS.labels(name, source), SOURCE_BYTES.labels(name, source), SHARD_LOAD_SECONDS.labels(name)
            TOKENIZER_TOKENS.labels(name, tokenizer), TOKENIZER_DOCUMENTS.labels(name, tokenizer)
        self.collector = ServerCollector(datasets, store)
        REGISTRY.register(self.collector)
        try:
            self._httpd: Any = _serve_http(host, port, token)
        except BaseException:
            REGISTRY.unregister(self.collector)
            raise
        self.host, self.port = host, int(self._httpd.server_port)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop serving /metrics and detach the collector (idempotent)."""
        with self._lock:
            if self._httpd is None:
                return
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
            REGISTRY.unregister(self.collector)
            for labels in self._weights:  # they hold this server's mixtures
                MIXTURE_WEIGHT.remove(*labels)


def _serve_http(host: str, port: int, token: str | None) -> Any:
    """The HTTP server of /metrics, serving in a daemon thread. Open: prometheus_client's own.
    With a token: its WSGI app behind ``server.auth.require_bearer``, served the way its
    ``start_http_server`` does (that function takes no auth hook)."""
    if token is None:
        return start_http_server(port, addr=host, registry=REGISTRY)[0]
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    from server.auth import require_bearer

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are not logged (refusals are, by the guard)."""

    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class MetricsHTTPServer(ThreadingWSGIServer):
        address_family = family

    app = require_bearer(make_wsgi_app(REGISTRY), token, realm="tokenfeed /metrics")
    httpd = make_server(str(sockaddr[0]), port, app, MetricsHTTPServer, handler_class=Quiet)
    threading.Thread(target=httpd.serve_forever, name="tokenfeed-metrics", daemon=True).start()
    return httpd


def start_exporter(host: str, port: int | None, datasets: Mapping[str, Dataset | Mixture],
                   store: ShardStore) -> MetricsExporter | None:
    """Serve /metrics on ``host:port`` (0 picks a free port); ``None`` when no port is configured.
    It requires the token of ``require_scrape_token``, when one is set."""
    if port is None:
        return None
    exporter = MetricsExporter(host, port, datasets, store, token=_scrape_token)
    log.info("metrics: serving http://%s:%d/metrics%s", host, exporter.port,
             " (bearer token required)" if _scrape_token is not None else "")
    return exporter
