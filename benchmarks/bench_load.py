"""Load and fault scenarios (issue 8): many concurrent streams, streams opened and abandoned, a slow
consumer, a server restarted under many clients. Each scenario returns its figures; the tests
(tests/test_load.py) run them briefly and assert, this script runs them longer and saves JSON.

Abuse (issue 17), each while two trainer-like streams read (in a process of their own, a batch every
10 ms): 700 health Watch calls over 7 connections, 500 idle TCP connections, one rank of an
8,192-rank token-budget job, token-budget requests at world size 65,536 (refused), a zstd stream of
2 MiB messages. For each: the normal streams' batches/s, waits and largest gap before and during it,
errors, the server's event-loop lag (p99 of its ``tokenfeed_event_loop_lag_seconds`` histogram over
the window) and a new client's time to first batch during it.

    python -m benchmarks.bench_load [--quick] [--streams 64] [--seconds 20] [--abandon 1000]
                                    [--slow-s 30] [--clients 32] [--after 1000] [--before-s 4]
                                    [--hold-s 5] [--handshake-s 5] [--watches 700] [--idle 500]
                                    [--world 8192]

About 2 minutes on 2 cores (``--quick``: about 1). Loopback only. Server memory is read from
/proc/PID/status (VmRSS), descriptors from /proc/PID/fd, event-loop tasks, admitted streams and
loop lag from the server's /metrics. Saves results/load.json.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import multiprocessing
import os
import random
import re
import selectors
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._common import ServerProcess, jsonl_config, make_documents, write_jsonl
from benchmarks.common import percentiles, save
from client import StreamingDataset
from tokenfeed.constants import RETRY_AFTER_KEY
from tokenfeed import wire
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

SEQ, BATCH, DATASET = 64, 4, "docs"


# ---- the server and what it holds -----------------------------------------------------------------
def load_config(directory: Path, docs: int = 400, **server: Any) -> dict[str, Any]:
    """A JSONL corpus of small shards (many shard changes, prefetches, evictions) and its config."""
    write_jsonl(directory / "data", make_documents(docs, seed=8, max_len=3000), files=4)
    config = jsonl_config(directory / "data", shard_bytes=16 << 10, metrics_port=0, **server)
    config["prefetch"] = {"depth": 2}
    # The packed shards of every epoch the streams pass stay in the hot tier up to its budget
    # (512 MiB by default): a small one here, so that the memory figures show per-stream state.
    config["cache"] = {"hot_max_bytes": "16MiB"}
    return config


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape(server: ServerProcess) -> str:
    """The text of the server's /metrics."""
    port = next(m.group(1) for line in reversed(server.lines)  # the latest start's port
                if (m := re.search(r"serving http://\S+?:(\d+)/metrics", line)))
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def metrics(server: ServerProcess) -> dict[str, float]:
    """The server's /metrics, each series summed over its labels."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(scrape(server)):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def snapshot(server: ServerProcess) -> dict[str, float]:
    """Memory, descriptors, tasks and streams of the server process now."""
    m = metrics(server)
    return {"rss_kib": rss_kib(server.proc.pid), "fds": fd_count(server.proc.pid),
            "loop_tasks": m.get("tokenfeed_event_loop_tasks", -1),
            "admitted": m.get("tokenfeed_admitted_streams", -1),
            "active": m.get("tokenfeed_active_streams", -1),
            "prefetch_queue": m.get("tokenfeed_prefetch_queue_depth", -1),
            "inflight_loads": m.get("tokenfeed_inflight_loads", -1)}


class RssSampler:
    """Samples a process's VmRSS every ``period`` seconds in a thread (``with`` block)."""

    def __init__(self, pid: int, period: float = 0.05, probe: Callable[[], dict[str, float]] | None = None) -> None:
        self.pid, self.period, self.probe = pid, period, probe
        self.samples: list[int] = []
        self.probes: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(rss_kib(self.pid))
            if self.probe is not None:
                self.probes.append(self.probe())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_until(check: Callable[[], bool], timeout: float = 15.0, period: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(period)
    return check()


# ---- the reference: one stream of the whole job ------------------------------------------------------
def reference(address: str, batches: int, world: int, seed: int = 0) -> list[list[bytes]]:
    """Global batches 0..batches-1 from a single stream (world size 1, 64 batches a message),
    dealt as contract 3 says: rank ``r`` gets batches ``r, r+W, ...``. Each batch is the digest
    of its ``input_ids``."""
    per_rank: list[list[bytes]] = [[] for _ in range(world)]
    request = pb.StreamRequest(dataset=DATASET, seed=seed, seq_len=SEQ, batch_size=BATCH, world_size=1,
                               batches_per_message=64)
    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.TokenFeedStub(channel).StreamBatches(request, timeout=120)
        g = 0
        for chunk in call:
            for tokens in wire.decode_chunk(chunk):
                per_rank[g % world].append(digest(tokens[:, :-1]))
                g += 1
                if g == batches:
                    call.cancel()
                    return per_rank
    return per_rank


def digest(ids: Any) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(np.asarray(ids, dtype=np.int64)).tobytes(), digest_size=16).digest()


