"""The trainer end to end: 2 gloo ranks under torchrun against a real server on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
#: A model and batch small enough for 2 busy cores (2 layers, width 64, rows of 64, batches of 4).
TINY = ["model.layers=2", "model.width=64", "model.heads=4", "model.context=64", "data.seq_len=64",
        "data.batch_size=4", "optim.warmup_steps=2", "eval.batches=2", "log_every=1"]

pytestmark = pytest.mark.integration


def command(nproc: int, address: str, run_dir: Path, *extra: str) -> list[str]:
    """torchrun for several ranks; one rank runs plainly (``python -m trainer``, a world of one)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    return [sys.executable, *launcher, "-m", "trainer", "--address", address, "--run-dir", str(run_dir), *TINY, *extra]


def train(nproc: int, address: str, run_dir: Path, *extra: str, ok: bool = True) -> str:
    """Run the trainer to its end; returns its output (stdout + stderr)."""
    proc = subprocess.run(command(nproc, address, run_dir, *extra), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, f"exit {proc.returncode}:\n{out[-4000:]}"
    return out


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (torchrun starts each rank in a session of its own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL every rank and torchrun itself, and wait until the ranks are gone."""
    ranks = children(proc.pid)
    fds = [os.pidfd_open(pid) for pid in ranks]
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait(30)
    for fd in fds:
        select.select([fd], [], [], 30)  # readable once that process has exited
        os.close(fd)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit())


def global_hashes(address: str, n: int) -> list[str]:
    """The first ``n`` global batches of the training stream, fingerprinted (world size 1)."""
    from client import StreamingDataset

    ds = StreamingDataset(address, "stdlib", seq_len=64, batch_size=4, seed=0, rank=0, world_size=1)
    return [hashlib.blake2b(b["input_ids"].numpy().astype("<i8").tobytes(), digest_size=6).hexdigest()
            for b in islice(iter(ds), n)]


def run_hashes(lines: list[dict[str, Any]]) -> list[str]:
    return [h for line in sorted(lines, key=lambda r: r["step"]) for h in line["batch_hashes"]]


@pytest.fixture(scope="module")
def server(module_servers: Any) -> str:
    return module_servers(None).address


@pytest.fixture(scope="module")
def reference(server: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted 2-rank run of 12 steps: checkpoints every 4, eval every 4, keep 1."""
    run_dir = tmp_path_factory.mktemp("reference")
    out = train(2, server, run_dir, "--max-steps", "12", "--checkpoint-every", "4", "eval.every=4",
                "checkpoint.keep=1")
    return run_dir, out


def test_two_ranks_learn_log_and_export_the_best(reference: tuple[Path, str], server: str) -> None:
    run_dir, out = reference
    lines = metrics(run_dir)
    assert [r["step"] for r in lines] == list(range(1, 13))
    for r in lines:
        assert {"step", "loss", "lr", "tokens_per_s", "data_wait_fraction"} <= r.keys()
        assert r["world_size"] == 2 and len(r["batch_hashes"]) == 2 and 0 <= r["data_wait_fraction"] <= 1
    losses = [r["loss"] for r in lines]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert re.search(r"step 12/12 \| loss [\d.]+ \| lr [\d.e+-]+ \| \d+ tokens/s \| data wait", out)
    # the two ranks read global batches 0, 1, 2, ... in order
    assert run_hashes(lines) == global_hashes(server, 24)
    evals = {r["step"]: r["eval_loss"] for r in lines if "eval_loss" in r}
    assert sorted(evals) == [4, 8, 12]
    best = min(evals, key=evals.get)
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["step"] == best and config["eval_loss"] == pytest.approx(evals[best])
    assert config["vocab_size"] == 258 and (run_dir / "final" / "model.pt").is_file()
    marker = json.loads((run_dir / "COMPLETE").read_text())
    assert marker["reason"] == "max_steps" and marker["step"] == 12 and marker["best_step"] == best
    assert checkpoints(run_dir) == [12]  # keep=1, and the best was removed only after its export


def test_a_finished_run_exits_at_once(reference: tuple[Path, str], server: str) -> None:
    run_dir, _ = reference
    before = (run_dir / "metrics.jsonl").read_text()
    out = train(1, server, run_dir, "--max-steps", "12")  # (a larger one extends it: tests/test_extend_run.py)
    assert "already finished" in out and "nothing to do" in out
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_kill_then_resume_repeats_the_uninterrupted_run(reference: tuple[Path, str], server: str,
                                                        tmp_path: Path) -> None:
    ref_dir, _ = reference
    run_dir = tmp_path / "killed"
    args = command(2, server, run_dir, "--max-steps", "12", "--checkpoint-every", "4", "eval.every=4",
                   "checkpoint.keep=1")
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if (m := re.search(r"step (\d+)/12", line)) and int(m.group(1)) >= 6:
                break
    finally:
        kill_job(proc)  # every rank and torchrun: nothing is flushed, no save finishes
    assert not (run_dir / "COMPLETE").exists()
    saved = max(checkpoints(run_dir))
    assert 4 <= saved < 12

    out = train(2, server, run_dir, "--max-steps", "12", "--checkpoint-every", "4", "eval.every=4",
                "checkpoint.keep=1")
    assert f"resumed from checkpoint step {saved}" in out
    lines = metrics(run_dir)
    assert [r["step"] for r in lines] == list(range(1, 13))  # redone steps replaced, not duplicated
    assert min(r["step"] for r in lines if r["resumed_from"] == saved) == saved + 1
    ref = metrics(ref_dir)
    assert [r["batch_hashes"] for r in lines] == [r["batch_hashes"] for r in ref]
    for got, want in zip(lines, ref, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), got["step"]
        assert ("eval_loss" in got) == ("eval_loss" in want)
        assert got.get("eval_loss", 0) == pytest.approx(want.get("eval_loss", 0), rel=1e-5)
    assert json.loads((run_dir / "final" / "config.json").read_text())["step"] == \
        json.loads((ref_dir / "final" / "config.json").read_text())["step"]


@pytest.mark.slow
def test_resize_2_to_1_to_2_continues_the_global_sequence(server: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "elastic"
    common = ["--checkpoint-every", "100", "eval.every=0", "checkpoint.keep=1"]
    train(2, server, run_dir, "--max-steps", "3", *common)
    (run_dir / "COMPLETE").unlink()  # the documented way to train a finished run further
    out = train(1, server, run_dir, "--max-steps", "6", *common)
    assert "resumed from checkpoint step 3 (saved by 2 ranks, now 1); next step 4" in out
    (run_dir / "COMPLETE").unlink()
    out = train(2, server, run_dir, "--max-steps", "8", *common)
    assert "resumed from checkpoint step 6 (saved by 1 ranks, now 2); next step 7" in out
    lines = metrics(run_dir)
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert [r["world_size"] for r in lines] == [2] * 3 + [1] * 3 + [2] * 2
    # 6 + 3 + 4 global batches, no gap and no repeat
    assert run_hashes(lines) == global_hashes(server, 13)


def test_early_stop_exports_best_and_cleans_up_only_after_export(server: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "early"
    run_dir.mkdir()
    (run_dir / "final").write_text("in the way")  # the export cannot replace a file: it fails
    args = ["--max-steps", "50", "--checkpoint-every", "1", "optim.lr=0", "eval.every=2", "eval.patience=2",
            "checkpoint.keep=2"]
    out = train(2, server, run_dir, *args, ok=False)
    assert "every checkpoint is kept" in out
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 7))  # evals at 2 (best), 4, 6: stop
    assert checkpoints(run_dir) == [2, 5, 6] and not (run_dir / "COMPLETE").exists()

    (run_dir / "final").unlink()
    out = train(2, server, run_dir, *args)
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 7))  # no training: it had stopped
    assert json.loads((run_dir / "final" / "config.json").read_text())["step"] == 2
    marker = json.loads((run_dir / "COMPLETE").read_text())
    assert (marker["reason"], marker["step"], marker["best_step"]) == ("early_stop", 6, 2)
    assert checkpoints(run_dir) == [5, 6]


