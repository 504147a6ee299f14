"""The comparison suite's report: a table of the targets of issue 9, a markdown table per question
and one PNG of plots (``benchmarks/results/<name>.{md,png}``)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from benchmarks.common import RESULTS, ROOT
from benchmarks.compare.targets import evaluate, ok_rows

log = logging.getLogger(__name__)

NAMES = {
    "memmap": "numpy memmap (the floor)",
    "litdata": "LitData",
    "hf": "HF datasets (Arrow, torch format)",
    "mds_none": "MosaicML MDS, uncompressed",
    "mds_zstd": "MosaicML MDS, zstd",
    "tokenfeed": "tokenfeed",
}


def _m(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x / 1e6:.{digits}f}"


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def _name(r: dict) -> str:
    name = NAMES[r["loader"]]
    if r["loader"] != "tokenfeed":
        return name
    variant = r.get("variant", "default")
    if variant == "defaults":
        return f"{name}, all defaults ({r['batches_per_message']} batches/message chosen)"
    return f"{name}, {r['batches_per_message']} batches/message" + ("" if variant == "default" else f", {variant}")


def _summary(ev: dict) -> list[str]:
    """One line per target of issue 9."""
    rows = []
    if q := ev.get("q1"):
        bp, bt = q["best_peer"], q["best_tokenfeed"]
        rows += [
            (
                "1. warm tokens/s >= the best peer's",
                f"{_m(bt['tokens_per_s'])} vs {_name(bp)} {_m(bp['tokens_per_s'])} M tokens/s",
                q["speed_ok"],
            ),
            (
                "1. ... with trainer CPU <= 0.5x that peer's",
                f"{_name(q['cheapest_fast'])}: {_m(q['cheapest_fast']['tokens_per_s'])} M tokens/s at "
                f"{q['cheapest_fast']['cpu_s_per_m_tokens']:.4f} vs 0.5 x {bp['cpu_s_per_m_tokens']:.4f} s / M tokens",
                q["cpu_ok"],
            ),
            (
                "1. (if gRPC-bound) >= 0.8x the gRPC ceiling",
                f"{_f(q['ceiling_ratio'], '.2f')}x; gRPC-bound: {'yes' if q['grpc_bound'] else 'no'}",
                q["ceiling_ok"],
            ),
        ]
    rows += _goal1_rows(ev.get("goal1"))
    if q := ev.get("q2"):
        t, r = q["tokenfeed"], q["recipe"]
        rows += [
            ("2. raw text epoch 2 >= 10x the recipe", f"{(t[1] or 0) / (r[1] or 1):.1f}x", q["epoch2_ok"]),
            ("2. raw text epoch 1 >= the recipe", f"{(t[0] or 0) / (r[0] or 1):.2f}x", q["epoch1_ok"]),
        ]
    if q := ev.get("q4"):
        w = q["warm"]
        rows += [
            (
                "4. resume at 90% <= 1.2x at 10% (warm server)",
                f"{_f(w['0.9'] and w['0.9'] * 1e3, '.1f')} vs {_f(w['0.1'] and w['0.1'] * 1e3, '.1f')} ms",
                q["warm_ratio_ok"],
            ),
            (
                "4. resume at 90% <= MosaicML's (warm server)",
                f"{_f(w['0.9'] and w['0.9'] * 1e3, '.1f')} vs "
                f"{_f((q.get('mds_none') or {}).get('0.9', 0) * 1e3, '.1f')} ms",
                q["warm_vs_mosaic_ok"],
            ),
        ]
    for bpm, q in (ev.get("q5") or {}).items():
        rows += [
            (
                f"5. {q['streams']} streams >= 0.8x 1 stream ({bpm} batches/message)",
                f"{_f(q['ratio'], '.2f')}x",
                q["agg_ok"],
            ),
            (f"5. p99 < 50 ms ({bpm} batches/message)", f"max {q['max_p99_ms']:.1f} ms", q["p99_ok"]),
        ]
    if q := ev.get("q6"):
        rows.append(
            (
                "6. data stall < 1% at 20 ms steps",
                f"{q['best']['stall_fraction']:.2%} (num_workers={q['best']['workers']})",
                q["ok"],
            )
        )
    if not rows:
        return []
    return (
        ["## Targets of issues 9 and 23", "", "| target | figure | result |", "|---|---|---|"]
        + [f"| {a} | {b} | {_met(c)} |" for a, b, c in rows]
        + [""]
    )


def _goal1_rows(g: dict | None) -> list[tuple[str, str, bool | None]]:
    """Issue 23, goal 1: the defaults against the best tuned row and the best peer (one run)."""
    if not g:
        return []
    d, t, p = g["defaults"], g["best_tuned"], g["best_peer"]
    return [
        ("23.1 defaults >= 0.8x the best tuned tokenfeed (tokens/s)",
         f"{g['vs_tuned']:.2f}x: {_m(d['tokens_per_s'])} vs {_m(t['tokens_per_s'])} ({_name(t)})", g["vs_tuned_ok"]),
        ("23.1 defaults > the best peer (tokens/s)",
         f"{g['vs_peer']:.2f}x: {_m(d['tokens_per_s'])} vs {_name(p)} {_m(p['tokens_per_s'])}", g["vs_peer_ok"]),
        ("23.1 defaults' trainer CPU per token <= 0.5x the best peer's",
         f"{g['cpu_ratio']:.2f}x: {d['cpu_s_per_m_tokens']:.4f} vs {p['cpu_s_per_m_tokens']:.4f} s / M tokens",
         g["cpu_ok"]),
    ]


def _q1(res: dict, ev: dict) -> list[str]:
    if not res.get("q1_peers") and not res.get("q1_tokenfeed"):
        return []
    lines = [
        "## 1. Pre-tokenized, warm: tokens/s into the trainer and the trainer's CPU",
        "",
        "Medians of the repeats; the trainer process tree's CPU (user + sys, its DataLoader workers "
        "included, not the server). tokenfeed: `StreamingDataset` (`num_workers=0`) or "
        "`StreamingDataLoader`, no wire compression, with its defaults (the cache uncompressed while "
        "it fits its budget, tokens through a shared-memory ring since the server is on this host, "
        "decoding in the trainer's thread while it asks for batches back to back, each field made "
        "when read) unless the row names a variant; *all defaults* also lets the client choose the "
        "batches per message. The server's own CPU is shown apart.",
        "",
        "What each batch holds differs: every peer hands the trainer the rows as one int64 `[8, 2049]` "
        "tensor, and tokenfeed by default hands it four (`input_ids`, `labels` with -100 on padding, "
        "`position_ids` restarting at each document, `cu_seqlens`), about 30 us more CPU per batch when "
        "all are made. The consumer here reads `input_ids` (the peers' tensor); decoding in its thread, "
        "tokenfeed makes only that one (`decode_ahead=2` rows make all four, in the decode thread). "
        "The `fields=tokens` rows ask tokenfeed for the peers' tensor.",
        "",
        "| loader | num_workers | M tokens/s | trainer CPU s / M tokens | server CPU s / M tokens "
        "| runs (M tokens/s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in res.get("q1_peers", []) + res.get("q1_tokenfeed", []):
        if "error" in r:
            lines.append(f"| {_name(r)} | {r['workers']} | failed: {r['error']} | | | |")
            continue
        runs = ", ".join(_m(x["tokens_per_s"]) for x in r.get("runs", []))
        lines.append(
            f"| {_name(r)} | {r['workers']} | {_m(r['tokens_per_s'])} | {_f(r['cpu_s_per_m_tokens'], '.4f')} "
            f"| {_f(r.get('server_cpu_s_per_m_tokens'), '.4f')} | {runs} |"
        )
    q = ev.get("q1")
    if q:
        bp, bt = q["best_peer"], q["best_tokenfeed"]
        lines += [
            "",
            f"Best peer: {_name(bp)}, num_workers={bp['workers']}: {_m(bp['tokens_per_s'])} M tokens/s, "
            f"{bp['cpu_s_per_m_tokens']:.4f} CPU s / M tokens. Best tokenfeed: {_name(bt)}, "
            f"num_workers={bt['workers']}: {_m(bt['tokens_per_s'])} M tokens/s, "
            f"{bt['cpu_s_per_m_tokens']:.4f} CPU s / M tokens.",
            "",
            "| target | figure | result |",
            "|---|---|---|",
            f"| tokens/s >= best peer's | {_m(bt['tokens_per_s'])} vs {_m(bp['tokens_per_s'])} "
            f"| {_met(q['speed_ok'])} |",
            f"| ... with trainer CPU <= 0.5x the peer's ({_name(q['cheapest_fast'])}) "
            f"| {_m(q['cheapest_fast']['tokens_per_s'])} M tokens/s at {q['cheapest_fast']['cpu_s_per_m_tokens']:.4f} "
            f"vs 0.5 x {bp['cpu_s_per_m_tokens']:.4f} | {_met(q['cpu_ok'])} |",
        ]
        if q["ceiling"]:
            lines.append(
                f"| else >= 0.8x the gRPC ceiling (3) | {_m(bt['tokens_per_s'])} / {_m(q['ceiling']['tokens_per_s'])}"
                f" = {q['ceiling_ratio']:.2f} | {_met(q['ceiling_ok'])} |"
            )
            lines += [
                "",
                f"The raw gRPC ceiling for {q['ceiling']['message_bytes']:,}-byte messages is "
                f"{_m(q['ceiling']['tokens_per_s'])} M tokens/s, "
                + ("below" if q["grpc_bound"] else "above")
                + f" the best peer's {_m(bp['tokens_per_s'])}: gRPC on this machine "
                + ("makes the first target impossible." if q["grpc_bound"] else "does not rule the first target out."),
            ]
    if goal1 := _goal1_rows(ev.get("goal1")):
        lines += ["", "Issue 23, goal 1: a `StreamingDataset` built with only address, dataset, seq_len and batch_size "
                  "(the *all defaults* row), against the fastest other tokenfeed row and the fastest peer of this run.",
                  "", "| target | figure | result |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {_met(c)} |" for a, b, c in goal1]
    return lines + [""]


def _q2(res: dict, ev: dict) -> list[str]:
    q, e = res.get("q2"), ev.get("q2")
    if not q or not e:
        return []
    return [
        "## 2. Raw text tokenized on the fly (JSONL, BPE 16k)",
        "",
        f"{q['jsonl_files']} JSONL files, {q['jsonl_bytes'] / 1e6:.1f} MB. tokenfeed: a fresh server "
        "tokenizes (epoch 1) and caches (epoch 2). Recipe: `datasets` streaming + `map(tokenize)` + "
        "packing in 2 DataLoader workers, tokenizing every epoch. Time from the first request / `iter()` on.",
        "",
        "| loader | epoch 1 M tokens/s | epoch 2 M tokens/s |",
        "|---|---|---|",
        f"| tokenfeed | {_m(e['tokenfeed'][0], 2)} | {_m(e['tokenfeed'][1], 2)} |",
        f"| in-trainer recipe | {_m(e['recipe'][0], 2)} | {_m(e['recipe'][1], 2)} |",
        "",
        "| target | figure | result |",
        "|---|---|---|",
        f"| epoch 2 >= 10x the recipe | {(e['tokenfeed'][1] or 0) / (e['recipe'][1] or 1):.1f}x "
        f"| {_met(e['epoch2_ok'])} |",
        f"| epoch 1 >= the recipe | {(e['tokenfeed'][0] or 0) / (e['recipe'][0] or 1):.2f}x | {_met(e['epoch1_ok'])} |",
        "",
    ]


def _q3(res: dict) -> list[str]:
    if not res.get("q3"):
        return []
    # tokenfeed through gRPC at each message size: the default rows, except at the size where
    # the suite also measured shared memory off (the default rides shared memory, not gRPC).
    rows = [r for r in ok_rows(res.get("q1_tokenfeed")) if r["workers"] == 0]
    tf0 = {r["batches_per_message"]: r for r in rows if r.get("variant", "default") == "default"}
    tf0.update({r["batches_per_message"]: r for r in rows if r.get("variant") == "gRPC only (shared memory off)"})
    lines = [
        "## 3. The transport's ceiling: raw gRPC loopback server streaming, same message sizes",
        "",
        "Bytes passed through without protobuf work, server in its own process (`benchmarks/raw_grpc.py`). "
        "tokenfeed's column is its stream with the tokens in the gRPC messages (shared memory off "
        "where the suite measured it so).",
        "",
        "| batches/message | message bytes | raw gRPC MB/s | = M tokens/s | tokenfeed (num_workers=0) | share |",
        "|---|---|---|---|---|---|",
    ]
    for c in res["q3"]:
        t = tf0.get(c["batches_per_message"])
        share = f"{t['tokens_per_s'] / c['tokens_per_s']:.2f}" if t else "—"
        lines.append(
            f"| {c['batches_per_message']} | {c['message_bytes']:,} | {c['mb_per_s']:.0f} | {_m(c['tokens_per_s'])} "
            f"| {_m(t['tokens_per_s']) if t else '—'} | {share} |"
        )
    return lines + [""]


def _q4(ev: dict) -> list[str]:
    q = ev.get("q4")
    if not q:
        return []
    rows = [
        ("tokenfeed, warm server", "warm"),
        ("tokenfeed, freshly started server", "cold"),
        ("MosaicML MDS, uncompressed", "mds_none"),
        ("LitData", "litdata"),
    ]
    lines = [
        "## 4. Resume: `load_state_dict` to the first batch",
        "",
        "num_workers=0, a fresh trainer process, the loader built before the clock starts; medians.",
        "",
        "| loader | at 10% (ms) | at 90% (ms) | 90% / 10% | first batch = uninterrupted run's |",
        "|---|---|---|---|---|",
    ]
    for label, key in rows:
        if key in q:
            a, b = q[key].get("0.1"), q[key].get("0.9")
            lines.append(
                f"| {label} | {_f(a and a * 1e3, '.1f')} | {_f(b and b * 1e3, '.1f')} | "
                f"{_f(b / a if a and b else None, '.2f')} | {'yes' if q['exact'].get(key) else '**no**'} |"
            )
    lines += [
        "",
        "| target | warm server | fresh server |",
        "|---|---|---|",
        f"| 90% <= 1.2x 10% | {_met(q['warm_ratio_ok'])} | {_met(q['cold_ratio_ok'])} |",
        f"| 90% <= MosaicML's 90% | {_met(q['warm_vs_mosaic_ok'])} | {_met(q['cold_vs_mosaic_ok'])} |",
        "",
    ]
    return lines


def _q5(res: dict, ev: dict) -> list[str]:
    if not res.get("q5"):
        return []
    lines = [
        "## 5. Many clients on one server",
        "",
        "W streams = the W ranks of one job (rank r gets global batches r, r+W, ...), in up to 4 client "
        "processes on the same 2 cores as the server, every stream reading as fast as it can; latency = "
        "time between consecutive batches of a stream (at least W x 16,384 / aggregate tokens/s on average). "
        "A stream's batches arrive a message at a time: with B batches per message and every stream "
        "saturated, one gap in B spans a whole message's share of the server, W x B x 16,384 / aggregate "
        "(the *message gap* column). For B > 1 those are more than 1% of the gaps, so the p99 is the "
        "message gap: p99 < 50 ms at 64 streams and 16 batches/message would need 336 M tokens/s. More batches "
        "per message trade latency for throughput.",
        "",
        "| batches/message | streams | M tokens/s (aggregate) | message gap ms | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["q5"]:
        if "error" in r:
            lines.append(f"| {r['batches_per_message']} | {r['streams']} | failed: {r['error']} | | | | |")
        else:
            gap = (r["streams"] * r["batches_per_message"] * 16384 / r["tokens_per_s"] * 1e3
                   if r["tokens_per_s"] else None)
            lines.append(
                f"| {r['batches_per_message']} | {r['streams']} | {_m(r['tokens_per_s'])} | {_f(gap, '.1f')} "
                f"| {_f(r['batch_p50_ms'])} "
                f"| {_f(r['batch_p99_ms'], '.2f')} | {_f(r['batch_max_ms'], '.1f')} |"
            )
    if ev.get("q5"):
        lines += [
            "",
            "| batches/message | aggregate at the most streams / 1 stream (target >= 0.8) | max p99 ms (target < 50) |",
            "|---|---|---|",
        ]
        for bpm, q in ev["q5"].items():
            lines.append(
                f"| {bpm} | {_f(q['ratio'], '.2f')} at {q['streams']}: {_met(q['agg_ok'])} | "
                f"{q['max_p99_ms']:.1f}: {_met(q['p99_ok'])} |"
            )
    return lines + [""]


def _q6(res: dict, ev: dict) -> list[str]:
    if not res.get("q6"):
        return []
    lines = [
        "## 6. Data stall: a simulated step (sleep) per batch",
        "",
        "Medians of the repeats; waiting = time inside `next()`.",
        "",
        "| num_workers | step ms | waiting for data | wait p99 ms | runs |",
        "|---|---|---|---|---|",
    ]
    for r in res["q6"]:
        if "stall_fraction" in r:
            runs = ", ".join(f"{x:.2%}" for x in r.get("runs", []))
            lines.append(
                f"| {r['workers']} | {r['step_ms']:g} | {r['stall_fraction']:.2%} | {r['wait_p99_ms']:.3f} | {runs} |"
            )
    q = ev.get("q6")
    if q:
        lines += [
            "",
            f"Target: < 1% at 20 ms steps: best {q['best']['stall_fraction']:.2%} (num_workers="
            f"{q['best']['workers']}): {_met(q['ok'])}.",
        ]
    return lines + [""]


def markdown(res: dict, ev: dict) -> str:
    c = res["corpus"]
    head = [
        f"# tokenfeed comparison suite ({res['scale']})",
        "",
        f"{res.get('when', '')}; {c['cpus']} CPUs; {res.get('machine', {}).get('platform', '')}. Corpus: the "
        f"standard library's `.py` files ({c['text_bytes'] / 1e6:.1f} MB), byte-level BPE {c['vocab']:,} "
        f"({c['stdlib_tokens'] / 1e6:.2f} M tokens), repeated {c['repeats']}x = {c['tokens'] / 1e6:.0f} M tokens; "
        f"seq_len {c['seq_len']}, batch {c['batch_size']}. Windows of {res['settings']['seconds']} s after "
        f"{res['settings']['warmup_batches']} warm-up batches, {res['settings']['repeats']} repeat(s). "
        "Figures on these shared 2-core machines move 10-40% between runs. Regenerate: "
        "`bash benchmarks/run_compare.sh`."
        + (
            f" Questions {res['rerun']} were rerun at {res['when']}, the rest kept from the run before."
            if res.get("rerun")
            else f" The run took {res.get('elapsed_s', 0) / 60:.1f} min."
        ),
        "",
    ]
    body = _summary(ev) + _q1(res, ev) + _q2(res, ev) + _q3(res) + _q4(ev) + _q5(res, ev) + _q6(res, ev)
    return "\n".join(head + body)


def write(name: str, res: dict, plot_python: str | None = None) -> tuple[Path, Path | None]:
    """Write ``<name>.md`` and ``<name>.png`` next to the JSON; their paths (the PNG's None when no
    environment could draw it). matplotlib is not a dependency of the project's environment: where
    it is missing, the plot is drawn by ``plot_python`` (the peers' ``.venv-bench``, whose ``bench``
    extra declares it) from the saved JSON."""
    ev = evaluate(res)
    md, png = RESULTS / f"{name}.md", RESULTS / f"{name}.png"
    md.write_text(markdown(res, ev) + "\n")
    try:
        from benchmarks.compare.plot import plot

        plot(res, ev, png)
        return md, png
    except ImportError as err:
        if plot_python is None:
            log.warning("no plot (%s); pass plot_python, an environment with matplotlib", err)
            return md, None
    data = RESULTS / f"{name}.json"
    proc = subprocess.run([plot_python, "-m", "benchmarks.compare.plot", str(data), str(png)], cwd=ROOT,
                          check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("the plot failed in %s: %s", plot_python, proc.stderr.strip()[-500:])
        return md, None
    return md, png
