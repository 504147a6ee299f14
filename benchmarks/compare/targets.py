"""The targets of issues 9 and 23, checked against the figures of a comparison run."""

from __future__ import annotations

import statistics
from typing import Any

PEERS = ("litdata", "hf", "mds_none", "mds_zstd")  # the memmap floor is a baseline, not a peer


def ok_rows(rows: list[dict] | None) -> list[dict]:
    """The rows that hold figures (not errors)."""
    return [r for r in rows or [] if "tokens_per_s" in r]


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def evaluate(res: dict) -> dict[str, Any]:
    """The targets of issue 9, each with the figures it was judged on."""
    ev: dict[str, Any] = {}
    peers = [r for r in ok_rows(res.get("q1_peers")) if r["loader"] in PEERS]
    tf = ok_rows(res.get("q1_tokenfeed"))
    if peers and tf:
        bp, bt = max(peers, key=lambda r: r["tokens_per_s"]), max(tf, key=lambda r: r["tokens_per_s"])
        ceiling = next((c for c in res.get("q3", []) if c["batches_per_message"] == bt["batches_per_message"]), None)
        # The target asks for both at once: one setting at least as fast as the peer with at most
        # half its CPU. The fastest such setting, else the one with the least CPU among the fast.
        fast = [r for r in tf if r["tokens_per_s"] >= bp["tokens_per_s"]]
        both = [r for r in fast if r["cpu_s_per_m_tokens"] <= 0.5 * bp["cpu_s_per_m_tokens"]]
        cheapest = max(both, key=lambda r: r["tokens_per_s"]) if both else (
            min(fast, key=lambda r: r["cpu_s_per_m_tokens"]) if fast else bt)
        ev["q1"] = {
            "best_peer": bp,
            "best_tokenfeed": bt,
            "cheapest_fast": cheapest,
            "speed_ok": bt["tokens_per_s"] >= bp["tokens_per_s"],
            "cpu_ok": bool(both),
            "ceiling": ceiling,
            "ceiling_ratio": bt["tokens_per_s"] / ceiling["tokens_per_s"] if ceiling else None,
        }
        ev["q1"]["grpc_bound"] = ceiling["tokens_per_s"] < bp["tokens_per_s"] if ceiling else None
        # the fallback target applies only where gRPC rules the first one out
        ev["q1"]["ceiling_ok"] = ev["q1"]["ceiling_ratio"] >= 0.8 if ceiling and ev["q1"]["grpc_bound"] else None
    if peers and (goal1 := defaults_goal(peers, tf)):
        ev["goal1"] = goal1
    q2 = res.get("q2")
    if q2:

        def epochs(rows: list[dict], i: int) -> float | None:
            return _med([r["epochs"][i]["tokens_per_s"] for r in rows if len(r.get("epochs", [])) > i])

        t1, t2, r1, r2 = (
            epochs(q2["tokenfeed"], 0),
            epochs(q2["tokenfeed"], 1),
            epochs(q2["recipe"], 0),
            epochs(q2["recipe"], 1),
        )
        ev["q2"] = {
            "tokenfeed": [t1, t2],
            "recipe": [r1, r2],
            "epoch2_ok": t2 >= 10 * r2 if t2 and r2 else None,
            "epoch1_ok": t1 >= r1 if t1 and r1 else None,
        }
    if res.get("q4_tokenfeed") and "warm" in res["q4_tokenfeed"]:

        def secs(rows: list[dict]) -> float | None:
            return _med([r.get("seconds") for r in rows])

        tfq = res["q4_tokenfeed"]
        q4 = {kind: {f: secs(tfq[kind][f]) for f in ("0.1", "0.9")} for kind in ("warm", "cold")}
        exact = {kind: all(r.get("exact") for rows in tfq[kind].values() for r in rows) for kind in ("warm", "cold")}
        for loader, by_f in res.get("q4_peers", {}).items():
            q4[loader] = {f: secs(rows) for f, rows in by_f.items()}
            exact[loader] = all(r.get("exact") for rows in by_f.values() for r in rows)
        q4["exact"] = exact
        mds90 = q4.get("mds_none", {}).get("0.9")
        for kind in ("warm", "cold"):
            t10, t90 = q4[kind]["0.1"], q4[kind]["0.9"]
            q4[f"{kind}_ratio_ok"] = t90 <= 1.2 * t10 if t10 and t90 else None
            q4[f"{kind}_vs_mosaic_ok"] = t90 <= mds90 if t90 and mds90 else None
        ev["q4"] = q4
    q5 = [r for r in res.get("q5", []) if r.get("batch_p99_ms") is not None]
    by_bpm: dict[int, dict] = {}
    for bpm in sorted({r["batches_per_message"] for r in q5}):
        rows = [r for r in q5 if r["batches_per_message"] == bpm]
        one = next((r for r in rows if r["streams"] == 1), None)
        top = max(rows, key=lambda r: r["streams"])
        ratio = top["tokens_per_s"] / one["tokens_per_s"] if one else None
        by_bpm[bpm] = {
            "ratio": ratio,
            "streams": top["streams"],
            "agg_ok": ratio >= 0.8 if ratio else None,
            "max_p99_ms": max(r["batch_p99_ms"] for r in rows),
            "p99_ok": all(r["batch_p99_ms"] < 50 for r in rows),
        }
    if by_bpm:
        ev["q5"] = by_bpm
    q6 = [r for r in res.get("q6", []) if "stall_fraction" in r and r["step_ms"] == 20.0]
    if q6:
        best = min(q6, key=lambda r: r["stall_fraction"])
        ev["q6"] = {
            "best": best,
            "ok": best["stall_fraction"] < 0.01,
            "by_workers": {r["workers"]: r["stall_fraction"] for r in q6},
        }
    return ev


def defaults_goal(peers: list[dict], tf: list[dict]) -> dict[str, Any] | None:
    """Issue 23, goal 1: tokenfeed with every default (the ``defaults`` row) against the best tuned
    tokenfeed row (>= 0.8x its tokens/s) and the best peer (more tokens/s, <= 0.5x its trainer CPU
    per token), each a ratio of figures measured side by side in the same run."""
    defaults = next((r for r in tf if r.get("variant") == "defaults"), None)
    tuned = [r for r in tf if r.get("variant") != "defaults"]
    if defaults is None or not tuned or not peers:
        return None
    best_tuned = max(tuned, key=lambda r: r["tokens_per_s"])
    best_peer = max(peers, key=lambda r: r["tokens_per_s"])
    vs_tuned = defaults["tokens_per_s"] / best_tuned["tokens_per_s"]
    vs_peer = defaults["tokens_per_s"] / best_peer["tokens_per_s"]
    cpu_ratio = defaults["cpu_s_per_m_tokens"] / best_peer["cpu_s_per_m_tokens"]
    return {"defaults": defaults, "best_tuned": best_tuned, "best_peer": best_peer,
            "vs_tuned": vs_tuned, "vs_tuned_ok": vs_tuned >= 0.8,
            "vs_peer": vs_peer, "vs_peer_ok": vs_peer > 1.0,
            "cpu_ratio": cpu_ratio, "cpu_ok": cpu_ratio <= 0.5}
