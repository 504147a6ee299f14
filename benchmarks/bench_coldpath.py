"""The cold path on every core (issue 23, goal 3): a fresh server's first epoch of raw text with a
16k BPE, against the ``tokenizers`` library's own ``encode_batch`` on the same documents using
every core, alternating in one run; then the server's second epoch (from its cache).

    python -m benchmarks.bench_coldpath [--repeats 4] [--shard-kib 1024] [--quick]

Corpus: the running Python's standard library (``**/*.py``, one document per file), the text
source's default shards. The BPE (byte-level, 16,384 tokens) is trained on the corpus with
``tokenizers``, as ``data-server tokenizer train`` does, once: it is kept in the temporary
directory under a key of the corpus for the next run. Bare: ``encode_batch`` (the fast variant
without offsets, as the server calls it) over all documents in one call, in this process.
Server: a fresh host process (the real store, cache and gRPC service; ``benchmarks.bench_cache``'s
host) and one client (``StreamingDataset``, seq_len 2048, batch 8, ``fields=["tokens"]`` so that the
client costs little) reading exactly epoch 0's batches, then epoch 1's.

The figure: the **throughput ratio**, bare seconds / server epoch-0 seconds for the same text (the
goal is >= 0.8; above 1 the server is faster), per repeat and its median. Each repeat runs both
sides, in alternating order. With it: CPU-seconds per million tokens of each side (the server's
includes its client) and their ratio, which the machine's load moves much less than wall time; the
cores each side kept busy; the load average before each side; and the cores other processes kept
busy meanwhile (the machine's busy time less ours). On a 2-core machine shared with others a side
gets a share of the cores that depends on how many threads everyone runs, so read a ratio together
with the load it was measured under. Prints and writes ``benchmarks/results/coldpath.json``
(``--quick``: a slice, ``coldpath_quick.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import resource
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_cache import Host
from benchmarks.common import save

SEQ_LEN, BATCH, VOCAB = 2048, 8, 16384


def corpus_config(paths: list[str], kib: int, tokenizer: str | None) -> dict[str, Any]:
    """The server's config: the corpus with the BPE at ``tokenizer`` (None: bytes, to list it)."""
    source = {"type": "text", "paths": paths, "exclude": ["**/site-packages/**"], "shard_bytes": kib << 10}
    tok = {"type": "hf", "path": tokenizer} if tokenizer else {"type": "byte"}
    return {"server": {"host": "127.0.0.1", "port": 0}, "cache": {"max_bytes": "1GiB"},
            "datasets": {"corpus": {"source": source, "tokenizer": tok}}}


def documents(cfg: dict[str, Any]) -> list[list[str]]:
    """Every shard's documents, as the server's source reads them."""
    from server.app import build_datasets
    from server.config import parse_config
    from server.stages.dataset import Dataset
    from server.stages.sources import BadRecords, TokensSource

    (ds,) = build_datasets(parse_config(cfg)).values()
    assert isinstance(ds, Dataset) and not isinstance(ds.source, TokensSource)
    return [ds.source.read_shard(shard, BadRecords()) for shard in ds.shards]


