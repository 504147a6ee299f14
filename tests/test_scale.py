"""bench_scale at a tiny scale (issue 23, goals 2, 4 and 5): every part runs and reports the
figures the README quotes; the long runs are ``python -m benchmarks.bench_scale [--quick]``."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_scale import big_files, jobstart, many_files, per_shard_memory, ranks, resume, startup

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_scale_runs_every_part_at_a_tiny_scale(tmp_path):
    corpora, work = tmp_path / "corpora", tmp_path / "work"
    work.mkdir()
    files = {f"files={n}": many_files(corpora, n) for n in (20, 60)}
    up = startup(files, work, repeats=1)
    assert [up[k]["files"] for k in files] == [20, 60]
    for row in up.values():
        assert 0 < row["listing_s"] and 0 < row["build_warm_s"] and row["warm_over_listing"] > 0
        assert row["warm_over_listing_cpu"] > 0 and len(row["build_runs"]["warm"]) == 3
        assert row["process_warm"]["first_batch_s"] >= row["process_warm"]["listening_s"] > 0
        assert row["process_warm"]["rss_mib"] > 0
    assert per_shard_memory(up) is not None

    back = resume(many_files(corpora, 60), work, repeats=1)
    assert back["shards"] == 60 and back["first_batch_after_load_s"]["0.99"] > 0

    corpus = big_files(corpora, 1, files=8)
    many = ranks(corpus, work, [1, 4], repeats=1, seconds=0.5, procs=2)  # 2: still ranks in several processes
    for w in ("1", "4"):
        row = many["by_ranks"][w]
        assert row["errors"] == [] and row["tokens_per_s"] > 0 and row["gap_p99_ms"] is not None, row
    start = jobstart(corpus, work, [4, 8], replicas=2, procs=1)
    for row in start["by_ranks"].values():
        for kind in ("cold", "warm"):
            assert row[kind]["errors"] == [] and row[kind]["all_first_batch_s"] > 0, row
    assert start["growth"]["ranks"] == 2
    print(json.dumps({"startup": {k: v["warm_over_listing"] for k, v in up.items()}, "jobstart": start["growth"]}))
