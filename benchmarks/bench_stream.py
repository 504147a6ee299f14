"""One client streaming a warm dataset over loopback, next to the raw gRPC ceiling (issue 2).

    python -m benchmarks.bench_stream [--seconds 5] [--repeats 3]

Prints and saves ``benchmarks/results/stream.json``: tokens/s, MB/s, p50/p99 time per batch for
seq_len 2048, batch 8 on the embedded stdlib corpus, and raw gRPC loopback throughput for the
same message size measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from benchmarks.common import Server, percentiles, save
from benchmarks.raw_grpc import RawServer, measure
from client import StreamingDataset


def stream_once(address: str, seconds: float, seq_len: int, batch: int, per_msg: int) -> dict:
    ds = StreamingDataset(address, "stdlib", seq_len=seq_len, batch_size=batch, batches_per_message=per_msg)
    it = iter(ds)
    next(it)
    gaps, n, start = [], 0, time.perf_counter()
    last = start
    while last - start < seconds:
        next(it)
        now = time.perf_counter()
        gaps.append(now - last)
        last, n = now, n + 1
    elapsed = last - start
    tokens = n * batch * seq_len
    wire = n * batch * (seq_len + 1) * 2
    return {"tokens_per_s": tokens / elapsed, "mb_per_s": wire / elapsed / 1e6, "batches": n,
            **{f"batch_{k}_ms": v * 1e3 for k, v in percentiles(gaps).items()}}


def warm(address: str, seq_len: int, batch: int) -> None:
    """Stream one full epoch so that every shard is tokenized and cached."""
    ds = StreamingDataset(address, "stdlib", seq_len=seq_len, batch_size=batch)
    info = ds.describe()
    rows = sum(s.bytes for s in info.shards) * 1.1 / seq_len + info.num_shards
    for _ in itertools.islice(ds, int(rows / batch)):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    L, B = args.seq_len, args.batch_size
    result: dict = {"seq_len": L, "batch_size": B, "tokenfeed": {}, "raw_grpc": {}}
    with Server() as server, RawServer() as raw:
        t0 = time.perf_counter()
        warm(server.address, L, B)
        result["warm_epoch_s"] = time.perf_counter() - t0
        for per_msg in (1, 8):
            size = per_msg * B * (L + 1) * 2
            runs = [stream_once(server.address, args.seconds, L, B, per_msg) for _ in range(args.repeats)]
            ceilings = [measure(raw.address, size, max(200, int(2e9 / size))) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            raw_mb = statistics.median(ceilings) / 1e6
            result["tokenfeed"][f"batches_per_message={per_msg}"] = {**med, "message_bytes": size, "runs": runs}
            result["raw_grpc"][f"message_bytes={size}"] = {"mb_per_s": raw_mb,
                                                           "runs_mb_per_s": [c / 1e6 for c in ceilings]}
            print(f"batches/message {per_msg} ({size / 1024:.0f} KiB): tokenfeed "
                  f"{med['tokens_per_s'] / 1e6:.1f} M tokens/s = {med['mb_per_s']:.0f} MB/s, "
                  f"batch p50 {med['batch_p50_ms']:.3f} ms p99 {med['batch_p99_ms']:.3f} ms; "
                  f"raw gRPC {raw_mb:.0f} MB/s -> {med['mb_per_s'] / raw_mb:.0%} of the transport")
    print("saved", save("stream", result))


if __name__ == "__main__":
    main()