def train(texts: list[str], out: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(out)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads), this one by default."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare(tokenizer: str, shards: list[list[str]]) -> dict[str, Any]:
    """``encode_batch`` over every document in one call, all cores (the library's own thread pool).
    One call is the strongest bare baseline measured: batches of 1,024 documents took ~7% longer
    and of 64 ~30% (a large document is encoded by one thread; more documents per call balance)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    docs = [d for shard in shards for d in shard]
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    lengths = [len(e) for e in encode(docs, add_special_tokens=False)]  # (no Python list of the ids)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    tokens = sum(n + 1 for n in lengths if n)  # one EOS per document, as the server counts
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "cpu_s": cpu,
            "cpu_s_per_m_tokens": cpu / tokens * 1e6, "cores_busy": cpu / seconds}


def epoch_batches(tokenizer: str, shards: list[list[str]]) -> int:
    """Batches of epoch 0 (concat packing: each shard's tokens cut into rows of SEQ_LEN)."""
    from tokenizers import Tokenizer

    from server.stages.packing import concat_rows

    tok = Tokenizer.from_file(tokenizer)
    rows = 0
    for docs in shards:
        tokens = sum(len(e.ids) + 1 for e in tok.encode_batch(docs, add_special_tokens=False) if e.ids)
        rows += concat_rows(tokens, SEQ_LEN)
    return rows // BATCH


def served(cfg: dict[str, Any], batches: int) -> dict[str, Any]:
    """A fresh server: epoch 0 (cold: read, tokenize, pack) and epoch 1 (from its cache)."""
    from client import StreamingDataset

    own0 = cpu_seconds()
    host = Host(cfg)
    try:
        it = iter(StreamingDataset(host.address, "corpus", seq_len=SEQ_LEN, batch_size=BATCH, seed=1,
                                   fields=["tokens"]))
        out: dict[str, Any] = {}
        for epoch in ("cold", "warm"):
            t0, server0, client0 = time.perf_counter(), cpu_seconds(host.proc.pid), cpu_seconds()
            for _ in range(batches):
                next(it)
            seconds = time.perf_counter() - t0
            server, client = cpu_seconds(host.proc.pid) - server0, cpu_seconds() - client0
            tokens = batches * BATCH * SEQ_LEN
            out[epoch] = {"seconds": seconds, "tokens_per_s": tokens / seconds,
                          "cpu_s_per_m_tokens": (server + client) / tokens * 1e6,
                          "server_cpu_s_per_m_tokens": server / tokens * 1e6,
                          "client_cpu_s_per_m_tokens": client / tokens * 1e6, "server_cores_busy": server / seconds}
        del it  # closes the stream
        out["cpu_s"] = cpu_seconds(host.proc.pid) + cpu_seconds() - own0  # start-up included (for "others")
        out["stats"] = {k: v for k, v in host.stats()["stats"].items() if isinstance(v, (int, float))}
    finally:
        host.close()
    return out


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def machine_busy() -> tuple[float, float]:
    """CPU seconds the whole machine has spent busy so far (every process, ours and others'), and
    stolen: taken by the hypervisor for other virtual machines (the load average does not show it)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, steal = fields[3] + fields[4], fields[7]  # idle + iowait; steal
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:7]) - idle) / tick, steal / tick


def measured(fn: Any, own_cpu_s: Any) -> dict[str, Any]:
    """Run ``fn`` and add the load around it: the load average before and after, and the cores
    that other processes kept busy meanwhile (the machine's busy time less ours): on a shared
    machine they decide how much of the cores either side could get."""
    load0, (busy0, steal0), t0 = os.getloadavg()[0], machine_busy(), time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    busy, steal = machine_busy()
    others = (busy - busy0 - own_cpu_s(out)) / seconds
    return {**out, "loadavg_before": load0, "loadavg_after": os.getloadavg()[0],
            "others_cores_busy": max(0.0, others), "stolen_cores": (steal - steal0) / seconds}


def tokenizer_file(shards: list[list[str]]) -> str:
    """The trained BPE, reused between runs on the same corpus (training takes ~30 s of a run)."""
    key = hashlib.sha256(f"{VOCAB}|{len(shards)}|".encode() + b"|".join(
        str(len(d)).encode() for s in shards for d in s)).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"tokenfeed-coldpath-bpe{VOCAB}-{key}.json")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        train([d for s in shards for d in s], path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"trained a {VOCAB}-token BPE in {time.perf_counter() - t0:.1f} s ({path})")
    return path


def one_repeat(i: int, tokenizer: str, shards: list[list[str]], cfg: dict[str, Any], batches: int) -> dict[str, Any]:
    """Bare and server once each; the order alternates between repeats so that neither always
    runs first (after the other's page cache, or into a load that is rising)."""
    sides = {"bare": lambda: measured(lambda: bare(tokenizer, shards), lambda o: o["cpu_s"]),
             "server": lambda: measured(lambda: served(cfg, batches), lambda o: o["cpu_s"])}
    order = ("bare", "server") if i % 2 == 0 else ("server", "bare")
    run: dict[str, Any] = {"order": list(order), **{side: sides[side]() for side in order}}
    b, s = run["bare"], run["server"]
    c = s["cold"]
    # The same text on both sides: the throughput ratio is bare time / server time (>= 0.8: the goal).
    run["throughput_ratio"] = b["seconds"] / c["seconds"]
    run["cpu_per_token_ratio"] = c["cpu_s_per_m_tokens"] / b["cpu_s_per_m_tokens"]
    print(f"repeat {i + 1} ({' then '.join(order)}): bare {b['seconds']:.1f} s ({b['cpu_s_per_m_tokens']:.2f} CPU-s "
          f"per M tokens, {b['cores_busy']:.2f} cores busy, others {b['others_cores_busy']:.2f}, stolen "
          f"{b['stolen_cores']:.2f}, load {b['loadavg_before']:.1f}); server epoch 0 {c['seconds']:.1f} s "
          f"({c['cpu_s_per_m_tokens']:.2f} CPU-s per M tokens with the client, "
          f"{c['server_cores_busy']:.2f} cores busy, "
          f"others {s['others_cores_busy']:.2f}, stolen {s['stolen_cores']:.2f}, load {s['loadavg_before']:.1f}); "
          f"throughput ratio {run['throughput_ratio']:.2f}; epoch 1 {s['warm']['tokens_per_s'] / 1e6:.1f} M tokens/s")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--shard-kib", type=int, default=1024, help="the text source's shard_bytes (its default)")
    parser.add_argument("--quick", action="store_true", help="a slice of the corpus, two repeats (smoke test)")
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = [str(stdlib / ("email" if args.quick else "") / "**" / "*.py")]
    repeats = 2 if args.quick else args.repeats
    shards = documents(corpus_config(paths, args.shard_kib, None))
    tokenizer = tokenizer_file(shards)
    cfg = corpus_config(paths, args.shard_kib, tokenizer)
    batches = epoch_batches(tokenizer, shards)
    docs = sum(len(s) for s in shards)
    print(f"corpus: {docs} documents in {len(shards)} shards, {batches} batches of {BATCH}x{SEQ_LEN} per epoch; "
          f"{os.cpu_count()} cores, shared with whatever else runs (the ratios are the figures)")
    runs = [one_repeat(i, tokenizer, shards, cfg, batches) for i in range(repeats)]
    ratios = [r["throughput_ratio"] for r in runs]
    cpu = [r["cpu_per_token_ratio"] for r in runs]
    warm = med([r["server"]["warm"]["tokens_per_s"] for r in runs])
    result: dict[str, Any] = {"seq_len": SEQ_LEN, "batch_size": BATCH, "vocab": VOCAB, "shard_kib": args.shard_kib,
              "documents": docs, "shards": len(shards), "batches_per_epoch": batches, "repeats": repeats,
              "cpus": os.cpu_count(), "goal": "throughput_ratio (bare encode_batch seconds / server epoch 0 "
              "seconds, the same text) >= 0.8",
              "throughput_ratio": med(ratios), "throughput_ratio_runs": ratios,
              "cpu_per_token_ratio": med(cpu), "cpu_per_token_ratio_runs": cpu,
              "bare_cpu_s_per_m_tokens": med([r["bare"]["cpu_s_per_m_tokens"] for r in runs]),
              "server_cpu_s_per_m_tokens": med([r["server"]["cold"]["cpu_s_per_m_tokens"] for r in runs]),
              "bare_tokens_per_s": med([r["bare"]["tokens_per_s"] for r in runs]),
              "server_cold_tokens_per_s": med([r["server"]["cold"]["tokens_per_s"] for r in runs]),
              "server_warm_tokens_per_s": warm,
              "loadavg": med([r[side]["loadavg_before"] for r in runs for side in ("bare", "server")]),
              "others_cores_busy": med([r[side]["others_cores_busy"] for r in runs for side in ("bare", "server")]),
              "stolen_cores": med([r[side]["stolen_cores"] for r in runs for side in ("bare", "server")]),
              "runs": runs}
    ok = result["throughput_ratio"] >= 0.8
    print(f"{'PASS' if ok else 'FAIL'}  throughput ratio (bare encode_batch time / server epoch 0 time; goal >= 0.8): "
          f"median {result['throughput_ratio']:.2f} (runs {', '.join(f'{x:.2f}' for x in ratios)}); CPU per token "
          f"server / bare {result['cpu_per_token_ratio']:.2f} ({result['server_cpu_s_per_m_tokens']:.2f} vs "
          f"{result['bare_cpu_s_per_m_tokens']:.2f} CPU-s per M tokens); epoch 1 {warm / 1e6:.1f} M tokens/s; "
          f"median load average {result['loadavg']:.1f}, other processes {result['others_cores_busy']:.2f} cores busy, "
          f"{result['stolen_cores']:.2f} cores stolen")
    print(f"wrote {save('coldpath_quick' if args.quick else 'coldpath', result)}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    main()