def account(got: list[bytes], expected: list[bytes]) -> dict[str, int]:
    """Compare a rank's batches with its reference, in order: ``exact`` counts batches equal to
    the reference at their position; a mismatch is classified by aligning the two sequences
    (a repeat of the previous batch is ``duplicated``, a jump ahead ``lost``, else ``wrong``).
    Identical batches can occur legitimately (a long document aligned the same way in two
    epochs), which is why this walks the sequence instead of looking batches up by content."""
    j, out = 0, {"batches": len(got), "exact": 0, "wrong": 0, "duplicated": 0, "lost": 0}
    for k, d in enumerate(got):
        out["exact"] += k < len(expected) and expected[k] == d
        if j < len(expected) and expected[j] == d:
            j += 1
        elif j > 0 and expected[j - 1] == d:
            out["duplicated"] += 1
        elif d in expected[j : j + 1000]:
            skip = expected.index(d, j, j + 1000) - j
            out["lost"] += skip
            j += skip + 1
        else:
            out["wrong"] += 1
    return out


def total(accounts: list[dict[str, int]]) -> dict[str, int]:
    return {k: sum(a[k] for a in accounts) for k in accounts[0]}


# ---- scenario 1: many concurrent streams ------------------------------------------------------------
def concurrent_streams(server: ServerProcess, streams: int = 64, seconds: float = 5.0) -> dict[str, Any]:
    """``streams`` threads, each a StreamingDataset (rank r of ``streams``), iterate for ``seconds``;
    every batch is checked against a single reference stream; server RSS is sampled throughout."""
    got: list[list[bytes]] = [[] for _ in range(streams)]
    latencies: list[list[float]] = [[] for _ in range(streams)]
    errors: list[str] = []
    start, stop = threading.Barrier(streams + 1), threading.Event()

    def run(rank: int) -> None:
        try:
            it = iter(StreamingDataset(server.address, DATASET, SEQ, BATCH, rank=rank, world_size=streams))
            start.wait()
            while not stop.is_set():
                t0 = time.perf_counter()
                batch = next(it)
                latencies[rank].append(time.perf_counter() - t0)
                got[rank].append(digest(batch["input_ids"]))
        except Exception as err:  # noqa: BLE001 - counted and reported
            errors.append(f"rank {rank}: {type(err).__name__}: {err}")
            start.abort()

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(streams)]
    before = snapshot(server)
    with RssSampler(server.proc.pid) as sampler:
        for t in threads:
            t.start()
        start.wait(60)
        t0 = time.perf_counter()
        time.sleep(seconds)  # the fixed measuring window
        stop.set()
        for t in threads:
            t.join(60)
        elapsed = time.perf_counter() - t0
    after = snapshot(server)
    longest = max(len(g) for g in got)
    ref = reference(server.address, longest * streams, streams)
    accounts = [account(g, ref[r]) for r, g in enumerate(got)]
    batches = sum(len(g) for g in got)
    return {
        "streams": streams, "seconds": round(elapsed, 2), "batches": batches, "errors": len(errors),
        "error_samples": errors[:3], **total(accounts),
        "batches_per_s": round(batches / elapsed, 1), "tokens_per_s": round(batches * BATCH * SEQ / elapsed),
        "latency_s": percentiles([x for lat in latencies for x in lat]) if batches else {},
        "rss_kib": {"before": before["rss_kib"], "peak": max(sampler.samples, default=0), "after": after["rss_kib"]},
    }


# ---- scenario 2: streams opened and abandoned -----------------------------------------------------
def _abandon(address: str, n: int, concurrent: int, seed: int) -> dict[str, int]:
    """Open ``n`` streams, ``concurrent`` at a time; read 0-3 messages of each, then cancel it."""
    rng = random.Random(seed)
    plans = []
    for _ in range(n):
        world = rng.choice([1, 2, 8])
        plans.append((pb.StreamRequest(dataset=DATASET, seed=rng.randrange(1 << 32), seq_len=SEQ, batch_size=BATCH,
                                       world_size=world, rank=rng.randrange(world),
                                       batches_per_message=rng.choice([1, 4])), rng.randrange(0, 4)))
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def one(stub: pb_grpc.TokenFeedStub, request: pb.StreamRequest, reads: int) -> None:
        call = stub.StreamBatches(request)
        outcome = "cancelled_by_client"
        try:
            for _ in range(reads):  # 0: cancelled before the first message
                next(call)
        except grpc.RpcError as err:
            outcome = err.code().name
        finally:
            call.cancel()
        with lock:
            codes[outcome] = codes.get(outcome, 0) + 1

    with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(concurrent) as pool:
        stub = pb_grpc.TokenFeedStub(channel)
        list(pool.map(lambda plan: one(stub, *plan), plans))
    return codes