@pytest.mark.slow
def test_damaged_checkpoints_are_skipped_and_other_shapes_refused(server: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "damaged"
    common = ["--checkpoint-every", "2", "eval.every=0", "checkpoint.keep=3"]
    train(2, server, run_dir, "--max-steps", "6", *common)
    first = {r["step"]: r for r in metrics(run_dir)}
    assert checkpoints(run_dir) == [2, 4, 6]
    (run_dir / "COMPLETE").unlink()
    shard = run_dir / "checkpoints" / "step_00000006" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    meta = run_dir / "checkpoints" / "step_00000004" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:10])  # a torn write
    (run_dir / "checkpoints" / "step_00000008.tmp").mkdir()  # a save killed half way

    out = train(2, server, run_dir, "--max-steps", "6", *common)  # the same schedule: the same losses
    assert re.search(r"skipping checkpoint \S+step_00000006: __1_0.distcp does not match its sha256", out)
    assert re.search(r"skipping checkpoint \S+step_00000004: .metadata has 10 bytes", out)
    assert "removing partial checkpoint" in out and "resumed from checkpoint step 2" in out
    metrics_after = {r["step"]: r for r in metrics(run_dir)}
    assert sorted(metrics_after) == list(range(1, 7))
    for step in range(3, 7):  # redone from the valid checkpoint: the same batches, the same losses
        assert metrics_after[step]["batch_hashes"] == first[step]["batch_hashes"]
        assert metrics_after[step]["loss"] == pytest.approx(first[step]["loss"], rel=1e-5)

    (run_dir / "COMPLETE").unlink()
    out = train(1, server, run_dir, "--max-steps", "10", *common, "model.width=32", ok=False)
    assert "another shape (width: checkpoint 64 vs config 32)" in out


def test_unreachable_server_fails_fast_naming_it(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nobody listens there
    proc = subprocess.run([sys.executable, "-m", "trainer", "--address", f"127.0.0.1:{port}", "--run-dir",
                           str(tmp_path / "run"), "data.reconnect_deadline_s=1"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"cannot reach the tokenfeed server at 127.0.0.1:{port}" in proc.stderr
    assert "data.reconnect_deadline_s=1s" in proc.stderr
