"""The questions of the comparison suite, each run as subprocesses (fresh interpreters) of the two
environments: the peers in ``.venv-bench``, tokenfeed's trainer side in ``.venv`` against a server
subprocess. Each function returns a JSON-able dict of its figures."""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Server
from benchmarks.compare.corpus import Corpus
from benchmarks.compare.procstat import parse
from benchmarks.raw_grpc import RawServer, measure

log = logging.getLogger(__name__)
SEQ, BATCH = 2048, 8
STUBS = ROOT / "benchmarks" / "compare" / "stubs"
PEER_LOADERS = ("memmap", "litdata", "hf", "mds_none", "mds_zstd")


@dataclass(frozen=True)
class Settings:
    """How long and how often to measure (``--quick`` shrinks all of it)."""

    bench_python: str
    corpus: Corpus
    corpus_json: str
    logs: Path
    seconds: float = 5.0
    repeats: int = 3
    warmup: int = 20
    workers: tuple[int, ...] = (0, 2)
    bpms: tuple[int, ...] = (1, 4, 16)
    raw_parts: int = 8
    raw_repeats: int = 2
    resume_repeats: int = 3
    streams: tuple[int, ...] = (1, 8, 32, 64)
    many_seconds: float = 5.0
    stall_steps: tuple[tuple[float, int], ...] = ((5.0, 400), (20.0, 200), (100.0, 50))