def quiet(server: ServerProcess, baseline: dict[str, float],
          seen: dict[str, float] | None = None) -> Callable[[], bool]:
    """No stream left open, no prefetch or load running, and no more tasks or descriptors than at
    ``baseline`` (a closing connection holds its descriptor for a moment: wait for it; a leaked one
    never goes, and the caller compares after the wait times out). ``seen`` gets the snapshot judged
    last: the one to report, since a later one can catch the descriptor of the /metrics request
    that the snapshot itself made, not yet closed by the server."""
    def check() -> bool:
        s = snapshot(server)
        if seen is not None:
            seen.update(s)
        return s["admitted"] == 0 and s["active"] == 0 and s["prefetch_queue"] == 0 and s["inflight_loads"] == 0 \
            and s["loop_tasks"] <= baseline["loop_tasks"] and s["fds"] <= baseline.get("fds", s["fds"])
    return check


def abandoned_streams(server: ServerProcess, n: int = 200, concurrent: int = 50) -> dict[str, Any]:
    """Open ``n`` streams (``concurrent`` at a time), read 0-3 messages from each and cancel it;
    compare descriptors, memory and event-loop tasks of the server before and after."""
    _abandon(server.address, 40, concurrent, seed=1)  # warm: caches, pools, metrics series
    wait_until(lambda: snapshot(server)["admitted"] == 0)
    before: dict[str, float] = {}
    wait_until(quiet(server, snapshot(server), seen=before))
    t0 = time.perf_counter()
    codes = _abandon(server.address, n, concurrent, seed=2)
    elapsed = time.perf_counter() - t0
    after: dict[str, float] = {}
    settled = wait_until(quiet(server, before, seen=after), timeout=20)
    return {"streams": n, "concurrent": concurrent, "seconds": round(elapsed, 2), "codes": codes,
            "settled": settled, "before": before, "after": after,
            "leaked": {"fds": after["fds"] - before["fds"], "loop_tasks": after["loop_tasks"] - before["loop_tasks"],
                       "rss_kib": after["rss_kib"] - before["rss_kib"]}}


# ---- scenario 3: a slow consumer --------------------------------------------------------------------
def slow_consumer(server: ServerProcess, seconds: float = 10.0, pause_s: float = 0.02) -> dict[str, Any]:
    """One client that takes a batch every ``pause_s``: the server must hold memory flat (the
    stream waits on flow control; the prefetcher stays ``depth`` shards ahead of it)."""
    ds = StreamingDataset(server.address, DATASET, SEQ, BATCH, seed=3)
    it = iter(ds)
    next(it)
    probe = lambda: snapshot(server)
    count, t0 = 0, time.perf_counter()
    with RssSampler(server.proc.pid, period=0.25, probe=probe) as sampler:
        while time.perf_counter() - t0 < seconds:
            next(it)
            count += 1
            time.sleep(pause_s)  # the slow consumer: training compute
    samples = sampler.samples
    half = len(samples) // 2
    return {"seconds": seconds, "batches": count, "epoch_rows_seen": ds.state_dict()["position"]["row"],
            "rss_kib": {"first": samples[0], "min": min(samples), "max": max(samples), "last": samples[-1],
                        "second_half_growth": max(samples[half:]) - min(samples[half:])},
            "prefetch_queue_max": max(p["prefetch_queue"] for p in sampler.probes),
            "inflight_loads_max": max(p["inflight_loads"] for p in sampler.probes)}


