"""Prometheus metrics of the data server: the definitions and the small helpers that count into them.

It imports nothing of the server (every module may import it): the gRPC interceptor is
``server.serve.rpc_metrics``, the scrape-time collector and the /metrics endpoint ``server.exporter``."""

from __future__ import annotations

import errno
import functools
import logging
import time

import numpy as np
from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector)


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
PACED_BATCHES = Gauge("tokenfeed_paced_batches_per_message",
                      "Batches a message the server chooses now for streams that let it (before each one's ceiling).",
                      registry=REGISTRY)
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

# ---- data plans ----------------------------------------------------------------------------------
PLAN_KINDS = ("skip", "exclude", "weights")
PLAN_EDITS = Gauge("tokenfeed_plan_edits", "Data plan edits carried by the streams open now, by kind.",
                   ["kind"], registry=REGISTRY)
for _kind in PLAN_KINDS:
    PLAN_EDITS.labels(_kind)


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


@functools.cache
def _id_bytes(dtype: np.dtype, token: int) -> bytes | None:
    """A token id's bytes in ``dtype``; None where no id of that dtype is ``token``."""
    try:
        return dtype.type(token).tobytes()
    except OverflowError:
        return None


def pad_positions(tokens: np.ndarray, pad_id: int) -> int:
    """PAD among the input positions of ``tokens`` (``[..., seq_len + 1]``). Every packing pads
    only the tail of a row, so only rows whose last input is PAD need counting: O(rows) for
    ``concat``, which pads one row per shard."""
    pad = _id_bytes(tokens.dtype, pad_id)
    if pad is None or pad not in tokens[..., -2].tobytes():  # a byte search, once per message: 0.5 us against a
        return 0  # ufunc's 2.4 (a match across two ids only sends it to the exact count below)
    inputs = tokens[..., :-1]
    padded = inputs[..., -1] == pad_id
    return int(np.count_nonzero(inputs[padded] == pad_id))


#: Open streams' meters, flushed together (``flush_meters``): on the event loop only.
_METERS: set[StreamMeter] = set()


def flush_meters() -> None:
    """Add every open stream's counts since its last flush to the counters (the server's loop
    does, every 0.1 s: ``exporter.watch_loop_lag``)."""
    for meter in list(_METERS):
        meter.flush()


class StreamMeter:
    """Accounting of one stream, observed once per message (never per token).

    Use as a context manager around the stream (it counts the stream as active), call ``sent``
    when a message is ready and ``resumed`` when the consumer asks for the next one, so that the
    assembly time excludes time spent blocked on the client.

    The sent counters are added to at the stream's first message, when it ends and whenever
    ``flush_meters`` runs, not at every message: with 64 ranks on one server, the counters'
    updates (six a message, each through a lock) were most of the meter's cost: 64 ranks got
    6.6% more tokens/s without them (alternating, 6 runs each: medians 65.9 against 61.8 M). The
    bytes through shared memory (``shared``) are counted the same way.
    """

    def __init__(self, dataset: str, packing: str, pad_id: int) -> None:
        self.pad_id = pad_id
        self._active = ACTIVE_STREAMS.labels(dataset)
        self._first = FIRST_BATCH_SECONDS.labels(dataset)
        self._assembly = ASSEMBLY_SECONDS.labels(dataset)
        self._counters = [c.labels(dataset) for c in (SENT_MESSAGES, SENT_BATCHES, SENT_ROWS)]
        self._counters += [c.labels(dataset, packing) for c in (SENT_TOKENS, SENT_PAD_TOKENS)]
        self._counters.append(SENT_BYTES.labels(dataset))
        self._counters.append(SHARED_MEMORY_BYTES.labels(dataset))  # (last: ``shared`` adds to it)
        self._efficiency = PACKING_EFFICIENCY.labels(dataset, packing)
        self._totals = _PACKING_TOTALS.setdefault((dataset, packing), [0, 0])
        self._start = self._mark = time.perf_counter()
        self._messages = 0
        self._pending = [0] * len(self._counters)  # counts not added to the counters yet, in their order

    def __enter__(self) -> StreamMeter:
        self._active.inc()
        _METERS.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _METERS.discard(self)
        self.flush()
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
        pending = self._pending
        pending[0] += 1
        pending[1] += batches
        pending[2] += batches * rows
        pending[3] += positions
        pending[4] += pads
        pending[5] += payload_bytes
        if self._messages == 1:  # a stream's first message shows at once
            self.flush()

    def flush(self) -> None:
        """Add the stream's counts since the last flush to the counters."""
        pending = self._pending
        if not any(pending):  # (a stream's first message is flushed before its shared bytes are counted)
            return
        for counter, n in zip(self._counters, pending):
            counter.inc(n)
        totals = self._totals
        totals[0] += pending[3]
        totals[1] += pending[4]
        self._efficiency.set(1.0 - totals[1] / totals[0] if totals[0] else 1.0)
        self._pending = [0] * len(pending)

    def shared(self, payload_bytes: int) -> None:
        """The last message's tokens went through the client's shared-memory ring."""
        self._pending[-1] += payload_bytes

    def resumed(self) -> None:
        """The consumer took the last message; the next one's assembly starts now."""
        self._mark = time.perf_counter()


#: (dataset, packing) -> [positions, pads]; written on the event loop only.
_PACKING_TOTALS: dict[tuple[str, str], list[int]] = {}
