"""Cost as the work grows (issue 23, goals 2, 4 and 5).

    python -m benchmarks.bench_scale [--quick | --tiny] [--only startup,bytes,resume,ranks,jobstart]
                                     [--worlds 1,64,256] [--bpm N] [--out NAME]

* ``startup``: building the datasets (``server.app.build_datasets``, in this process) on 1k, 10k
  and 100k small JSONL files (``--quick``: 1k, 10k), next to a bare listing of the same files
  (``glob`` of the same pattern); cold (no content-digest cache) and warm (the digests cached from
  the previous start, as on a restart), alternating; then a server process: start-up until it
  listens, time to first batch, and its resident memory (RSS) against the number of shards.
* ``bytes``: the same against corpus bytes (64 files of growing size).
* ``resume``: time to first batch after ``load_state_dict`` at 1% and at 99% of an epoch of one
  shard a file (100k shards; ``--quick``: 10k), on a restarted server.
* ``ranks``: W ranks of one job (threads in 4 client processes) on one server at default settings,
  W = 1, 64, 256 (alternating, repeated): aggregate tokens/s against one stream, the p99 gap between
  a rank's batches, the CPU of the clients and of the server in the window, and the server's RSS
  with W streams open (memory per open stream); ``--bpm`` sets the batches per message.
* ``jobstart``: a job of W ranks (64 to 1,024) against 4 replicas on this machine: the time until
  every rank holds its first batch, on fresh servers (cold) and again (warm).

Corpora are generated under ``$TMPDIR/tokenfeed-scale`` (kept between runs; ``--fresh`` rebuilds).
Saves ``benchmarks/results/scale.json`` and, with matplotlib (``pip install 'tokenfeed[plot]'``),
``scale.png``. Medians of the repeats; the machine's load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, ServerProcess
from benchmarks.common import RESULTS, save
from server.app import build_datasets
from server.config import Config

SCALES: dict[str, dict[str, Any]] = {
    "full": {"files": [1000, 10000, 100000], "mib": [1, 16, 128], "resume_files": 100000, "ranks": [1, 64, 256],
             "jobs": [64, 256, 1024], "repeats": 3, "seconds": 5.0},
    "quick": {"files": [1000, 10000], "mib": [1, 16, 64], "resume_files": 10000, "ranks": [1, 64, 256],
              "jobs": [64, 256, 1024], "repeats": 2, "seconds": 3.0},
    "tiny": {"files": [50, 200], "mib": [1], "resume_files": 200, "ranks": [1, 4], "jobs": [4, 8], "repeats": 1,
             "seconds": 1.0},
}
SEQ, BATCH = 1024, 4  # the ranks' and jobs' batches: 4 x 1024 tokens
DOC = "tokens stream from a data server to many ranks; " * 4  # ~200 bytes a file


# ---- corpora ---------------------------------------------------------------------------------------
def many_files(base: Path, n: int, fresh: bool = False) -> Path:
    """``n`` JSONL files of one ~220-byte document each, 1,000 a directory."""
    root = base / f"files-{n}"
    if fresh and root.exists():
        shutil.rmtree(root)
    if not (root / "done").exists():
        for i in range(n):
            sub = root / f"d{i // 1000:04d}"
            if i % 1000 == 0:
                sub.mkdir(parents=True, exist_ok=True)
            (sub / f"f{i:07d}.jsonl").write_text(json.dumps({"text": f"file {i}: {DOC}"}) + "\n")
        (root / "done").write_text("")
    return root


def big_files(base: Path, mib: int, files: int = 64, fresh: bool = False) -> Path:
    """``files`` JSONL files of ``mib`` MiB together (documents of mixed lengths)."""
    root = base / f"bytes-{mib}"
    if fresh and root.exists():
        shutil.rmtree(root)
    if not (root / "done").exists():
        (root / "d").mkdir(parents=True, exist_ok=True)
        per_file = (mib << 20) // files
        for f in range(files):
            lines, size, i = [], 0, 0
            while size < per_file:
                line = json.dumps({"text": f"{f}.{i} " + DOC * (1 + (i * 7919 + f) % 40)}) + "\n"
                lines.append(line)
                size, i = size + len(line), i + 1
            (root / "d" / f"part-{f:03d}.jsonl").write_text("".join(lines))
        (root / "done").write_text("")
    return root


def pattern(root: Path) -> str:
    return str(root / "**" / "*.jsonl")


def config_of(root: Path, **server: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"datasets": {"docs": {
        "source": {"type": "jsonl", "paths": [pattern(root)], "text_field": "text"}, "tokenizer": {"type": "byte"}}}}
    if server:
        config["server"] = server
    return config


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ---- goal 4: start-up against files and bytes ----------------------------------------------------
def time_build(root: Path, cache_dir: str) -> tuple[float, float]:
    """Seconds (wall, and this process's CPU) to build the dataset of ``root`` with digests cached
    in ``cache_dir``."""
    os.environ["TOKENFEED_IDENTITY_CACHE"] = cache_dir
    config = Config.model_validate(config_of(root))
    t0, c0 = time.perf_counter(), time.process_time()
    build_datasets(config)
    return time.perf_counter() - t0, time.process_time() - c0


def time_listing(root: Path) -> tuple[float, float]:
    """Seconds (wall, CPU) of a bare listing of ``root``'s files (``glob``, nothing stat'ed)."""
    t0, c0 = time.perf_counter(), time.process_time()
    glob.glob(pattern(root), recursive=True)
    return time.perf_counter() - t0, time.process_time() - c0


def server_start(root: Path, work: Path, cache_dir: str) -> dict[str, float]:
    """A server process on ``root``: seconds until it listens, until a client holds its first
    batch, and its RSS then."""
    from client import StreamingDataset
    t0 = time.perf_counter()
    server = ServerProcess(config_of(root), work, env={"TOKENFEED_IDENTITY_CACHE": cache_dir}).start(timeout=600)
    try:
        listening = time.perf_counter() - t0
        ds = StreamingDataset(server.address, "docs", SEQ, BATCH)
        next(iter(ds))
        first = time.perf_counter() - t0
        ds.close()
        return {"listening_s": listening, "first_batch_s": first, "rss_mib": rss_kib(server.proc.pid) / 1024}
    finally:
        server.stop()


def startup(roots: dict[str, Path], work: Path, repeats: int) -> dict[str, Any]:
    """Cold and warm builds alternating, next to the listing (three warm builds, each followed by
    a listing, after each cold one); one cold and one warm server start. Wall and CPU time: on the
    shared machine the CPU ratio is the steadier one."""
    out: dict[str, Any] = {}
    for key, root in roots.items():
        files = len(glob.glob(pattern(root), recursive=True))
        listing, cold, warm = [], [], []
        for _ in range(repeats):
            listing.append(time_listing(root))
            cache = tempfile.mkdtemp(dir=work, prefix="digests-")
            cold.append(time_build(root, cache))  # no digest cached: every file read
            for _ in range(3):
                warm.append(time_build(root, cache))  # a restart: digests from the cache
                listing.append(time_listing(root))
        cache = tempfile.mkdtemp(dir=work, prefix="digests-")
        proc_cold = server_start(root, work, cache)
        proc_warm = server_start(root, work, cache)
        row = {"files": files, "bytes": sum(os.path.getsize(p) for p in glob.glob(pattern(root), recursive=True)),
               "listing_s": median([w for w, _ in listing]), "build_cold_s": median([w for w, _ in cold]),
               "build_warm_s": median([w for w, _ in warm]), "listing_cpu_s": median([c for _, c in listing]),
               "build_warm_cpu_s": median([c for _, c in warm]),
               "build_runs": {"cold": [w for w, _ in cold], "warm": [w for w, _ in warm],
                              "warm_cpu": [c for _, c in warm], "listing": [w for w, _ in listing],
                              "listing_cpu": [c for _, c in listing]},
               "process_cold": proc_cold, "process_warm": proc_warm}
        row["warm_over_listing"] = row["build_warm_s"] / row["listing_s"]
        row["warm_over_listing_cpu"] = row["build_warm_cpu_s"] / max(row["listing_cpu_s"], 1e-9)
        row["warm_us_per_file"] = row["build_warm_s"] / files * 1e6
        out[key] = row
        print(f"{key}: {files} files, listing {row['listing_s'] * 1e3:.1f} ms; dataset build cold "
              f"{row['build_cold_s'] * 1e3:.0f} ms, warm {row['build_warm_s'] * 1e3:.0f} ms "
              f"({row['warm_over_listing']:.1f}x listing, {row['warm_us_per_file']:.1f} us/file; CPU "
              f"{row['warm_over_listing_cpu']:.1f}x); server warm: listening {proc_warm['listening_s']:.2f} s, "
              f"first batch {proc_warm['first_batch_s']:.2f} s, RSS {proc_warm['rss_mib']:.0f} MiB", flush=True)
    return out


def per_shard_memory(rows: dict[str, Any]) -> float | None:
    """KiB of server RSS per shard: the slope between the smallest and the largest corpus."""
    pts = sorted((r["files"], r["process_warm"]["rss_mib"]) for r in rows.values())
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return None
    return (pts[-1][1] - pts[0][1]) * 1024 / (pts[-1][0] - pts[0][0])


# ---- resume at the end of a long epoch -----------------------------------------------------------
def resume(root: Path, work: Path, repeats: int) -> dict[str, Any]:
    """States at 1% and 99% of an epoch of one shard a file; first batch after loading each on a
    restarted server (digests cached), alternating."""
    from client import StreamingDataset
    cache = tempfile.mkdtemp(dir=work, prefix="digests-")
    env = {"TOKENFEED_IDENTITY_CACHE": cache}
    big = 64  # rows a batch while collecting the states: fewer messages
    with_server = ServerProcess(config_of(root), work, env=env).start(timeout=600)
    try:
        ds = StreamingDataset(with_server.address, "docs", SEQ, big)
        t0 = time.perf_counter()
        it = iter(ds)
        states = []
        while ds.state_dict()["position"]["epoch"] == 0:
            next(it)
            states.append(ds.state_dict())
        epoch_s = time.perf_counter() - t0
        it.close()  # ends the stream (and its reading thread) before the server goes
        shards = ds.describe().num_shards
        ds.close()
    finally:
        with_server.stop()
    at = {"0.01": states[max(0, len(states) // 100 - 1)], "0.99": states[max(0, len(states) * 99 // 100 - 1)]}
    times: dict[str, list[float]] = {k: [] for k in at}
    for _ in range(repeats):
        for key, state in at.items():
            server = ServerProcess(config_of(root), work, env=env).start(timeout=600)
            try:
                ds = StreamingDataset(server.address, "docs", SEQ, big)
                t0 = time.perf_counter()
                ds.load_state_dict(state)
                next(iter(ds))
                times[key].append(time.perf_counter() - t0)
                ds.close()
            finally:
                server.stop()
    out = {"shards": shards, "epoch_batches": len(states), "first_epoch_s": epoch_s,
           "first_batch_after_load_s": {k: median(v) for k, v in times.items()}, "runs": times}
    out["ratio_99_over_01"] = out["first_batch_after_load_s"]["0.99"] / out["first_batch_after_load_s"]["0.01"]
    print(f"resume on {shards} shards: first batch after load at 1% {out['first_batch_after_load_s']['0.01'] * 1e3:.0f}"
          f" ms, at 99% {out['first_batch_after_load_s']['0.99'] * 1e3:.0f} ms (ratio {out['ratio_99_over_01']:.2f})",
          flush=True)
    return out


# ---- goals 2 and 5: many ranks, job start -------------------------------------------------------
def client_main(args: argparse.Namespace) -> None:
    """A client process: ranks ``args.ranks`` of a ``args.world``-rank job, a thread each, datasets
    built before the clock. Reads ``START <t>``: each rank takes its first batch (seconds from ``t``
    recorded), then ``READY`` is printed; reads ``GO <start> <end>`` (wall-clock): batches before
    ``start`` drain what idle streams buffered, the gaps between batches in the window are
    recorded. Prints one JSON line."""
    from client import StreamingDataset
    addresses = args.addresses.split(",")
    bpm = args.bpm or None  # 0: the client's default
    datasets = {r: StreamingDataset(addresses, "docs", SEQ, BATCH, rank=r, world_size=args.world,
                                    batches_per_message=bpm) for r in args.ranks}
    first: dict[int, float] = {}
    gaps: dict[int, list[float]] = {}
    errors: list[str] = []
    started, go = threading.Event(), threading.Event()
    times: list[float] = []
    done = threading.Semaphore(0)

    def run(rank: int) -> None:
        try:
            it = iter(datasets[rank])
            started.wait()
            time.sleep(max(0.0, times[0] - time.time()))  # every process's ranks ask at the same moment
            next(it)
            first[rank] = time.time() - times[0]
        except Exception as err:  # noqa: BLE001 - reported to the orchestrator
            errors.append(f"rank {rank}: {type(err).__name__}: {err}")
            return
        finally:
            done.release()
        go.wait()
        if len(times) < 3:
            return
        while time.time() < times[1]:
            next(it)
        last, mine = time.perf_counter(), []
        while time.time() < times[2]:
            next(it)
            now = time.perf_counter()
            mine.append(now - last)
            last = now
        gaps[rank] = mine

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in args.ranks]
    for t in threads:
        t.start()
    print("BUILT", flush=True)
    word, t0 = sys.stdin.readline().split()
    times.append(float(t0))
    started.set()
    for _ in threads:
        done.acquire()
    print("READY", flush=True)
    line = sys.stdin.readline().split()
    times.extend(float(x) for x in line[1:])
    go.set()
    cpu = 0.0
    if len(times) == 3:  # this process's CPU seconds inside the window
        time.sleep(max(0.0, times[1] - time.time()))
        c0 = time.process_time()
        time.sleep(max(0.0, times[2] - time.time()))
        cpu = time.process_time() - c0
    for t in threads:
        t.join(300)
    print(json.dumps({"first_s": first, "gaps_s": gaps, "errors": errors[:5], "cpu_s": cpu}), flush=True)
    for ds in datasets.values():
        ds.close()


class Job:
    """A job of ``world`` ranks in ``procs`` client processes (rank r in process r % procs)."""

    def __init__(self, addresses: list[str], world: int, procs: int, bpm: int = 0) -> None:
        self.world, self.procs = world, min(procs, world)
        self.running = []
        for p in range(self.procs):
            cmd = [sys.executable, "-m", "benchmarks.bench_scale", "client", "--addresses", ",".join(addresses),
                   "--world", str(world), "--bpm", str(bpm), "--ranks", *[str(r) for r in range(p, world, self.procs)]]
            self.running.append(subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                 stderr=subprocess.DEVNULL, text=True))
        self._wait_for("BUILT")

    def _wait_for(self, word: str) -> None:
        for p in self.running:
            while (line := p.stdout.readline()) and line.strip() != word:
                pass

    def _send(self, line: str) -> None:
        for p in self.running:
            try:
                p.stdin.write(line + "\n")
                p.stdin.flush()
            except BrokenPipeError:
                pass  # that process failed: its missing result says so

    def start(self) -> float:
        """Every rank asks for its first batch at once; seconds until the last one has it and its
        process said so (``measure`` has each rank's own time)."""
        t0 = time.time() + 0.5
        self._send(f"START {t0}")
        self._wait_for("READY")
        return time.time() - t0

    def measure(self, seconds: float, settle: float = 1.0, server_pid: int | None = None) -> dict[str, Any]:
        start = time.time() + settle
        self._send(f"GO {start} {start + seconds}" if seconds > 0 else "GO")
        server_cpu = None
        if server_pid is not None and seconds > 0:
            time.sleep(max(0.0, start - time.time()))
            c0 = cpu_s(server_pid)
            time.sleep(max(0.0, start + seconds - time.time()))
            server_cpu = cpu_s(server_pid) - c0
        results = []
        for p in self.running:
            out, _ = p.communicate(timeout=600)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            results.append(json.loads(lines[-1]) if lines else {"first_s": {}, "gaps_s": {}, "errors": ["no result"]})
        first = [v for r in results for v in r["first_s"].values()]
        gaps = sorted(g for r in results for v in r["gaps_s"].values() for g in v)
        batches = len(gaps)
        out: dict[str, Any] = {"ranks": self.world, "processes": self.procs,
                               "ranks_with_first_batch": len(first),
                               "all_first_batch_s": max(first) if len(first) == self.world else None,
                               "first_batch_p50_s": median(first),
                               "errors": [e for r in results for e in r["errors"]][:5]}
        if seconds > 0:
            out.update({"tokens_per_s": batches * BATCH * SEQ / seconds, "batches": batches,
                        "client_cpu_per_s": sum(r.get("cpu_s", 0.0) for r in results) / seconds,
                        "server_cpu_per_s": server_cpu / seconds if server_cpu is not None else None,
                        "gap_p50_ms": gaps[len(gaps) // 2] * 1e3 if gaps else None,
                        "gap_p99_ms": gaps[int(0.99 * (len(gaps) - 1))] * 1e3 if gaps else None,
                        "gap_max_ms": gaps[-1] * 1e3 if gaps else None})
        return out


def ranks(root: Path, work: Path, worlds: list[int], repeats: int, seconds: float, bpm: int = 0,
          procs: int = 4) -> dict[str, Any]:
    """Goal 2: W ranks on one server (default settings), alternating W, repeated; the server's RSS
    with the W streams open (each has had its first batch) gives the memory per open stream. The
    ranks run in ``procs`` client processes (each one's start costs ~3 CPU-s of imports)."""
    server = ServerProcess(config_of(root), work).start(timeout=600)
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in worlds}
    try:
        warm = Job([server.address], 1, 1)  # one epoch's shards tokenized and cached before measuring
        warm.start()
        warm.measure(seconds)
        idle = rss_kib(server.proc.pid)
        for _ in range(repeats):
            for w in worlds:
                before = rss_kib(server.proc.pid)  # the allocator keeps what earlier jobs freed
                job = Job([server.address], w, procs, bpm)
                job.start()
                held = rss_kib(server.proc.pid)
                r = job.measure(seconds, server_pid=server.proc.pid)
                r["rss_open_kib"], r["rss_before_kib"], r["rss_idle_kib"] = held, before, idle
                runs[w].append(r)
                print(f"ranks {w}: {r.get('tokens_per_s', 0) / 1e6:.1f} M tokens/s, CPU cores busy: clients "
                      f"{r['client_cpu_per_s']:.2f}, server {r['server_cpu_per_s']:.2f}; gap p99 "
                      f"{r.get('gap_p99_ms') or 0:.1f} ms, RSS with streams open {held / 1024:.0f} MiB "
                      f"(before {before / 1024:.0f}), errors {r['errors']}", flush=True)
    finally:
        server.stop()
    out: dict[str, Any] = {"seq_len": SEQ, "batch_size": BATCH, "seconds": seconds,
                           "batches_per_message": bpm or "client default", "by_ranks": {}}
    one = median([r["tokens_per_s"] for r in runs[worlds[0]]])
    for w, rs in runs.items():
        row = {k: median([r[k] for r in rs if r.get(k) is not None]) for k in
               ("tokens_per_s", "gap_p50_ms", "gap_p99_ms", "gap_max_ms", "rss_open_kib", "client_cpu_per_s",
                "server_cpu_per_s")}
        row["over_one_stream"] = row["tokens_per_s"] / one
        # each repeat against the one stream measured just before it: the machine's speed drifts
        # by up to 1.6x over a run (one stream 105-173 M tokens/s in one run), the pair far less
        row["over_one_stream_paired"] = median([r["tokens_per_s"] / o["tokens_per_s"]
                                                for r, o in zip(rs, runs[worlds[0]])])
        row["rss_per_stream_kib"] = median([(r["rss_open_kib"] - r["rss_before_kib"]) / w for r in rs])
        row["errors"] = [e for r in rs for e in r["errors"]][:3]
        row["runs"] = rs
        out["by_ranks"][str(w)] = row
        print(f"ranks {w}: {row['tokens_per_s'] / 1e6:.1f} M tokens/s (medians), {row['over_one_stream']:.2f}x one "
              f"stream, {row['over_one_stream_paired']:.2f}x paired repeat by repeat; gap p99 {row['gap_p99_ms']:.1f} "
              f"ms", flush=True)
    return out


def jobstart(root: Path, work: Path, worlds: list[int], replicas: int = 4, repeats: int = 1,
             procs: int = 4) -> dict[str, Any]:
    """Goal 5: a job of W ranks against ``replicas`` servers: cold (fresh servers, empty caches,
    digests cached) and warm (the same servers again). The sizes alternate, ``repeats`` times;
    each figure is the median of its repeats (a single start swings by 2x on a shared machine).
    The ranks run in at least ``procs`` client processes, one more for every 128 ranks."""
    cache = tempfile.mkdtemp(dir=work, prefix="digests-")
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {w: {"cold": [], "warm": []} for w in worlds}
    for _ in range(repeats):
        for w in worlds:
            servers = [ServerProcess(config_of(root), work, env={"TOKENFEED_IDENTITY_CACHE": cache}).start(timeout=600)
                       for _ in range(replicas)]
            try:
                for kind in ("cold", "warm"):
                    job = Job([s.address for s in servers], w, max(procs, w // 128))
                    wall = job.start()
                    r = {**job.measure(0), "ready_s": wall, "rss_mib": [round(rss_kib(s.proc.pid) / 1024)
                                                                         for s in servers]}
                    runs[w][kind].append(r)
            finally:
                for s in servers:
                    s.stop()
            cold, warm = runs[w]["cold"][-1], runs[w]["warm"][-1]
            print(f"job start, {w} ranks on {replicas} replicas: every rank holds its first batch after "
                  f"{cold['all_first_batch_s'] or float('nan'):.2f} s cold, "
                  f"{warm['all_first_batch_s'] or float('nan'):.2f} s warm "
                  f"(errors {cold['errors'] + warm['errors']})", flush=True)
    out: dict[str, Any] = {"replicas": replicas, "repeats": repeats, "by_ranks": {}}
    for w in worlds:
        row: dict[str, Any] = {}
        for kind, rs in runs[w].items():
            done = [r["all_first_batch_s"] for r in rs if r["all_first_batch_s"] is not None]
            row[kind] = {"all_first_batch_s": median(done) if len(done) == len(rs) else None,
                         "first_batch_p50_s": median([r["first_batch_p50_s"] for r in rs]),
                         "errors": [e for r in rs for e in r["errors"]][:5], "runs": rs}
        out["by_ranks"][str(w)] = row
    keys = sorted(out["by_ranks"], key=int)
    if len(keys) > 1:
        lo, hi = out["by_ranks"][keys[0]], out["by_ranks"][keys[-1]]
        out["growth"] = {"ranks": int(keys[-1]) / int(keys[0]),
                         **{k: (hi[k]["all_first_batch_s"] or float("nan")) / lo[k]["all_first_batch_s"]
                            for k in ("cold", "warm") if lo[k]["all_first_batch_s"]}}
        print("job start growth from", keys[0], "to", keys[-1], "ranks:",
              ", ".join(f"{k} {v:.1f}x" for k, v in out["growth"].items()), flush=True)
    return out


# ---- the plot and main ---------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'tokenfeed[plot]'): no plot")
        return None
    shown = [k for k in ("startup", "bytes", "ranks", "jobstart") if k in result]
    if not shown:
        return None
    fig, row = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4.5), squeeze=False)
    axes = {i: row[0][shown.index(k)] for i, k in enumerate(("startup", "bytes", "ranks", "jobstart")) if k in shown}
    if "startup" in result:
        rows = sorted(result["startup"].values(), key=lambda r: r["files"])
        x = [r["files"] for r in rows]
        for key, label in (("listing_s", "listing (glob)"), ("build_warm_s", "dataset build, digests cached"),
                           ("build_cold_s", "dataset build, cold")):
            axes[0].plot(x, [r[key] for r in rows], marker="o", label=label)
        axes[0].plot(x, [r["process_warm"]["first_batch_s"] for r in rows], marker="s",
                     label="server start to first batch (warm)")
        axes[0].set(xscale="log", yscale="log", xlabel="files (one shard each)", ylabel="seconds",
                    title="start-up against files")
        axes[0].legend(fontsize=7)
    if "bytes" in result:
        rows = sorted(result["bytes"].values(), key=lambda r: r["bytes"])
        x = [r["bytes"] / 2**20 for r in rows]
        axes[1].plot(x, [r["build_cold_s"] for r in rows], marker="o", label="build, cold")
        axes[1].plot(x, [r["build_warm_s"] for r in rows], marker="o", label="build, digests cached")
        axes[1].plot(x, [r["process_warm"]["first_batch_s"] for r in rows], marker="s", label="server to first batch")
        axes[1].set(xscale="log", xlabel="corpus MiB (64 files)", ylabel="seconds", title="start-up against bytes")
        axes[1].legend(fontsize=7)
    if "ranks" in result:
        rows = result["ranks"]["by_ranks"]
        x = [int(k) for k in rows]
        axes[2].plot(x, [rows[k]["rss_open_kib"] / 1024 for k in rows], marker="o", label="server RSS, MiB")
        ax2 = axes[2].twinx()
        ax2.plot(x, [rows[k]["over_one_stream"] for k in rows], marker="s", color="C1", label="x one stream")
        axes[2].set(xscale="log", xlabel="open streams (ranks of one job)", title="memory and throughput vs streams")
        axes[2].legend(loc="upper left", fontsize=7)
        ax2.legend(loc="lower right", fontsize=7)
    if "jobstart" in result:
        rows = result["jobstart"]["by_ranks"]
        x = [int(k) for k in rows]
        for kind in ("cold", "warm"):
            axes[3].plot(x, [rows[k][kind]["all_first_batch_s"] for k in rows], marker="o", label=kind)
        axes[3].plot(x, [rows[str(x[0])]["cold"]["all_first_batch_s"] * w / x[0] for w in x], ls=":", color="grey",
                     label="linear from the smallest (cold)")
        axes[3].set(xscale="log", yscale="log", xlabel="ranks (4 replicas)", ylabel="seconds",
                    title="job start: every rank holds a batch")
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "client"])
    parser.add_argument("--quick", action="store_true", help="1k and 10k files, 10k-shard resume, fewer repeats")
    parser.add_argument("--tiny", action="store_true", help="a smoke test of every part (seconds)")
    parser.add_argument("--only", default="startup,bytes,resume,ranks,jobstart")
    parser.add_argument("--fresh", action="store_true", help="regenerate the corpora")
    parser.add_argument("--corpora", default=os.path.join(tempfile.gettempdir(), "tokenfeed-scale"))
    parser.add_argument("--out", default="scale", help="results/<out>.json and .png")
    parser.add_argument("--addresses", default="")
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--ranks", type=int, nargs="+", default=[0])
    parser.add_argument("--ranks-mib", type=int, default=0,
                        help="ranks: the corpus, MiB in 64 files (default 16, 1 with --tiny; 1: shards of ~16 rows, "
                             "each rank's batch in another shard; the figures before this round used 1)")
    parser.add_argument("--bpm", type=int, default=0, help="ranks: batches per message (0: the client's default)")
    parser.add_argument("--worlds", default="",
                        help="ranks and jobstart: the job sizes, e.g. 1,64 (default: the scale's)")
    args = parser.parse_args()
    if args.command == "client":
        client_main(args)
        return
    scale = SCALES["tiny" if args.tiny else "quick" if args.quick else "full"]
    parts = set(args.only.split(","))
    base = Path(args.corpora)
    base.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"scale": "tiny" if args.tiny else "quick" if args.quick else "full",
                              "loadavg_1m_at_start": os.getloadavg()[0]}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "startup" in parts:
            roots = {f"files={n}": many_files(base, n, args.fresh) for n in scale["files"]}
            result["startup"] = startup(roots, work, scale["repeats"])
            result["memory_per_shard_kib"] = per_shard_memory(result["startup"])
        if "bytes" in parts:
            roots = {f"mib={m}": big_files(base, m, fresh=args.fresh) for m in scale["mib"]}
            result["bytes"] = startup(roots, work, scale["repeats"])
        if "resume" in parts:
            result["resume"] = resume(many_files(base, scale["resume_files"], args.fresh), work, scale["repeats"])
        if "ranks" in parts:
            worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else scale["ranks"]
            mib = args.ranks_mib or (1 if args.tiny else 16)
            result["ranks"] = ranks(big_files(base, mib), work, worlds, scale["repeats"],
                                    scale["seconds"], args.bpm)
            result["ranks"]["corpus_mib"] = mib
        if "jobstart" in parts:
            jobs = [int(w) for w in args.worlds.split(",")] if args.worlds else scale["jobs"]
            result["jobstart"] = jobstart(big_files(base, scale["mib"][0]), work, jobs, repeats=scale["repeats"])
    result["run_s"] = time.monotonic() - started
    result["loadavg_1m_at_end"] = os.getloadavg()[0]
    print(f"whole run {result['run_s']:.0f} s, load average {result['loadavg_1m_at_start']:.1f} at the start, "
          f"{result['loadavg_1m_at_end']:.1f} at the end (2 cores, shared)")
    print("saved", save(args.out, result))
    png = plot(result, RESULTS / f"{args.out}.png")
    if png:
        print("saved", png)


if __name__ == "__main__":
    main()