# ---- scenario 4: a retry storm ----------------------------------------------------------------------
class _Reconnects(logging.Handler):
    """Collects the client's 'reconnecting in X s' log records, by thread."""

    def __init__(self) -> None:
        super().__init__()
        self.delays: dict[str, list[float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"reconnecting in ([\d.]+)s", record.getMessage())
        if m:
            self.delays.setdefault(record.threadName, []).append(float(m.group(1)))


def retry_storm(server: ServerProcess, clients: int = 32, before: int = 10, after: int = 1000,
                how: str = "kill") -> dict[str, Any]:
    """``clients`` ranks stream; the server is killed (or stopped with SIGTERM) and restarted on
    the same port; every rank must continue exactly. Reports lost/duplicated batches and how the
    reconnects spread."""
    got: list[list[bytes]] = [[] for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    errors: list[str] = []

    def run(rank: int) -> None:
        try:
            it = iter(StreamingDataset(server.address, DATASET, SEQ, BATCH, rank=rank, world_size=clients, seed=5))
            for batch in itertools.islice(it, before):
                got[rank].append(digest(batch["input_ids"]))
            ready.wait(60)
            for batch in itertools.islice(it, after):
                got[rank].append(digest(batch["input_ids"]))
        except Exception as err:  # noqa: BLE001
            errors.append(f"rank {rank}: {type(err).__name__}: {err}")
            ready.abort()

    handler = _Reconnects()
    logger = logging.getLogger("client.transport")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    threads = [threading.Thread(target=run, args=(r,), name=f"rank-{r}", daemon=True) for r in range(clients)]
    try:
        for t in threads:
            t.start()
        ready.wait(120)
        opened_before = len(server.lines)
        t_down = time.perf_counter()
        code = server.kill() if how == "kill" else server.stop()
        server.start()
        for t in threads:
            t.join(120)
        resumed_s = time.perf_counter() - t_down
    finally:
        logger.removeHandler(handler)
    opens = [_stamp(line) for line in server.lines[opened_before:] if "stream opened" in line]
    ref = reference(server.address, (before + after) * clients, clients, seed=5)
    accounts = [account(g, ref[r]) for r, g in enumerate(got)]
    attempts = [len(v) for v in handler.delays.values()]
    firsts = [v[0] for v in handler.delays.values()]
    return {"clients": clients, "how": how, "exit_code": code, "errors": len(errors), "error_samples": errors[:3],
            **total(accounts), "all_done_after_kill_s": round(resumed_s, 2),
            "reconnect_attempts": {"clients": len(attempts), "total": sum(attempts), "max": max(attempts, default=0)},
            "first_delay_s": {"min": min(firsts, default=0), "max": max(firsts, default=0),
                              "distinct": len(set(firsts))},
            "reopen_spread_s": round(max(opens) - min(opens), 3) if opens else None}


def _stamp(line: str) -> float:
    """Seconds of the day of a server log line (``2026-01-01 12:00:00,123 ...``)."""
    h, m, s = line.split()[1].replace(",", ".").split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


# ---- abuse (issue 17): normal streams read while someone misbehaves ---------------------------------
# Every case runs against the same server while ``Trainers`` read: the normal streams' batches/s,
# waits and largest gap, and the server's event-loop lag (its /metrics histogram, bucket deltas),
# in the ``before_s`` seconds before the abuse and while it lasts. A new client also opens a stream
# during each abuse: its time to first batch says whether the server still admits trainers.
LAG = "tokenfeed_event_loop_lag_seconds"
TRAINER_STEP_S = 0.01  # the normal streams' training step: a batch every 10 ms at most


class Trainers:
    """``n`` normal streams (the ranks of one job) in a process of their own, like a trainer's, each
    taking a batch and then sleeping ``step_s`` (its training step) until the ``with`` block ends.
    Every batch's arrival (``time.monotonic``, the same clock in every process) and how long
    ``next`` waited for it come back here as they happen, so that any window can be judged."""

    def __init__(self, address: str, n: int = 2, step_s: float = TRAINER_STEP_S, seed: int = 11) -> None:
        self.arrivals: list[list[tuple[float, float]]] = [[] for _ in range(n)]
        self.errors: list[tuple[float, str]] = []
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with gRPC threads
        self._conn, child = ctx.Pipe(duplex=False)
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_trainers, args=(address, n, step_s, seed, child, self._stop), daemon=True)
        self._receiver = threading.Thread(target=self._receive, daemon=True)

    def _receive(self) -> None:
        try:
            while True:
                arrivals, errors = self._conn.recv()
                for rank, t, wait in arrivals:
                    self.arrivals[rank].append((t, wait))
                self.errors += errors
        except EOFError:
            pass

    def __enter__(self) -> Trainers:
        self._proc.start()
        self._receiver.start()
        if not wait_until(lambda: all(len(a) >= 10 for a in self.arrivals), timeout=120):
            self.__exit__()
            raise RuntimeError(f"the normal streams did not start: {self.errors[:3]}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._proc.join(60)
        self._receiver.join(10)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Batches/s (all streams, and the slowest one), waits, the largest gap between two batches
        of a stream (a stream still waiting at ``t1`` counts from its last batch) and errors."""
        rates, waits, gaps = [], [], []
        for arrivals in map(list, self.arrivals):  # a snapshot: the receiver appends
            inside = [(t, w) for t, w in arrivals if t0 <= t < t1]
            earlier = [t for t, _ in arrivals if t < t0][-1:]
            times = earlier + [t for t, _ in inside]
            rates.append(len(inside) / (t1 - t0))
            waits += [w for _, w in inside]
            gaps += [b - a for a, b in zip(times, times[1:])] + ([t1 - times[-1]] if times else [t1 - t0])
        return {"batches_per_s": round(sum(rates), 1), "slowest_stream_batches_per_s": round(min(rates), 1),
                "wait_ms": {"p50": ms(np.percentile(waits, 50)) if waits else None,
                            "p99": ms(np.percentile(waits, 99)) if waits else None,
                            "max": ms(max(waits, default=0.0))},
                "stall_pct": round(100 * sum(waits) / (len(rates) * (t1 - t0)), 2),
                "largest_gap_ms": ms(max(gaps)), "errors": sum(t0 <= t < t1 for t, _ in self.errors)}


def _trainers(address: str, n: int, step_s: float, seed: int, conn: Any, stop: Any) -> None:
    """The process of ``Trainers``: ``n`` ranks in threads; new arrivals go to ``conn`` every 50 ms.
    A reconnect (the client retries a broken stream by itself) counts as an error here."""
    lock, arrivals, errors = threading.Lock(), [], []

    class Reconnects(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "reconnecting in" in record.getMessage():
                with lock:
                    errors.append((time.monotonic(), f"{record.threadName}: {record.getMessage()}"))

    logging.getLogger("client.transport").addHandler(Reconnects())

    def rank_loop(rank: int) -> None:
        ds = StreamingDataset(address, DATASET, SEQ, BATCH, seed=seed, rank=rank, world_size=n)
        try:
            it = iter(ds)
            while not stop.is_set():
                t0 = time.monotonic()
                next(it)
                t1 = time.monotonic()
                with lock:
                    arrivals.append((rank, t1, t1 - t0))
                time.sleep(step_s)  # the training step
        except Exception as err:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append((time.monotonic(), f"rank {rank}: {type(err).__name__}: {err}"))
        finally:
            ds.close()

    threads = [threading.Thread(target=rank_loop, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        stop.wait(0.05)
        with lock:
            batch = (arrivals[:], errors[:])
            arrivals.clear()
            errors.clear()
        if batch[0] or batch[1]:
            conn.send(batch)
        if stop.is_set():
            for t in threads:
                t.join(30)
    with lock:
        conn.send((arrivals[:], errors[:]))
    conn.close()


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * float(seconds), 1)


def lag_histogram(server: ServerProcess) -> dict[float, float]:
    """The server's event-loop lag histogram now: cumulative sample counts by upper bound (``le``)."""
    return {float(s.labels["le"]): s.value for family in text_string_to_metric_families(scrape(server))
            if family.name == LAG for s in family.samples if s.name == LAG + "_bucket"}


def lag_between(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Quantiles of the lag samples taken between two scrapes, interpolated within buckets as
    Prometheus' ``histogram_quantile`` does; ``max_under_ms``: the bound of the highest bucket used."""
    buckets = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    count = buckets[-1][1] if buckets else 0.0

    def quantile(q: float) -> float | None:
        if not count:
            return None
        rank, lower, below = q * count, 0.0, 0.0
        for le, cumulative in buckets:
            if cumulative >= rank:
                if le == float("inf"):
                    return ms(lower)
                return ms(lower + (le - lower) * (rank - below) / max(cumulative - below, 1e-12))
            lower, below = le, cumulative
        return ms(lower)

    top = next((le for le, cumulative in buckets if cumulative >= count), None)
    return {"samples": int(count), "p50_ms": quantile(0.5), "p99_ms": quantile(0.99), "max_under_ms": ms(top)}


def first_batch_s(address: str, seed: int = 21) -> float | str:
    """Seconds a new client waits for its first batch (or the error it got)."""
    ds = StreamingDataset(address, DATASET, SEQ, BATCH, seed=seed, reconnect_deadline_s=30)
    t0 = time.monotonic()
    try:
        next(iter(ds))
        return round(time.monotonic() - t0, 3)
    except Exception as err:  # noqa: BLE001 - reported
        return f"{type(err).__name__}: {err}"
    finally:
        ds.close()


def hold(address: str, seconds: float) -> float | str:
    """Keep an abuse going for ``seconds`` while a new client opens a stream; its first-batch time."""
    end = time.monotonic() + seconds
    fresh = first_batch_s(address)
    time.sleep(max(0.0, end - time.monotonic()))
    return fresh


def under_abuse(server: ServerProcess, trainers: Trainers, case: Callable[[], dict[str, Any]],
                before_s: float) -> dict[str, Any]:
    """Run ``case`` (it starts its abuse, holds it, ends it and returns its figures) and judge the
    normal streams and the loop in the ``before_s`` seconds before it and while it ran."""
    lag0, tb = lag_histogram(server), time.monotonic()
    time.sleep(before_s)
    lag1, t0 = lag_histogram(server), time.monotonic()
    figures = case()
    t1 = time.monotonic()
    lag2 = lag_histogram(server)
    before = {**trainers.window(tb, t0), "loop_lag": lag_between(lag0, lag1)}
    during = {**trainers.window(t0, t1), "loop_lag": lag_between(lag1, lag2)}
    return {**figures, "window_s": round(t1 - t0, 2), "normal_before": before, "normal_during": during,
            "served_ratio": round(during["slowest_stream_batches_per_s"] / max(before["slowest_stream_batches_per_s"],
                                                                               1e-9), 3)}


def health_watches(server: ServerProcess, hold_s: float, n: int = 700, connections: int = 7) -> dict[str, Any]:
    """(a) ``n`` health ``Watch`` calls spread over ``connections`` connections, held ``hold_s``:
    all but ``server.max_health_watches`` must be refused (RESOURCE_EXHAUSTED with the retry key)."""
    channels = [grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
    t0 = time.monotonic()
    calls = [stubs[i % connections].Watch(health_pb2.HealthCheckRequest(service="")) for i in range(n)]
    outcomes: dict[str, int] = {}
    try:
        for call in calls:  # each call's first reply (a watch) or its error (a refusal comes at once)
            try:
                key = health_pb2.HealthCheckResponse.ServingStatus.Name(next(call).status)
            except grpc.RpcError as err:
                keys = {k for k, _ in err.trailing_metadata() or ()}
                key = err.code().name + (" retry" if RETRY_AFTER_KEY in keys else "")
            outcomes[key] = outcomes.get(key, 0) + 1
        answered_s = time.monotonic() - t0
        fresh = hold(server.address, hold_s)
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
    return {"watches": n, "connections": connections, "served": outcomes.pop("SERVING", 0),
            "refused": outcomes.pop("RESOURCE_EXHAUSTED retry", 0), "other": outcomes,
            "all_answered_s": round(answered_s, 3), "new_client_first_batch_s": fresh}


def idle_connections(server: ServerProcess, handshake_timeout_s: float, n: int = 500) -> dict[str, Any]:
    """(b) ``n`` raw TCP connections that never send a byte; the server must close each one after
    ``server.handshake_timeout_s``. Reports when they closed, counted from the last connect."""
    host, port = server.address.rsplit(":", 1)
    fds_before = fd_count(server.proc.pid)
    t0 = time.monotonic()
    socks = [socket.create_connection((host, int(port)), timeout=10) for _ in range(n)]
    connected = time.monotonic()
    try:
        fds_held = fd_count(server.proc.pid)
        fresh = first_batch_s(server.address)
        closed = close_times(socks, deadline=connected + handshake_timeout_s + 15)
    finally:
        for s in socks:
            s.close()
    after = [t - connected for t in closed.values()]
    return {"connections": n, "handshake_timeout_s": handshake_timeout_s, "connect_s": round(connected - t0, 3),
            "closed_by_server": len(closed), "first_closed_after_s": round(min(after), 2) if after else None,
            "all_closed_after_s": round(max(after), 2) if len(closed) == n else None,
            "server_fds": {"before": fds_before, "held": fds_held, "after": fd_count(server.proc.pid)},
            "new_client_first_batch_s": fresh}


def close_times(socks: list[socket.socket], deadline: float) -> dict[socket.socket, float]:
    """When the server closed each socket (EOF or reset; what it sent first is read and dropped),
    waiting until ``deadline`` at most."""
    closed: dict[socket.socket, float] = {}
    with selectors.DefaultSelector() as sel:
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        while len(closed) < len(socks) and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                sock = key.fileobj
                try:
                    while sock.recv(65536):
                        pass
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                closed[sock] = time.monotonic()
                sel.unregister(sock)
    return closed


def budget_stream(server: ServerProcess, hold_s: float, world: int = 8192) -> dict[str, Any]:
    """(c) One rank of a ``world``-rank token-budget job (``max_tokens=seq_len``) streams for
    ``hold_s``: every step it plans ``world`` pieces (all ranks'), which once froze the loop."""
    rank, stop, steps, errors = world // 2 - 1, threading.Event(), [], []

    def run() -> None:
        ds = StreamingDataset(server.address, DATASET, SEQ, 1, rank=rank, world_size=world, max_tokens=SEQ,
                              batches_per_message=1, decode_ahead=0)
        t0 = time.monotonic()
        try:
            for _ in ds:
                steps.append(time.monotonic() - t0)
                if stop.is_set():
                    break
        except Exception as err:  # noqa: BLE001 - reported
            errors.append(f"{type(err).__name__}: {err}")
        finally:
            ds.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    fresh = hold(server.address, hold_s)
    stop.set()
    thread.join(120)
    intervals = np.diff(steps) if len(steps) > 1 else np.array([])
    return {"world_size": world, "rank": rank, "pieces_per_step": world, "steps": len(steps),
            "first_step_s": round(steps[0], 3) if steps else None,
            "step_s_p50": round(float(np.median(intervals)), 3) if intervals.size else None,
            "errors": errors[:3], "new_client_first_batch_s": fresh}


def budget_refusals(server: ServerProcess, hold_s: float, world: int = 65536, period_s: float = 0.05) -> dict[str, Any]:
    """(c) A token-budget request at world size ``world`` every ``period_s`` for ``hold_s``: each must
    be refused at once with INVALID_ARGUMENT naming ``max_budget_pieces_per_message``."""
    request = pb.StreamRequest(dataset=DATASET, seq_len=SEQ, batch_size=1, world_size=world, rank=0, max_tokens=SEQ,
                               batches_per_message=1)
    codes: dict[str, int] = {}
    named, times, stop = 0, [], threading.Event()

    def run() -> None:
        nonlocal named
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TokenFeedStub(channel)
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    call = stub.StreamBatches(request, timeout=30)
                    next(call)
                    call.cancel()
                    code = "OK"
                except grpc.RpcError as err:
                    code, named = err.code().name, named + ("max_budget_pieces_per_message" in (err.details() or ""))
                times.append(time.perf_counter() - t0)
                codes[code] = codes.get(code, 0) + 1
                stop.wait(period_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    fresh = hold(server.address, hold_s)
    stop.set()
    thread.join(60)
    return {"world_size": world, "requests": len(times), "codes": codes, "name_the_limit": named,
            "refusal_ms": {"first": ms(times[0]) if times else None, "p50": ms(np.median(times)) if times else None,
                           "max": ms(max(times, default=0.0))}, "new_client_first_batch_s": fresh}


def zstd_stream(server: ServerProcess, hold_s: float, seq_len: int = 4096, batch_size: int = 32,
                per_message: int = 8) -> dict[str, Any]:
    """(d) A zstd-compressed stream of large batches (``per_message`` x ``batch_size`` x ``seq_len``
    tokens a message) read as fast as it comes for ``hold_s``; its compression runs off the loop."""
    stop, count, errors = threading.Event(), [0], []

    def run() -> None:
        ds = StreamingDataset(server.address, DATASET, seq_len, batch_size, seed=13, compression="zstd",
                              batches_per_message=per_message)
        try:
            for _ in ds:
                count[0] += 1
                if stop.is_set():
                    break
        except Exception as err:  # noqa: BLE001 - reported
            errors.append(f"{type(err).__name__}: {err}")
        finally:
            ds.close()

    thread = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    thread.start()
    fresh = hold(server.address, hold_s)
    stop.set()
    thread.join(60)
    elapsed = time.monotonic() - t0
    tokens = count[0] * batch_size * seq_len
    return {"seq_len": seq_len, "batch_size": batch_size, "batches_per_message": per_message,
            "message_mib": round(per_message * batch_size * (seq_len + 1) * 2 / (1 << 20), 2),
            "batches": count[0], "tokens_per_s": round(tokens / elapsed), "errors": errors[:3],
            "new_client_first_batch_s": fresh}


def abuse(server: ServerProcess, before_s: float, hold_s: float, handshake_timeout_s: float, normal: int = 2,
          watches: int = 700, idle: int = 500, world: int = 8192) -> dict[str, Any]:
    """Every abuse case in turn while ``normal`` trainer-like streams read."""
    cases: dict[str, Callable[[], dict[str, Any]]] = {
        "health_watches": lambda: health_watches(server, hold_s, watches),
        "idle_connections": lambda: idle_connections(server, handshake_timeout_s, idle),
        "budget_stream": lambda: budget_stream(server, hold_s, world),
        "budget_refusal": lambda: budget_refusals(server, hold_s),
        "zstd_stream": lambda: zstd_stream(server, hold_s),
    }
    out: dict[str, Any] = {"normal_streams": normal, "trainer_step_ms": ms(TRAINER_STEP_S), "before_s": before_s,
                           "hold_s": hold_s}
    with Trainers(server.address, n=normal, step_s=TRAINER_STEP_S) as trainers:
        for name, case in cases.items():
            out[name] = under_abuse(server, trainers, case, before_s)
            print(f"abuse {name}:", out[name], flush=True)
    out["normal_errors"] = [message for _, message in trainers.errors[:5]]
    return out


def abuse_table(results: dict[str, Any]) -> str:
    """The abuse cases as a table: what each did, and the normal streams before -> during it."""
    def what(name: str, r: dict[str, Any]) -> str:
        if name == "health_watches":
            return f"{r['served']} served, {r['refused']} refused (retry key), other {r['other'] or 0}"
        if name == "idle_connections":
            return f"{r['closed_by_server']}/{r['connections']} closed, all after {r['all_closed_after_s']} s"
        if name == "budget_stream":
            return f"W={r['world_size']}: {r['steps']} steps, first {r['first_step_s']} s, p50 {r['step_s_p50']} s"
        if name == "budget_refusal":
            return (f"W={r['world_size']}: {r['codes']}, named {r['name_the_limit']}/{r['requests']}, "
                    f"{r['refusal_ms']['p50']} ms (max {r['refusal_ms']['max']})")
        return f"{r['message_mib']} MiB msgs: {r['tokens_per_s'] / 1e6:.1f} M tokens/s"

    head = ("case", "abuse", "normal b/s before->during", "ratio", "gap max ms", "wait p99 ms",
            "loop lag p99 ms", "errors", "new client s")
    rows = [head]
    for name in ("health_watches", "idle_connections", "budget_stream", "budget_refusal", "zstd_stream"):
        r = results.get(name)
        if r is None:
            continue
        b, d = r["normal_before"], r["normal_during"]
        rows.append((name, what(name, r), f"{b['batches_per_s']} -> {d['batches_per_s']}",
                     f"{r['served_ratio']:.2f}", f"{b['largest_gap_ms']} -> {d['largest_gap_ms']}",
                     f"{b['wait_ms']['p99']} -> {d['wait_ms']['p99']}",
                     f"{b['loop_lag']['p99_ms']} -> {d['loop_lag']['p99_ms']}", str(d["errors"]),
                     str(r["new_client_first_batch_s"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


#: Defaults of a full run (about 3 minutes on 2 cores) and of ``--quick`` (about a minute).
FULL = {"streams": 64, "seconds": 20.0, "abandon": 1000, "slow_s": 30.0, "clients": 32, "after": 1000,
        "before_s": 4.0, "hold_s": 5.0, "handshake_s": 5.0}
QUICK = {"streams": 16, "seconds": 4.0, "abandon": 200, "slow_s": 6.0, "clients": 8, "after": 200,
         "before_s": 2.0, "hold_s": 2.5, "handshake_s": 3.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter windows, fewer streams (same abuse sizes)")
    parser.add_argument("--streams", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--abandon", type=int)
    parser.add_argument("--slow-s", type=float)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--after", type=int, help="batches each retry-storm client reads after the restart")
    parser.add_argument("--before-s", type=float, help="abuse: seconds measured before each case")
    parser.add_argument("--hold-s", type=float, help="abuse: seconds each abuse is held")
    parser.add_argument("--handshake-s", type=float, help="the server's handshake_timeout_s (idle connections)")
    parser.add_argument("--watches", type=int, default=700)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--world", type=int, default=8192, help="world size of the token-budget job")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    results: dict[str, Any] = {"seq_len": SEQ, "batch_size": BATCH, "quick": args.quick,
                               "loadavg_1m_at_start": os.getloadavg()[0]}  # others using the cores?
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(Path(tmp), docs=2000, handshake_timeout_s=args.handshake_s)
        server = ServerProcess(config, Path(tmp)).start()
        try:
            results["concurrent"] = concurrent_streams(server, args.streams, args.seconds)
            print("concurrent:", results["concurrent"], flush=True)
            results["abandoned"] = abandoned_streams(server, args.abandon, concurrent=100)
            print("abandoned:", results["abandoned"], flush=True)
            results["slow_consumer"] = slow_consumer(server, args.slow_s)
            print("slow consumer:", results["slow_consumer"], flush=True)
            results["abuse"] = abuse(server, args.before_s, args.hold_s, args.handshake_s, watches=args.watches,
                                     idle=args.idle, world=args.world)
            for how in ("kill", "term"):
                results[f"retry_storm_{how}"] = retry_storm(server, args.clients, after=args.after, how=how)
                print(f"retry storm ({how}):", results[f"retry_storm_{how}"], flush=True)
        finally:
            server.stop()
    results["run_s"] = round(time.monotonic() - started, 1)
    results["loadavg_1m_at_end"] = os.getloadavg()[0]
    print()
    print(abuse_table(results["abuse"]))
    print(f"\nwhole run {results['run_s']} s")
    print("saved", save("load", results))


if __name__ == "__main__":
    main()
