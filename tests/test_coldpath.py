"""bench_coldpath at a tiny scale (issue 23, goal 3): both sides run, in alternating order, and each
repeat reports the figures the closing note quotes; the real run is ``python -m benchmarks.bench_coldpath``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from benchmarks.bench_coldpath import corpus_config, documents, epoch_batches, one_repeat, tokenizer_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_coldpath_repeats_alternate_and_report_ratios(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the trained BPE is kept in the temporary directory
    for i in range(12):
        (tmp_path / f"doc{i}.py").write_text(f"def f{i}(x):\n    return x * {i}  # a small document\n" * (40 + i))
    paths = [str(tmp_path / "*.py")]
    shards = documents(corpus_config(paths, 2, None))
    assert len(shards) > 1
    tokenizer = tokenizer_file(shards)
    assert tokenizer.startswith(str(tmp_path)) and tokenizer_file(shards) == tokenizer  # trained once
    cfg, batches = corpus_config(paths, 2, tokenizer), epoch_batches(tokenizer, shards)
    assert batches > 0
    runs = [one_repeat(i, tokenizer, shards, cfg, batches) for i in range(2)]
    assert [r["order"] for r in runs] == [["bare", "server"], ["server", "bare"]]
    for run in runs:
        bare, cold = run["bare"], run["server"]["cold"]
        assert run["throughput_ratio"] == pytest.approx(bare["seconds"] / cold["seconds"])
        assert bare["cpu_s_per_m_tokens"] > 0 and cold["cpu_s_per_m_tokens"] > 0 and run["cpu_per_token_ratio"] > 0
        for side in (bare, run["server"]):
            assert side["loadavg_before"] >= 0 and side["others_cores_busy"] >= 0 and side["stolen_cores"] >= 0
        assert run["server"]["stats"]["source_reads"] == len(shards)  # epoch 1 came from the cache
