"""The comparison suite's PNG: one panel per question (benchmarks/results/<name>.png).

    python -m benchmarks.compare.plot RESULT.json OUT.png   # in an environment with matplotlib
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.compare.targets import evaluate, ok_rows


def _label(r: dict) -> str:
    if r["loader"] != "tokenfeed":
        return str(r["loader"])
    if r.get("variant") == "defaults":
        return f"tf all defaults (bpm {r['batches_per_message']})"
    variant = r.get("variant", "default")
    return f"tf bpm{r['batches_per_message']}" + ("" if variant == "default" else f" {variant[:28]}")


def plot(res: dict, ev: dict, path: Path) -> None:
    """Draw the figures of ``res`` (and the targets evaluated in ``ev``) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    rows = ok_rows(res.get("q1_peers")) + ok_rows(res.get("q1_tokenfeed"))
    ax = axes[0][0]
    labels = [
        f"{_label(r)} w{r['workers']}"
        for r in rows
    ]
    colors = ["tab:green" if r.get("variant") == "defaults" else "tab:red" if r["loader"] == "tokenfeed"
              else "tab:gray" for r in rows]
    ax.barh(labels, [r["tokens_per_s"] / 1e6 for r in rows], color=colors)
    for c in res.get("q3", []):
        ax.axvline(c["tokens_per_s"] / 1e6, ls="--", lw=0.8, color="tab:blue")
    ax.set_xscale("log")
    ax.set_title("1. warm pre-tokenized: M tokens/s (green: all defaults; dashed: raw gRPC ceilings)")
    ax = axes[0][1]
    ax.barh(labels, [r["cpu_s_per_m_tokens"] for r in rows], color=colors)
    ax.set_xscale("log")
    ax.set_title("1. trainer CPU s per M tokens (lower is better)")
    ax = axes[0][2]
    if "q2" in ev:
        e = ev["q2"]
        x = [0, 1]
        ax.bar([i - 0.2 for i in x], [(v or 0) / 1e6 for v in e["tokenfeed"]], 0.4, label="tokenfeed", color="tab:red")
        ax.bar(
            [i + 0.2 for i in x],
            [(v or 0) / 1e6 for v in e["recipe"]],
            0.4,
            label="in-trainer recipe",
            color="tab:gray",
        )
        ax.set_xticks(x, ["epoch 1", "epoch 2"])
        ax.set_yscale("log")
        ax.legend()
    ax.set_title("2. raw text: M tokens/s")
    ax = axes[1][0]
    if "q4" in ev:
        keys = [k for k in ("warm", "cold", "mds_none", "litdata") if k in ev["q4"]]
        for j, f in enumerate(("0.1", "0.9")):
            ax.bar(
                [i + (j - 0.5) * 0.4 for i in range(len(keys))],
                [(ev["q4"][k][f] or 0) * 1e3 for k in keys],
                0.4,
                label=f"at {float(f):.0%}",
            )
        ax.set_xticks(range(len(keys)), [{"warm": "tf warm", "cold": "tf fresh server"}.get(k, k) for k in keys])
        ax.legend()
    ax.set_title("4. resume: load_state_dict -> first batch (ms)")
    ax = axes[1][1]
    ax2 = ax.twinx() if ok_rows(res.get("q5")) else None
    for bpm in sorted({r["batches_per_message"] for r in ok_rows(res.get("q5"))}):
        q5 = [r for r in ok_rows(res.get("q5")) if r["batches_per_message"] == bpm]
        ax.plot([r["streams"] for r in q5], [r["tokens_per_s"] / 1e6 for r in q5], "o-", label=f"M tokens/s, bpm {bpm}")
        ax2.plot([r["streams"] for r in q5], [r["batch_p99_ms"] for r in q5], "s--", label=f"p99 ms, bpm {bpm}")
    if ax2 is not None:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("aggregate M tokens/s (solid)")
        ax2.set_ylabel("p99 batch latency ms (dashed)")
        ax2.set_yscale("log")
        ax.legend(loc="upper center", fontsize=7)
    ax.set_title("5. many clients")
    ax = axes[1][2]
    for w in sorted({r["workers"] for r in res.get("q6", []) if "stall_fraction" in r}):
        pts = [r for r in res["q6"] if r.get("workers") == w and "stall_fraction" in r]
        ax.plot([r["step_ms"] for r in pts], [100 * r["stall_fraction"] for r in pts], "o-", label=f"num_workers={w}")
    ax.axhline(1.0, ls="--", color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("step time (ms)")
    ax.set_ylabel("% of time waiting for data")
    if res.get("q6"):
        ax.legend()
    ax.set_title("6. data stall (dashed: 1% target)")
    fig.suptitle(f"tokenfeed comparison suite ({res['scale']}, {res['corpus']['tokens'] / 1e6:.0f} M tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    """Draw a saved result (``report.write`` runs this in the peers' environment, which has matplotlib)."""
    if len(sys.argv) != 3:
        sys.exit("usage: python -m benchmarks.compare.plot RESULT.json OUT.png")
    res = json.loads(Path(sys.argv[1]).read_text())
    plot(res, evaluate(res), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
