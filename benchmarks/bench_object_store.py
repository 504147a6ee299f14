"""Serving a prepared dataset from an S3-protocol store (moto's standalone server on 127.0.0.1):

    python -m benchmarks.bench_object_store [--repeats 3] [--seq-len 1024] [--batch-size 8]

Prepares the Python standard library's sources (byte tokenizer) once, uploads the preparation to a
bucket, then per repeat: the ceiling (s3fs alone fetching every shard object, one request each),
tokenfeed's first epoch from the bucket (cold: every shard fetched, checked and decoded on the
way) and its second epoch (warm: from the server's cache), each as tokens/s through a real client;
and the requests the server made per shard (counted by a pass-through proxy in front of the store).
Prints the medians and their ratios and writes ``benchmarks/results/object_store.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks._common import ServerProcess
from benchmarks._s3 import FaultProxy, S3Server, Schedule, storage_options, upload
from benchmarks.common import ROOT, save
from client import StreamingDataset


def prepare(work: Path) -> tuple[Path, dict[str, Any]]:
    """The stdlib sources prepared with the byte tokenizer; the directory and its manifest."""
    stdlib = sysconfig.get_paths()["stdlib"]
    config = {"datasets": {"stdlib": {"source": {"type": "text", "paths": [f"{stdlib}/**/*.py"],
                                                 "exclude": ["**/site-packages/**"], "shard_bytes": 1 << 20},
                                      "tokenizer": {"type": "byte"}}}}
    (work / "prep.yaml").write_text(yaml.safe_dump(config))
    out = work / "prepared"
    subprocess.run([sys.executable, "-m", "server", "prepare", "--config", str(work / "prep.yaml"), "--dataset",
                    "stdlib", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    return out, json.loads((out / "manifest.json").read_text())


def ceiling(endpoint: str, urls: list[str], tokens: int) -> float:
    """Tokens/s of fetching every shard object with s3fs alone (what any reader must pay)."""
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options(endpoint), skip_instance_cache=True)
    t0 = time.perf_counter()
    for url in urls:
        fs.cat_file(url)
    return tokens / (time.perf_counter() - t0)


def epoch(address: str, tokens: int, seq_len: int, batch_size: int, ds: StreamingDataset | None = None,
          it: Any = None) -> tuple[float, Any]:
    """Tokens/s of one epoch's worth of tokens through a client; the iterator, to go on with."""
    if it is None:
        ds = StreamingDataset(address, "stdlib", seq_len=seq_len, batch_size=batch_size, fields=("tokens",))
        it = iter(ds)
    seen, t0 = 0, time.perf_counter()
    while seen < tokens:
        seen += next(it)["tokens"].numel()
    return seen / (time.perf_counter() - t0), it


def one_repeat(s3: S3Server, work: Path, urls: list[str], manifest: dict[str, Any], args: argparse.Namespace,
               bucket_prefix: str) -> dict[str, float]:
    tokens = int(manifest["totals"]["tokens"])
    result = {"ceiling_tokens_s": ceiling(s3.endpoint, urls, tokens)}
    proxy = FaultProxy(s3.endpoint, Schedule())  # no faults: it counts the server's requests
    source = {"type": "tokens", "path": bucket_prefix, "storage_options": storage_options(proxy.endpoint)}
    server = ServerProcess({"datasets": {"stdlib": {"source": source}}}, work).start()
    try:
        at_start = proxy.requests
        result["cold_tokens_s"], it = epoch(server.address, tokens, args.seq_len, args.batch_size)
        result["requests_per_shard"] = (proxy.requests - at_start) / len(urls)
        result["startup_requests"] = at_start
        before = proxy.requests
        result["warm_tokens_s"], _ = epoch(server.address, tokens, args.seq_len, args.batch_size, it=it)
        result["warm_requests"] = proxy.requests - before
        it.close()  # before the server goes: a suspended stream would try to reconnect
    finally:
        server.stop()
        proxy.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    s3 = S3Server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            print("preparing the stdlib corpus and uploading it ...", flush=True)
            prepared, manifest = prepare(work)
            objects = upload(s3.endpoint, prepared, "s3://bench/stdlib")
            urls = [u for u in objects if u.endswith(".tft")]
            runs = []
            for i in range(args.repeats):
                runs.append(one_repeat(s3, work, urls, manifest, args, "s3://bench/stdlib"))
                print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v:,.1f}" for k, v in runs[-1].items()),
                      flush=True)
    finally:
        s3.stop()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    ratios = {"cold_vs_ceiling": med["cold_tokens_s"] / med["ceiling_tokens_s"],
              "warm_vs_ceiling": med["warm_tokens_s"] / med["ceiling_tokens_s"]}
    print(f"{len(urls)} shards, {manifest['totals']['tokens']:,} tokens; medians of {args.repeats}: "
          f"s3fs alone {med['ceiling_tokens_s'] / 1e6:.1f} M tokens/s, tokenfeed cold {med['cold_tokens_s'] / 1e6:.1f} "
          f"({ratios['cold_vs_ceiling']:.2f}x), warm {med['warm_tokens_s'] / 1e6:.1f} "
          f"({ratios['warm_vs_ceiling']:.2f}x); "
          f"{med['requests_per_shard']:.2f} requests per shard (cold), {med['warm_requests']:.0f} requests warm")
    path = save("object_store", {"shards": len(urls), "tokens": manifest["totals"]["tokens"], "seq_len": args.seq_len,
                                 "batch_size": args.batch_size, "runs": runs, "median": med, "ratios": ratios,
                                 "store": "moto standalone server on 127.0.0.1 (not a real S3: no network latency)"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
