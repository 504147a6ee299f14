"""A finished run launched again with a larger ``--max-steps`` continues from its last checkpoint (step + 1,
the exact next batches) and ends as the uninterrupted longer run does; an early-stopped run exits at once
unless ``--force-continue``. One rank against a real server (the stdlib corpus)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.test_trainer import global_hashes, metrics, run_hashes, train

pytestmark = pytest.mark.integration

#: A learning rate that does not depend on max_steps once warmed up: a cosine schedule ends at max_steps, so
#: an extended run's first steps had another schedule than an uninterrupted longer run's (see README).
FLAT = ["optim.min_lr_ratio=1", "eval.every=2", "--checkpoint-every", "100", "checkpoint.keep=1"]


@pytest.fixture(scope="module")
def server(module_servers: Any) -> str:
    return module_servers(None).address


def marker(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "COMPLETE").read_text())


def test_extending_a_finished_run_repeats_the_uninterrupted_longer_run(server: str, tmp_path: Path) -> None:
    run_dir, whole = tmp_path / "extended", tmp_path / "whole"
    train(1, server, run_dir, "--max-steps", "4", *FLAT)
    assert marker(run_dir)["step"] == 4
    out = train(1, server, run_dir, "--max-steps", "8", *FLAT)
    assert "extending run" in out and "(max_steps at step 4) to step 8" in out
    assert "resumed from checkpoint step 4 (saved by 1 ranks, now 1); next step 5" in out
    assert (marker(run_dir)["reason"], marker(run_dir)["step"]) == ("max_steps", 8)
    train(1, server, whole, "--max-steps", "8", *FLAT)
    got, want = metrics(run_dir), metrics(whole)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert run_hashes(got) == run_hashes(want) == global_hashes(server, 8)  # the exact next batches
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]
        assert a.get("eval_loss", 0) == pytest.approx(b.get("eval_loss", 0), rel=1e-5), a["step"]
    assert json.loads((run_dir / "final" / "config.json").read_text())["step"] == \
        json.loads((whole / "final" / "config.json").read_text())["step"]
    out = train(1, server, run_dir, "--max-steps", "8", *FLAT)  # not larger: nothing to do
    assert "already finished" in out and "Launch it with a --max-steps above its step" in out


def test_an_early_stopped_run_goes_on_only_when_forced(server: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "early"
    args = ["optim.lr=0", "eval.patience=2", *FLAT]
    train(1, server, run_dir, "--max-steps", "50", *args)  # evals at 2 (best), 4, 6: stop
    assert (marker(run_dir)["reason"], marker(run_dir)["step"]) == ("early_stop", 6)
    before = (run_dir / "metrics.jsonl").read_text()
    out = train(1, server, run_dir, "--max-steps", "50", *args)
    assert "already finished" in out and "--force-continue" in out
    assert (run_dir / "metrics.jsonl").read_text() == before
    out = train(1, server, run_dir, "--max-steps", "8", "--force-continue", *args)
    assert "resumed from checkpoint step 6" in out and "training on to step 8" in out
    lines = metrics(run_dir)
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert run_hashes(lines) == global_hashes(server, 8)
    assert (marker(run_dir)["reason"], marker(run_dir)["step"]) == ("max_steps", 8)
    # lr 0: no later eval beat step 2's, whose checkpoint the first finish removed: its export stays
    assert json.loads((run_dir / "final" / "config.json").read_text())["step"] == 2
