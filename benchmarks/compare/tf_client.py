"""tokenfeed as a trainer process sees it (runs in ``.venv``, one fresh interpreter per call, as a
client of a server the orchestrator started; only this process tree's CPU is the trainer's).

    python -m benchmarks.compare.tf_client COMMAND --address HOST:PORT [options]

Commands: ``warm`` (stream one epoch; batches per epoch), ``throughput``, ``resume-states`` (the
states at fractions of an epoch and digests of the batch after each), ``resume``, ``many`` (some
of the streams of the many-clients question, in threads), ``stall``, ``rawtext``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.compare.procstat import emit, measure
from client import StreamingDataLoader, StreamingDataset

SEQ, BATCH = 2048, 8


def dataset(args: argparse.Namespace, **kw: Any) -> StreamingDataset:
    if args.decode_ahead is not None:
        kw.setdefault("decode_ahead", args.decode_ahead)
    if args.shared_memory is not None:
        kw.setdefault("shared_memory", args.shared_memory == "on")
    if args.fields:
        kw.setdefault("fields", args.fields.split(","))
    if args.compression:
        kw.setdefault("compression", args.compression)
    if args.bpm:  # 0: the client chooses
        kw.setdefault("batches_per_message", args.bpm)
    return StreamingDataset(args.address, args.dataset, seq_len=SEQ, batch_size=BATCH, **kw)


def loader(ds: StreamingDataset, workers: int) -> Any:
    return StreamingDataLoader(ds, num_workers=workers) if workers else ds


def tokens_of(batch: dict[str, torch.Tensor]) -> int:
    if "input_ids" in batch:
        ids = batch["input_ids"].to(torch.int64)  # already int64: a no-op, as for the peers
        return ids.shape[0] * ids.shape[1]
    rows = batch["tokens"].to(torch.int64)  # fields=tokens: the peers' [8, 2049] tensor
    return rows.shape[0] * (rows.shape[1] - 1)


def digest(batch: dict[str, torch.Tensor]) -> str:
    ids = batch["input_ids"] if "input_ids" in batch else batch["tokens"][:, :-1].contiguous()
    return hashlib.blake2b(ids.numpy().tobytes(), digest_size=8).hexdigest()


def epoch_of(ds: StreamingDataset) -> int:
    return int(ds.state_dict()["position"]["epoch"])


def cmd_warm(args: argparse.Namespace) -> dict:
    """Stream epoch 0 once (every shard loaded and cached); count its batches."""
    ds = dataset(args)
    t0, n = time.perf_counter(), 0
    for _ in ds:
        n += 1
        if epoch_of(ds) > 0:
            break
    return {"batches_per_epoch": n, "seconds": time.perf_counter() - t0}


def cmd_throughput(args: argparse.Namespace) -> dict:
    runs = []
    for _ in range(args.repeats):
        ds = dataset(args)
        it: Iterator[Any] = iter(loader(ds, args.workers))
        runs.append(measure(it, tokens_of, warmup=args.warmup, seconds=args.seconds, server=args.server_pid).as_dict())
        runs[-1]["batches_per_message"] = ds.batches_per_message  # what the client chose, for --bpm 0
        del it
    med = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "cpu_s_per_m_tokens")}
    server = [r["server_cpu_s_per_m_tokens"] for r in runs if r["server_cpu_s_per_m_tokens"] is not None]
    return {"loader": "tokenfeed", "workers": args.workers, "batches_per_message": args.bpm,
            "compression": args.compression or "none", **med,
            "server_cpu_s_per_m_tokens": statistics.median(server) if server else None, "runs": runs}


def cmd_resume_states(args: argparse.Namespace) -> dict:
    """For each fraction f: the state after ``k = f * batches_per_epoch`` batches, and the digest of
    batch ``k`` of the uninterrupted stream (what a resumed stream must yield first)."""
    targets = {int(f * args.batches_per_epoch): f for f in args.fractions}
    ds, states = dataset(args), {}
    for k, batch in enumerate(ds):
        if k in targets:
            states[str(targets[k])]["digest"] = digest(batch)
        if k + 1 in targets:
            states[str(targets[k + 1])] = {"batch": k + 1, "state": ds.state_dict()}
        if k >= max(targets):
            break
    Path(args.out).write_text(json.dumps(states))
    return {"states": {f: s["batch"] for f, s in states.items()}}


def cmd_resume(args: argparse.Namespace) -> dict:
    """Seconds from ``load_state_dict`` to the first batch (the dataset is built before the clock)."""
    entry = json.loads(Path(args.states).read_text())[str(args.fraction)]
    ds = dataset(args)
    t0 = time.perf_counter()
    ds.load_state_dict(entry["state"])
    first = next(iter(ds))
    seconds = time.perf_counter() - t0
    return {"loader": "tokenfeed", "fraction": args.fraction, "batch": entry["batch"], "seconds": seconds,
            "exact": digest(first) == entry["digest"]}


def cmd_many(args: argparse.Namespace) -> dict:
    """Ranks ``args.ranks`` of a ``args.world``-rank job, one thread each. A barrier with the
    orchestrator: once every stream has its first batch this prints ``READY`` and reads
    ``GO <start> <end>`` (wall-clock times shared by all processes); batches before ``start`` drain
    what the idle streams buffered and are not counted."""
    results: dict[int, dict] = {}
    errors: list[BaseException] = []
    ready = threading.Semaphore(0)
    go = threading.Event()
    window: list[float] = []

    def run(rank: int) -> None:
        try:
            it = iter(dataset(args, rank=rank, world_size=args.world))
            next(it)  # connected and streaming before the window opens
        except Exception as err:  # noqa: BLE001 - re-raised by the main thread: the run fails
            errors.append(err)
            return
        finally:
            ready.release()
        go.wait()
        start, end = window
        while time.time() < start:
            next(it)
        last, n, gaps = time.perf_counter(), 0, []
        while time.time() < end:
            next(it)
            now = time.perf_counter()
            gaps.append(round((now - last) * 1e3, 4))
            last, n = now, n + 1
        results[rank] = {"batches": n, "gaps_ms": gaps}

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in args.ranks]
    for t in threads:
        t.start()
    for _ in threads:
        ready.acquire()
    if errors:
        raise errors[0]
    print("READY", flush=True)
    word, start, end = sys.stdin.readline().split()
    assert word == "GO", word
    window.extend([float(start), float(end)])
    go.set()
    for t in threads:
        t.join()
    return {"streams": results}


def cmd_stall(args: argparse.Namespace) -> dict:
    """A training step of ``step_ms`` of sleep per batch; the share of wall time spent in ``next``."""
    it = iter(loader(dataset(args), args.workers))
    for _ in range(args.warmup):
        next(it)
    waits = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        w = time.perf_counter()
        next(it)
        waits.append(time.perf_counter() - w)
        time.sleep(args.step_ms / 1e3)
    total = time.perf_counter() - t0
    waits.sort()
    return {"step_ms": args.step_ms, "steps": args.steps, "wait_s": sum(waits), "total_s": total,
            "stall_fraction": sum(waits) / total, "wait_p99_ms": waits[int(0.99 * (len(waits) - 1))] * 1e3}


def cmd_rawtext(args: argparse.Namespace) -> dict:
    """Seconds and tokens of each of the first ``--epochs`` epochs, from the first request on."""
    ds = dataset(args)
    epochs, t0, n = [], time.perf_counter(), 0
    start = t0
    for batch in ds:
        n += tokens_of(batch)
        if epoch_of(ds) > len(epochs):
            now = time.perf_counter()
            epochs.append({"seconds": now - start, "tokens": n, "tokens_per_s": n / (now - start)})
            start, n = now, 0
            if len(epochs) == args.epochs:
                break
    return {"epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["warm", "throughput", "resume-states", "resume", "many", "stall",
                                            "rawtext"])
    parser.add_argument("--address", required=True)
    parser.add_argument("--dataset", default="bench")
    parser.add_argument("--bpm", type=int, default=1, help="batches per message; 0: the client's choice")
    parser.add_argument("--compression", default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--decode-ahead", type=int, default=None, help="StreamingDataset(decode_ahead=...)")
    parser.add_argument("--shared-memory", choices=["on", "off"], default=None,
                        help="StreamingDataset(shared_memory=...); default: on for a loopback address")
    parser.add_argument("--fields", default=None, help="StreamingDataset(fields=...), comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--server-pid", type=int, default=None)
    parser.add_argument("--batches-per-epoch", type=int, default=0)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.9])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--out", default="")
    parser.add_argument("--states", default="")
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--ranks", type=int, nargs="+", default=[0])
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    commands = {"warm": cmd_warm, "throughput": cmd_throughput, "resume-states": cmd_resume_states,
                "resume": cmd_resume, "many": cmd_many, "stall": cmd_stall, "rawtext": cmd_rawtext}
    emit(commands[args.command](args))


if __name__ == "__main__":
    main()
