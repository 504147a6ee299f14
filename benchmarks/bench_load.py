"""Load and fault scenarios (issue 8): many concurrent streams, streams opened and abandoned, a slow
consumer, a server restarted under many clients. Each scenario returns its figures; the tests
(tests/test_load.py) run them briefly and assert, this script runs them longer and saves JSON.

    python -m benchmarks.bench_load [--streams 64] [--seconds 30] [--abandon 1000] [--slow-s 180]
                                    [--clients 32]

Loopback only. Server memory is read from /proc/PID/status (VmRSS), descriptors from /proc/PID/fd,
event-loop tasks and admitted streams from the server's /metrics. Saves results/load.json.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import os
import random
import re
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
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import percentiles, save
from client import StreamingDataset
from tests.conftest import ServerProcess, jsonl_config, make_documents, write_jsonl
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


def metrics(server: ServerProcess) -> dict[str, float]:
    """The server's /metrics, each series summed over its labels."""
    port = next(m.group(1) for line in reversed(server.lines)  # the latest start's port
                if (m := re.search(r"serving http://\S+?:(\d+)/metrics", line)))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def snapshot(server: ServerProcess) -> dict[str, float]:
    """Memory, descriptors, tasks and streams of the server process now."""
    m = metrics(server)
    return {"rss_kib": rss_kib(server.proc.pid), "fds": fd_count(server.proc.pid),
            "loop_tasks": m.get("tokenfeed_event_loop_tasks", -1), "admitted": m.get("tokenfeed_admitted_streams", -1),
            "active": m.get("tokenfeed_active_streams", -1), "prefetch_queue": m.get("tokenfeed_prefetch_queue_depth", -1),
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


def quiet(server: ServerProcess, baseline: dict[str, float]) -> Callable[[], bool]:
    """No stream left open, no prefetch or load running, and no more tasks or descriptors than at
    ``baseline`` (a closing connection holds its descriptor for a moment: wait for it; a leaked one
    never goes, and the caller compares after the wait times out)."""
    def check() -> bool:
        s = snapshot(server)
        return s["admitted"] == 0 and s["active"] == 0 and s["prefetch_queue"] == 0 and s["inflight_loads"] == 0 \
            and s["loop_tasks"] <= baseline["loop_tasks"] and s["fds"] <= baseline.get("fds", s["fds"])
    return check


def abandoned_streams(server: ServerProcess, n: int = 200, concurrent: int = 50) -> dict[str, Any]:
    """Open ``n`` streams (``concurrent`` at a time), read 0-3 messages from each and cancel it;
    compare descriptors, memory and event-loop tasks of the server before and after."""
    _abandon(server.address, 40, concurrent, seed=1)  # warm: caches, pools, metrics series
    wait_until(lambda: snapshot(server)["admitted"] == 0)
    before = snapshot(server)
    wait_until(quiet(server, before))
    before = snapshot(server)
    t0 = time.perf_counter()
    codes = _abandon(server.address, n, concurrent, seed=2)
    elapsed = time.perf_counter() - t0
    settled = wait_until(quiet(server, before), timeout=20)
    after = snapshot(server)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--abandon", type=int, default=1000)
    parser.add_argument("--slow-s", type=float, default=180.0)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, Any] = {"seq_len": SEQ, "batch_size": BATCH}
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(Path(tmp), docs=2000)
        server = ServerProcess(config, Path(tmp)).start()
        try:
            results["concurrent"] = concurrent_streams(server, args.streams, args.seconds)
            print("concurrent:", results["concurrent"])
            results["abandoned"] = abandoned_streams(server, args.abandon, concurrent=100)
            print("abandoned:", results["abandoned"])
            results["slow_consumer"] = slow_consumer(server, args.slow_s)
            print("slow consumer:", results["slow_consumer"])
            for how in ("kill", "term"):
                results[f"retry_storm_{how}"] = retry_storm(server, args.clients, how=how)
                print(f"retry storm ({how}):", results[f"retry_storm_{how}"])
        finally:
            server.stop()
    print("saved", save("load", results))


if __name__ == "__main__":
    main()
