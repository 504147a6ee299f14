"""What a running server exports to Prometheus beyond the counters it keeps as it goes: a
collector that reads the cache, the prefetcher, the datasets and the mixtures at scrape time, the
/metrics HTTP endpoint (optionally behind a bearer token), and the event-loop lag watch."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.metrics import (ACTIVE_STREAMS, ASSEMBLY_SECONDS, BROKEN_REASONS, BROKEN_SHARDS, FIRST_BATCH_SECONDS,
                            LOOP_LAG_SECONDS, MIXTURE_WEIGHT, REGISTRY, SENT_BATCHES, SENT_BYTES, SENT_MESSAGES,
                            SENT_PAD_TOKENS, SENT_ROWS, SENT_TOKENS, SHARD_LOAD_SECONDS, SOURCE_BYTES,
                            TOKENIZED_SHARDS, TOKENIZER_DOCUMENTS, TOKENIZER_TOKENS, flush_meters)
from server.serve.auth import require_bearer
from server.stages.served import Served
from server.supply.store import ShardStore
from tokenfeed.constants import PACKINGS

log = logging.getLogger(__name__)


async def watch_loop_lag(interval_s: float = 0.1, observe: Callable[[float], None] = LOOP_LAG_SECONDS.observe) -> None:
    """Until cancelled: sleep ``interval_s`` on the running loop and observe how much later than
    asked it woke (a timer runs only after the callbacks that were ready before it); then add the
    open streams' counts to the counters (``metrics.flush_meters``)."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - t0 - interval_s))
        flush_meters()


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
_SHARED_COUNTERS = {
    "reads": "Entries read from the shared (object-store) cache tier.",
    "read_bytes": "Bytes read from the shared cache tier.",
    "writes": "Entries written to the shared cache tier.",
    "write_bytes": "Bytes written to the shared cache tier.",
    "read_errors": "Reads of the shared cache tier that failed (served by tokenizing instead).",
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

    def __init__(self, datasets: Mapping[str, Served], store: ShardStore) -> None:
        self.datasets, self.store = datasets, store

    def describe(self) -> list[Metric]:
        return []  # dynamic: the families depend on what the cache reports

    def collect(self) -> Iterator[Metric]:
        stats = store_stats(self.store)
        for name, doc in _CACHE_COUNTERS.items():
            if (v := _number(stats.get(name))) is not None:
                yield CounterMetricFamily(f"tokenfeed_cache_{name}", doc, value=v)
        for name, doc in _SHARED_COUNTERS.items():
            if (v := _number(stats.get(f"shared_{name}"))) is not None:
                yield CounterMetricFamily(f"tokenfeed_cache_shared_{name}", doc, value=v)
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
        for name, ds in sorted(self.datasets.items()):
            shards.add_metric([name], ds.num_shards)
            if ds.components:  # a mixture: no source of its own (its components' bad records count under theirs)
                for source in ds.sources():
                    rows.add_metric([name, source["name"]], source["rows_served"])
                continue
            (plain,) = ds.parts
            for reason, count in sorted(plain.bad.snapshot().items()):
                if reason != "broken_shard":  # whole shards: tokenfeed_broken_shards_total
                    bad.add_metric([name, plain.source_config.type, reason], count)
        yield bad
        yield shards
        yield rows


def _mixture_weight(mix: Served, component: int) -> float:
    """A component's scheduled weight at the mixture's rows served so far (what Describe reports)."""
    return float(mix.sources()[component]["weight"])


# ---- the /metrics endpoint -----------------------------------------------------------------------
class MetricsExporter:
    """The /metrics HTTP endpoint (a daemon thread) and the collector of one running server; with
    ``token``, a scrape without ``Authorization: Bearer <token>`` gets 401."""

    def __init__(self, host: str, port: int, datasets: Mapping[str, Served], store: ShardStore,
                 token: str | None = None) -> None:
        disable_created_metrics()  # no *_created series: they double the output and nobody graphs them
        self._weights: list[tuple[str, str]] = []  # (mixture, component): gauges read from a mixture
        for name, ds in datasets.items():  # series exist (at 0) from the start, not from the first event
            for family in (ACTIVE_STREAMS, FIRST_BATCH_SECONDS, ASSEMBLY_SECONDS, SENT_MESSAGES, SENT_BATCHES,
                           SENT_ROWS, SENT_BYTES):
                family.labels(name)
            for packing in PACKINGS:
                SENT_TOKENS.labels(name, packing)
                SENT_PAD_TOKENS.labels(name, packing)
            if ds.components:  # a mixture: no source or tokenizer of its own; weights read at scrape time
                for i, part in enumerate(ds.components):
                    MIXTURE_WEIGHT.labels(name, part.name).set_function(functools.partial(_mixture_weight, ds, i))
                    self._weights.append((name, part.name))
                continue
            (plain,) = ds.parts
            source, tokenizer = plain.source_config.type, plain.info.name if plain.tokenizer else "none"
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
    With a token: its WSGI app behind ``server.serve.auth.require_bearer``, served the way its
    ``start_http_server`` does (that function takes no auth hook)."""
    if token is None:
        return start_http_server(port, addr=host, registry=REGISTRY)[0]
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer


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


def start_exporter(host: str, port: int | None, datasets: Mapping[str, Served],
                   store: ShardStore, token: str | None = None) -> MetricsExporter | None:
    """Serve /metrics on ``host:port`` (0 picks a free port); ``None`` when no port is configured.
    With ``token`` (``server.serve.auth.load_metrics_token``), a scrape must bear it."""
    if port is None:
        return None
    exporter = MetricsExporter(host, port, datasets, store, token=token)
    log.info("metrics: serving http://%s:%d/metrics%s", host, exporter.port,
             " (bearer token required)" if token is not None else "")
    return exporter
