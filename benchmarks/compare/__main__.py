"""Run the comparison suite of issue 9 and write ``benchmarks/results/compare.{json,md,png}``.

    python -m benchmarks.compare [--quick] [--bench-python .venv-bench/bin/python] [--cache DIR]
                                 [--only q1,q2,q3,q4,q5,q6] [--repeats N]

Use ``benchmarks/run_compare.sh``, which also sets up the peers' environment. ``--quick`` (a
corpus of ~25 M tokens instead of ~200 M, shorter windows, one repeat) writes ``compare-quick.*``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, Server, save
from benchmarks.compare import report, suite
from benchmarks.compare.corpus import Corpus, build

log = logging.getLogger("benchmarks.compare")
QUESTIONS = ("q1", "q2", "q3", "q4", "q5", "q6")


def settings(args: argparse.Namespace, corpus: Corpus, corpus_json: str, logs: Path) -> suite.Settings:
    """Full-scale settings, or the shrunken ones of ``--quick``."""
    common = {"bench_python": args.bench_python, "corpus": corpus, "corpus_json": corpus_json, "logs": logs}
    if args.repeats:
        common["repeats"] = args.repeats
    if not args.quick:
        return suite.Settings(**common)
    return suite.Settings(**{"repeats": 1, **common}, seconds=1.5, raw_parts=2, raw_repeats=1, resume_repeats=1,
                          many_seconds=2.0, stall_steps=((5.0, 100), (20.0, 50), (100.0, 12)))


def best_bpm(results: list[dict]) -> int:
    """batches_per_message of the fastest tokenfeed setting with num_workers=0 (default 4)."""
    ok = [r for r in results
          if r.get("workers") == 0 and "tokens_per_s" in r and r.get("variant", "default") == "default"]
    return max(ok, key=lambda r: r["tokens_per_s"])["batches_per_message"] if ok else 4


def run(args: argparse.Namespace, previous: dict) -> dict:
    """Run the questions asked for; ``previous`` (an earlier run's results) supplies the chosen
    batches_per_message when question 1 is not rerun."""
    only = set(args.only.split(",")) if args.only else set(QUESTIONS)
    scale = "quick" if args.quick else "full"
    cache = Path(args.cache)
    corpus = build(cache, scale, 25_000_000 if args.quick else 200_000_000)
    corpus_json = str(cache / scale / "corpus.json")
    logs = cache / scale / "logs"
    s = settings(args, corpus, corpus_json, logs)
    result: dict = {"scale": scale, "corpus": {
        "tokens": corpus.num_tokens, "repeats": corpus.repeats, "stdlib_tokens": corpus.base_tokens,
        "text_bytes": corpus.text_bytes, "vocab": 16384, "seq_len": suite.SEQ, "batch_size": suite.BATCH,
        "cpus": os.cpu_count()}, "settings": {
        "seconds": s.seconds, "repeats": s.repeats, "warmup_batches": s.warmup, "bpms": list(s.bpms)}}
    t0 = time.perf_counter()
    if only & {"q1", "q4"}:
        result["formats"] = suite.peer_formats(s)
    config = suite.tokens_config(s)
    if only & {"q1", "q4", "q5", "q6"}:
        with Server(config) as server:
            warm = suite.warm(s, server)
            result["warm_epoch"] = warm
            log.info("tokenfeed cold epoch (fills the cache): %s", warm)
            if "q1" in only:
                with Server(suite.tokens_config(s, "zstd")) as zstd_server:
                    log.info("tokenfeed cold epoch, zstd cache: %s", suite.warm(s, zstd_server))
                    result["q1_peers"], result["q1_tokenfeed"] = suite.pretokenized(s, server, zstd_server)
            bpm = best_bpm(result.get("q1_tokenfeed") or previous.get("q1_tokenfeed", []))
            result["chosen_bpm"] = bpm
            if "q4" in only:
                result["q4_tokenfeed"] = suite.resume_tokenfeed(s, server, config, warm["batches_per_epoch"])
            if "q5" in only:
                result["q5"] = suite.many_clients(s, server, sorted({1, bpm}))
            if "q6" in only:
                result["q6"] = suite.data_stall(s, server, bpm)
    if "q3" in only:
        result["q3"] = suite.transport_ceiling(s)
    if "q4" in only:
        result["q4_peers"] = suite.resume_peers(s)
    if "q2" in only:
        result["q2"] = suite.raw_text(s, result.get("chosen_bpm", 4))
    result["elapsed_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="~25 M tokens, short windows, one repeat")
    parser.add_argument("--bench-python", default=str(ROOT / ".venv-bench" / "bin" / "python"),
                        help="python of the peers' environment (made by run_compare.sh)")
    parser.add_argument("--cache", default=os.environ.get("TOKENFEED_BENCH_CACHE", "/tmp/tokenfeed-bench"),
                        help="where the corpus and the peers' formats are written once and reused")
    parser.add_argument("--repeats", type=int, default=0,
                        help="interleaved repeats of each setting (default: 3, with --quick 1)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(QUESTIONS)}; "
                        "the other questions' results of the last run are kept")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not Path(args.bench_python).exists():
        parser.error(f"--bench-python: {args.bench_python} does not exist; run benchmarks/run_compare.sh")
    name = "compare-quick" if args.quick else "compare"
    old = RESULTS / f"{name}.json"
    previous = json.loads(old.read_text()) if args.only and old.exists() else {}
    result = run(args, previous)
    if previous:  # --only: the questions rerun replace theirs, the rest are kept
        kept = {k: v for k, v in previous.items() if k not in ("benchmark", "when", "machine", "elapsed_s")}
        result = {**kept, **result, "rerun": args.only}
    path = save(name, result)
    result = json.loads(path.read_text())  # with the machine and time that save() adds
    md, png = report.write(name, result, plot_python=args.bench_python)
    print(f"saved {path}, {md}, {png or 'no plot'} ({result['elapsed_s']:.0f} s)")
    print(md.read_text())


if __name__ == "__main__":
    main()