def _run(python: str, module: str, args: list[str], logs: Path, tag: str, peers: bool = False,
         timeout: float = 900) -> dict:
    """Run ``python -m module args`` in the repository root; its result, or ``{"error": ...}``."""
    env = dict(os.environ)
    if peers:  # the torchvision stand-in, for `import streaming` (see stubs/torchvision)
        env["PYTHONPATH"] = os.pathsep.join([str(STUBS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{tag}.log", "w") as err:
        try:
            proc = subprocess.run([python, "-m", module, *args], check=False, cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("%s timed out after %.0f s", tag, timeout)
            return {"error": f"timed out after {timeout:.0f} s"}
    try:
        return parse(proc.stdout)
    except ValueError:
        tail = (logs / f"{tag}.log").read_text()[-600:]
        log.error("%s failed (exit %s): %s", tag, proc.returncode, tail)
        return {"error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}


def _tf(s: Settings, command: str, address: str, tag: str, *args: str) -> dict:
    """A ``tf_client`` command in a fresh interpreter of this environment (``.venv``)."""
    return _run(sys.executable, "benchmarks.compare.tf_client", [command, "--address", address, *args], s.logs, tag)


def tokens_config(s: Settings, cache_compression: str | None = None) -> Path:
    """The server config that serves the corpus's token shards as dataset ``bench``: the server's
    defaults, or the cache's ``compression`` named (``zstd``: the default before issue 23)."""
    s.logs.mkdir(parents=True, exist_ok=True)
    path = s.logs / ("tokens.yaml" if cache_compression is None else f"tokens-{cache_compression}.yaml")
    config: dict[str, Any] = {"datasets": {"bench": {"source": {"type": "tokens", "path": s.corpus.tokenfeed_dir}}}}
    if cache_compression is not None:
        config["cache"] = {"compression": cache_compression}
    path.write_text(json.dumps(config))
    return path


#: tokenfeed settings measured besides the defaults, at the largest batches_per_message unless
#: they name theirs: (variant, num_workers, tf_client arguments, whether on the server with a
#: zstd cache[, batches_per_message]). The rows without a variant name the batches per message
#: and leave the rest to the client; "defaults" leaves it everything (``--bpm 0``).
VARIANTS: tuple[tuple, ...] = (
    # what a user got before issue 23: at most 256 KiB a message (7 here), a decode thread, zstd cache
    ("before issue 23 (zstd cache, decode_ahead=2)", 0, ("--decode-ahead", "2"), True, 7),
    ("decode_ahead=0", 0, ("--decode-ahead", "0"), False),
    ("decode_ahead=2", 0, ("--decode-ahead", "2"), False),
    ("gRPC only (shared memory off)", 0, ("--shared-memory", "off"), False),
    ("zstd cache", 0, (), True),
    # the batch the peers deliver: the rows as one int64 [8, 2049] tensor, no labels or positions
    ("fields=tokens", 0, ("--fields", "tokens"), False),
    ("fields=tokens, decode_ahead=0", 0, ("--fields", "tokens", "--decode-ahead", "0"), False),
    # through the shared-memory ring a message is a few hundred bytes of gRPC whatever its size:
    # more batches per message spread the per-message cost wider (the ring holds 2 of these)
    ("decode_ahead=0", 0, ("--decode-ahead", "0"), False, 64),
    ("fields=tokens, decode_ahead=0", 0, ("--fields", "tokens", "--decode-ahead", "0"), False, 64),
    ("zstd cache, fields=tokens, decode_ahead=0", 0, ("--fields", "tokens", "--decode-ahead", "0"), True, 64),
)
#: The row a StreamingDataset built with only address, dataset, seq_len and batch_size gives (issue 23, goal 1).
DEFAULTS = "defaults"


def warm(s: Settings, server: Server) -> dict:
    """Stream epoch 0 once, so that every shard is in the server's cache; its batch count."""
    result = _tf(s, "warm", server.address, "warm", "--bpm", "16")
    if "batches_per_epoch" not in result:
        raise RuntimeError(f"tokenfeed did not stream the corpus: {result.get('error')} (see {s.logs}/warm.log)")
    return result


def peer_formats(s: Settings) -> dict:
    """Write (once) each peer's format of the corpus."""
    out = {}
    for kind in ("mds_none", "mds_zstd", "litdata", "hf"):
        log.info("format %s", kind)
        out[kind] = _run(s.bench_python, "benchmarks.compare.formats", ["--corpus", s.corpus_json, "--kind", kind],
                         s.logs, f"format-{kind}", peers=True, timeout=1800)
    return out


def _summary(base: dict, runs: list[dict], errors: list[str]) -> dict:
    """Medians over the repeats of one setting (or its error when no repeat succeeded)."""
    if not runs:
        return {**base, "error": errors[0] if errors else "no run"}
    if base.get("batches_per_message") == 0:  # chosen by the client: what it chose
        base = {**base, "batches_per_message": runs[0].get("batches_per_message", 0)}
    med = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "cpu_s_per_m_tokens")}
    server = [r["server_cpu_s_per_m_tokens"] for r in runs if r.get("server_cpu_s_per_m_tokens") is not None]
    return {**base, **med, "server_cpu_s_per_m_tokens": statistics.median(server) if server else None,
            "runs": runs, "errors": errors}


def pretokenized(s: Settings, server: Server, zstd_server: Server | None = None) -> tuple[list[dict], list[dict]]:
    """Question 1: tokens/s and trainer CPU per M tokens for every peer x num_workers and tokenfeed
    x num_workers x batches_per_message (the rest the client's and server's defaults), tokenfeed
    with every default (``DEFAULTS``), plus the ``VARIANTS`` (``zstd_server``: the same corpus with
    a zstd cache). Repeats are interleaved (every setting once, then again) so that the load of this
    shared machine falls on all of them alike."""
    settings: list[dict] = [{"loader": lo, "workers": w} for lo in PEER_LOADERS for w in s.workers]
    settings += [{"loader": "tokenfeed", "workers": 0, "batches_per_message": 0, "variant": DEFAULTS}]
    settings += [{"loader": "tokenfeed", "workers": w, "batches_per_message": b, "variant": "default"}
                 for w in s.workers for b in s.bpms]
    settings += [{"loader": "tokenfeed", "workers": w, "batches_per_message": (bpm or [max(s.bpms)])[0],
                  "variant": name, "args": list(args), "raw": raw} for name, w, args, raw, *bpm in VARIANTS
                 if w in s.workers and (zstd_server is not None or not raw)]
    runs: list[list[dict]] = [[] for _ in settings]
    errors: list[list[str]] = [[] for _ in settings]
    for rep in range(s.repeats):
        for i, st in enumerate(settings):
            w = str(st["workers"])
            log.info("warm throughput %d/%d: %s", rep + 1, s.repeats, st)
            if st["loader"] == "tokenfeed":
                bpm, srv = str(st["batches_per_message"]), zstd_server if st.get("raw") else server
                assert srv is not None
                tag = f"q1-tokenfeed-w{w}-bpm{bpm}-{st['variant'].replace(' ', '_').replace(',', '')}-{rep}"
                r = _tf(s, "throughput", srv.address, tag, "--workers", w,
                        "--bpm", bpm, "--seconds", str(s.seconds), "--repeats", "1", "--warmup", str(s.warmup),
                        "--server-pid", str(srv.proc.pid), *st.get("args", []))
            else:
                r = _run(s.bench_python, "benchmarks.compare.peers",
                         ["throughput", "--corpus", s.corpus_json, "--loader", st["loader"], "--workers", w,
                          "--seconds", str(s.seconds), "--repeats", "1", "--warmup", str(s.warmup)],
                         s.logs, f"q1-{st['loader']}-w{w}-{rep}", peers=True)
            if "error" in r:
                errors[i].append(r["error"])
            else:
                runs[i].extend(r["runs"])
    results = [_summary({k: v for k, v in st.items() if k not in ("args", "raw")}, runs[i], errors[i])
               for i, st in enumerate(settings)]
    return ([r for r in results if r["loader"] != "tokenfeed"], [r for r in results if r["loader"] == "tokenfeed"])


def transport_ceiling(s: Settings) -> list[dict]:
    """Question 3: raw gRPC loopback server streaming (bytes, no protobuf) per message size."""
    results = []
    with RawServer() as raw:
        for bpm in s.bpms:
            size = bpm * BATCH * (SEQ + 1) * 2  # what one tokenfeed message carries, as uint16
            count = max(200, int((2e9 if s.repeats > 1 else 5e8) / size))
            runs = [measure(raw.address, size, count) for _ in range(s.repeats)]
            mb = statistics.median(runs) / 1e6
            results.append({"batches_per_message": bpm, "message_bytes": size, "mb_per_s": mb,
                            "tokens_per_s": mb * 1e6 / ((SEQ + 1) * 2) * SEQ, "runs_mb_per_s": [r / 1e6 for r in runs]})
            log.info("raw gRPC, %d-byte messages: %.0f MB/s", size, mb)
    return results


def resume_tokenfeed(s: Settings, server: Server, config: Path, bpe: int) -> dict:
    """Question 4, tokenfeed: load_state_dict -> first batch, warm server and freshly started one."""
    states = s.logs / "tokenfeed-states.json"
    made = _tf(s, "resume-states", server.address, "q4-tokenfeed-states", "--batches-per-epoch", str(bpe),
               "--out", str(states), "--fractions", "0.1", "0.9")
    if "error" in made:
        return made
    out: dict[str, Any] = {"batches_per_epoch": bpe, "warm": {}, "cold": {}}
    for f in ("0.1", "0.9"):
        out["warm"][f] = [_tf(s, "resume", server.address, f"q4-tokenfeed-warm-{f}", "--states", str(states),
                              "--fraction", f) for _ in range(s.resume_repeats)]
        cold = []
        for _ in range(s.resume_repeats):
            with Server(config) as fresh:  # cold: new process, empty cache
                cold.append(_tf(s, "resume", fresh.address, f"q4-tokenfeed-cold-{f}", "--states", str(states),
                                "--fraction", f))
        out["cold"][f] = cold
    return out


def resume_peers(s: Settings) -> dict:
    """Question 4, MosaicML Streaming (MDS, uncompressed) and LitData."""
    out: dict[str, Any] = {}
    for loader in ("mds_none", "litdata"):
        out[loader] = {f: [_run(s.bench_python, "benchmarks.compare.peers",
                                ["resume", "--corpus", s.corpus_json, "--loader", loader, "--fraction", f],
                                s.logs, f"q4-{loader}-{f}", peers=True) for _ in range(s.resume_repeats)]
                       for f in ("0.1", "0.9")}
    return out


def many_clients(s: Settings, server: Server, bpms: list[int]) -> list[dict]:
    """Question 5: W concurrent streams (the W ranks of one job), in up to 4 client processes."""
    return [r for bpm in bpms for r in _many(s, server, bpm)]


def _many(s: Settings, server: Server, bpm: int) -> list[dict]:
    results = []
    for world in s.streams:
        procs = min(world, 4)
        warm = 2.0 if s.repeats > 1 else 1.0
        cmds = []
        for p in range(procs):
            ranks = [str(r) for r in range(p, world, procs)]
            cmds.append([sys.executable, "-m", "benchmarks.compare.tf_client", "many", "--address", server.address,
                         "--bpm", str(bpm), "--world", str(world), "--ranks", *ranks])
        log.info("many clients: %d streams in %d processes, %d batches/message", world, procs, bpm)
        running = [subprocess.Popen(c, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True) for c in cmds]
        for p in running:  # the barrier: every stream has had its first batch
            while (line := p.stdout.readline()) and line.strip() != "READY":
                pass
        start = time.time() + 0.1 + warm
        for p in running:
            try:
                p.stdin.write(f"GO {start} {start + s.many_seconds}\n")
                p.stdin.flush()
            except BrokenPipeError:
                pass  # that process failed; its missing result says so below
        outs = [p.communicate(timeout=300)[0] for p in running]
        try:
            streams = {k: v for o in outs for k, v in parse(o)["streams"].items()}
        except ValueError:
            results.append({"streams": world, "batches_per_message": bpm, "error": "a client process failed"})
            continue
        batches = sum(v["batches"] for v in streams.values())
        gaps = sorted(g for v in streams.values() for g in v["gaps_ms"])
        results.append({
            "streams": world, "processes": procs, "batches_per_message": bpm,
            "tokens_per_s": batches * BATCH * SEQ / s.many_seconds,
            "batch_p50_ms": gaps[len(gaps) // 2] if gaps else None,
            "batch_p99_ms": gaps[int(0.99 * (len(gaps) - 1))] if gaps else None,
            "batch_max_ms": gaps[-1] if gaps else None,
            "min_stream_batches": min(v["batches"] for v in streams.values())})
        log.info("  %.1f M tokens/s, p99 %.2f ms", results[-1]["tokens_per_s"] / 1e6, results[-1]["batch_p99_ms"] or 0)
    return results


def data_stall(s: Settings, server: Server, bpm: int) -> list[dict]:
    """Question 6: share of wall time a sleep-only training step spends waiting for batches
    (median of the repeats, interleaved)."""
    settings = [(w, step_ms, steps) for w in s.workers for step_ms, steps in s.stall_steps]
    runs: list[list[dict]] = [[] for _ in settings]
    for rep in range(s.repeats):
        for i, (w, step_ms, steps) in enumerate(settings):
            r = _tf(s, "stall", server.address, f"q6-w{w}-{step_ms:g}ms-{rep}", "--bpm", str(bpm), "--workers", str(w),
                    "--step-ms", str(step_ms), "--steps", str(steps))
            log.info("stall %d/%d: num_workers=%d step %g ms: %s", rep + 1, s.repeats, w, step_ms,
                     f"{r['stall_fraction']:.2%}" if "stall_fraction" in r else r)
            if "stall_fraction" in r:
                runs[i].append(r)
    results = []
    for (w, step_ms, steps), rs in zip(settings, runs):
        base = {"workers": w, "batches_per_message": bpm, "step_ms": step_ms, "steps": steps}
        if not rs:
            results.append({**base, "error": "no run succeeded"})
            continue
        results.append({**base, **{k: statistics.median(r[k] for r in rs) for k in ("stall_fraction", "wait_p99_ms")},
                        "runs": [r["stall_fraction"] for r in rs]})
    return results


def raw_text(s: Settings, bpm: int) -> dict:
    """Question 2: epochs 1 and 2 of raw JSONL, tokenfeed (fresh server) vs the in-trainer recipe."""
    jsonl = s.corpus.jsonl[:s.raw_parts]
    config = s.logs / "raw.yaml"
    config.write_text(json.dumps({"datasets": {"raw": {
        "source": {"type": "jsonl", "paths": jsonl},
        "tokenizer": {"type": "hf", "path": s.corpus.tokenizer}}}}))
    tokenfeed, recipe = [], []
    for i in range(s.raw_repeats):
        log.info("raw text, repeat %d: tokenfeed", i + 1)
        with Server(config) as server:
            tokenfeed.append(_tf(s, "rawtext", server.address, f"q2-tokenfeed-{i}", "--dataset", "raw",
                                 "--bpm", str(bpm), "--epochs", "2"))
        log.info("raw text, repeat %d: datasets streaming + map(tokenize) + packing in 2 workers", i + 1)
        recipe.append(_run(s.bench_python, "benchmarks.compare.recipe",
                           ["--corpus", s.corpus_json, "--workers", "2", "--parts", str(s.raw_parts)],
                           s.logs, f"q2-recipe-{i}", peers=True))
    text_bytes = sum(Path(p).stat().st_size for p in jsonl)
    return {"jsonl_files": len(jsonl), "jsonl_bytes": text_bytes, "batches_per_message": bpm,
            "tokenfeed": tokenfeed, "recipe": recipe}
