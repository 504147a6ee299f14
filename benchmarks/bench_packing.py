"""Packing efficiency and token-budget balance on the stdlib corpus (issue 4).

    python -m benchmarks.bench_packing [--seq-len 2048] [--max-tokens 16384]

Efficiency = real tokens / (rows * seq_len) for concat, bfd and pad packing of every shard, and
for token-budget steps the imbalance (max / mean tokens per rank per step) of LPT next to a
plain greedy assignment. Byte tokenizer. Saves ``benchmarks/results/packing.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from benchmarks.common import save
from benchmarks._common import greedy, imbalance
from server.stages.order import lpt
from server.config import default_config
from server.stages.dataset import Dataset
from server.stages.packing import pack
from server.stages.order import doc_order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=16384)
    args = parser.parse_args()
    L = args.seq_len
    ds = Dataset("stdlib", default_config().datasets["stdlib"])
    shards = [ds.tokenize_shard(i) for i in range(ds.num_shards)]
    result: dict = {"seq_len": L, "shards": ds.num_shards, "tokens": sum(s.num_tokens for s in shards), "modes": {}}
    for mode in ("concat", "bfd", "pad"):
        t0 = time.perf_counter()
        rows = real = 0
        for i, shard in enumerate(shards):
            packed = pack(mode, shard, doc_order(0, 0, i, shard.num_docs), L, ds.info.pad_id)
            rows += packed.rows
            real += int((packed.row_view(0, packed.rows)[:, :-1] != ds.info.pad_id).sum())
        seconds = time.perf_counter() - t0
        result["modes"][mode] = {"rows": rows, "efficiency": real / (rows * L), "tokens_kept": real,
                                 "pack_tokens_per_s": real / seconds}
        print(f"{mode:7s} efficiency {real / (rows * L):.4f}  rows {rows}  tokens kept {real / result['tokens']:.1%}  "
              f"packing {real / seconds / 1e6:.0f} M tokens/s")
    # token-budget steps over the pieces of epoch 0, as the server cuts them
    pieces = []
    for i, shard in enumerate(shards):
        lengths = np.diff(shard.offsets)[doc_order(0, 0, i, shard.num_docs)]
        pieces += [min(L, int(n) - off) for n in lengths for off in range(0, int(n), L)]
    for world in (2, 4, 8):
        ratios = {"lpt": [], "greedy": []}
        start = 0
        while start < len(pieces):
            loads, end = [0] * world, start
            while end < len(pieces):
                r = min(range(world), key=lambda k: loads[k])
                if end > start and loads[r] + pieces[end] > args.max_tokens:
                    break
                loads[r] += pieces[end]
                end += 1
            step = pieces[start:end]
            ratios["lpt"].append(imbalance(step, lpt(step, world), world))
            ratios["greedy"].append(imbalance(step, greedy(step, world, args.max_tokens), world))
            start = end
        med = {k: statistics.median(v) for k, v in ratios.items()}
        result[f"budget_world_{world}"] = {"steps": len(ratios["lpt"]), "median_imbalance": med,
                                           "p99_imbalance": {k: float(np.percentile(v, 99)) for k, v in ratios.items()}}
        print(f"max_tokens {args.max_tokens}, {world} ranks, {len(ratios['lpt'])} steps: max/mean tokens per rank, "
              f"median LPT {med['lpt']:.3f} vs greedy {med['greedy']:.3f}")
    print("saved", save("packing", result))


if __name__ == "__main__":
    main()
