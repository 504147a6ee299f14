"""Build the server from a config, serve until a signal, and shut down in a fixed order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.config import Config
from server.exporter import MetricsExporter, start_exporter, watch_loop_lag
from server.serve.auth import (AccessInterceptor, check_config_paths, check_dataset_files, install_guards, load_tokens,
                               server_credentials)
from server.serve.limits import ProbeStreamLimit, connection_cap, raise_fd_limit, server_options
from server.serve.rpc_metrics import RpcMetricsInterceptor
from server.serve.service import SERVICE_NAME, TokenFeedService, add_to_server
from server.stages.dataset import Dataset
from server.stages.mixture import build_mixture
from server.stages.served import Served
from server.supply.store import ShardStore, build_store

__all__ = ["LOAD_THREAD_PREFIX", "Running", "build_datasets", "serve", "start"]

log = logging.getLogger("server")

#: The names of the executor's threads, which read, tokenize and pack shards.
LOAD_THREAD_PREFIX = "tokenfeed-load"


def build_datasets(config: Config) -> dict[str, Served]:
    """Resolve every dataset's files and shards; config errors surface here, at start-up.
    With ``server.data_roots`` nothing outside them is read (paths checked before and after)."""
    check_config_paths(config)
    with gc_paused():
        plain = {name: Dataset(name, ds) for name, ds in config.datasets.items() if ds.mixture is None}
        check_dataset_files(config, {name: ds.source.files() for name, ds in plain.items()})
        served: dict[str, Served] = dict(plain)
        for name, ds in config.datasets.items():
            if ds.mixture is not None:
                served[name] = build_mixture(name, ds.mixture, plain)
    return served


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block: building datasets makes a few objects a file
    (paths, stats, identities, shards) that all live on, and at 100,000 files the collections that
    their allocation set off scanned them again and again (measured: 15% of a warm start-up). The
    collector runs as before afterwards (and if it was off, stays off)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class Running:
    """A started server: its port, the store (for its counters) and what ``close`` shuts down."""

    port: int
    datasets: dict[str, Served]
    store: ShardStore
    grace_s: float
    _server: grpc.aio.Server
    _service: TokenFeedService
    _health: health.aio.HealthServicer
    _executor: ThreadPoolExecutor
    _exporter: MetricsExporter | None
    _lag_watch: asyncio.Task[None]

    @property
    def metrics_port(self) -> int | None:
        return self._exporter.port if self._exporter is not None else None

    async def close(self) -> None:
        """Health NOT_SERVING, then, in a fixed order: refuse new streams, let open ones send the
        message they are assembling (then they end with UNAVAILABLE and their clients resume from
        the cursor elsewhere) within the grace period, stop gRPC (cancelling what is left: streams
        whose client stopped reading, health watches), then cancel prefetches."""
        log.info("shutting down: health NOT_SERVING, draining streams for %.1fs", self.grace_s)
        try:
            await self._health.enter_graceful_shutdown()
        finally:
            admission = self._service.admission
            t0, open_streams = time.monotonic(), admission.drain()
            drained = await admission.wait_idle(self.grace_s)
            await self._server.stop(min(1.0, self.grace_s))
            log.info("drained %d stream(s) in %.2fs%s", open_streams, time.monotonic() - t0,
                     "" if drained else f"; {admission.streams} cancelled after the grace period")
            self._lag_watch.cancel()
            await self.store.close()
            self._executor.shutdown(wait=False, cancel_futures=True)
            if self._exporter is not None:
                self._exporter.close()
            log.info("stopped")


async def start(config: Config, datasets: dict[str, Served] | None = None) -> Running:
    """Start serving ``config`` (its datasets built here unless given) on its host and port (0
    picks a free one: see ``Running.port``), /metrics too when a metrics port is set."""
    settings = config.server
    fd_limit = raise_fd_limit()  # before anything opens files or sockets
    metrics_token = install_guards(settings)  # reads confined to data_roots from now on
    tokens = load_tokens(settings, config.datasets)
    credentials = server_credentials(settings)
    datasets = build_datasets(config) if datasets is None else datasets
    executor = ThreadPoolExecutor(settings.workers, thread_name_prefix=LOAD_THREAD_PREFIX)
    store = build_store(config, executor)
    connections = connection_cap(settings.max_connections, fd_limit)
    log.info("connections: at most %d, handshake timeout %gs, closed after %gs without a call; open-file limit %s; "
             "%d health Watch/reflection streams", connections, settings.handshake_timeout_s,
             settings.connection_idle_s, fd_limit if fd_limit is not None else "unknown", settings.max_health_watches)
    # The metrics interceptor goes first so that refused calls are counted too. No gRPC-wide RPC
    # cap (maximum_concurrent_rpcs): it counted health watches with data streams, so watches that
    # need no token could fill it and refuse trainers without a retry key. Instead each kind that
    # stays open has its own cap, refused with RETRY_AFTER_KEY: data streams server.max_streams
    # (Admission), health Watch and reflection server.max_health_watches; unary calls end at once.
    server = grpc.aio.server(
        interceptors=[RpcMetricsInterceptor(), ProbeStreamLimit(settings.max_health_watches),
                      AccessInterceptor(SERVICE_NAME, tokens)],
        options=server_options(settings, connections))
    service = TokenFeedService(datasets, store, settings)
    add_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {settings.host}:{settings.port}")
    exporter = start_exporter(settings.host, settings.metrics_port, datasets, store, token=metrics_token)
    lag_watch = asyncio.get_running_loop().create_task(watch_loop_lag(), name="tokenfeed-loop-lag")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    for ds in datasets.values():
        log.info("dataset %r: %d shards, %d bytes, tokenizer %s (vocab %d), fingerprint %s", ds.name,
                 ds.num_shards, sum(s.bytes for s in ds.shards), ds.info.name, ds.info.vocab_size, ds.fingerprint)
    log.info("tokenfeed listening on %s:%d (%s, %s)", settings.host, port,
             "mutual TLS" if settings.tls_client_ca else "TLS" if credentials else "plaintext",
             f"{len(tokens)} bearer token(s)" if tokens else "no authentication")
    return Running(port, datasets, store, settings.shutdown_grace_s, server, service, health_servicer, executor,
                   exporter, lag_watch)


def freeze_start_up() -> int:
    """Collect what the start-up left once, then keep the rest (the datasets' shard indexes,
    tokenizers, gRPC, the imported modules: it all lives as long as the process) out of every
    later collection; the count of objects frozen. A full collection walks every tracked object:
    with 20,000 one-shard files, 150,000 of them and 65 ms of the event loop, during which no
    stream sends (0.0 ms frozen; ``gc.freeze``). Only for the server's own process: a program
    that starts servers in-process (the tests) keeps its objects collectable."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def serve(config: Config, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down (``Running.close``)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(config)
    log.info("start-up's %d objects frozen out of the garbage collector", freeze_start_up())
    try:
        await stop.wait()
    finally:
        await running.close()
