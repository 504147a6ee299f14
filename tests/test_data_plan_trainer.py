"""The data plan in the trainer, 2 gloo ranks against a real server: a loss spike's recipe (resume
from an older checkpoint, pass over the data around the spike) by flags and by ``tokenfeed-plan``,
compared with the uninterrupted global order; a requeue or a crash neither rewinds nor skips twice."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from typing import Any

import pytest

from tests.test_trainer import ENV, ROOT, checkpoints, global_hashes, metrics, run_hashes, train
from trainer.plan_cli import main as plan_main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def plan_cli(*args: str, ok: bool = True, process: bool = False) -> str:
    """``tokenfeed-plan ARGS``: its output (stdout + stderr), checking its exit status. In this
    process unless ``process`` (each command's own process imports torch: ~2.5 s)."""
    if process:
        proc = subprocess.run([sys.executable, "-m", "trainer.plan_cli", *args], capture_output=True, text=True,
                              timeout=120, cwd=ROOT, env=ENV)
        assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = plan_main(list(args))
        except SystemExit as exit:  # argparse's refusals
            code = exit.code if isinstance(exit.code, int) else 2
    assert (code == 0) == ok, out.getvalue()
    return out.getvalue()


def test_rewind_and_skip_by_flag_and_offline_exactly_once(module_servers: Any, tmp_path: Any) -> None:
    server, run_dir = module_servers(None).address, tmp_path / "run"
    common = ["--checkpoint-every", "2", "eval.every=0", "checkpoint.keep=10"]
    train(2, server, run_dir, "--max-steps", "6", *common)
    (run_dir / "COMPLETE").unlink()
    out = train(1, server, run_dir, "--max-steps", "7", "--rewind-to", "7", ok=False)
    assert "--rewind-to 7: there is no checkpoint step 7" in out and "(there are: 6, 4, 2)" in out

    ckpt = run_dir / "checkpoints" / "step_00000002"
    shown = plan_cli("show", str(ckpt), process=True)  # (the command itself, once)
    assert "training step 2, 2 ranks" in shown and "data plan: no edits" in shown
    assert "--at-step 2 is in the past" in plan_cli("skip", "--at-step", "2", "--steps", "1", str(ckpt), ok=False)
    assert "must be 0 or more" in plan_cli("skip", "--at-step", "6", "--steps", "-1", str(ckpt), ok=False)
    assert "skip 1 global steps at step 5 (added offline" in plan_cli("skip", "--at-step", "6", "--steps", "1",
                                                                       str(ckpt))
    # resume from step 2: steps 3.. read what steps 6.. would have (flag), steps 6.. one more on (offline)
    flags = ["--rewind-to", "2", "--skip-data-steps", "3", *common]
    out = train(2, server, run_dir, "--max-steps", "8", *flags)
    assert "resumed from checkpoint step 2" in out
    assert sorted(int(p.name[5:]) for p in (run_dir / "checkpoints" / "rewound").glob("*/step_*")) == [4, 6]
    assert checkpoints(run_dir) == [2, 4, 6, 8]
    g = global_hashes(server, 28)  # 2 ranks: step t (from 1) reads global batches 2(t-1), 2(t-1)+1
    want = g[:4] + g[10:16] + g[18:24]
    assert run_hashes(metrics(run_dir)) == want

    # killed before its next checkpoint: a plain relaunch resumes from step 2 and applies both once more
    for step in (4, 6, 8):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step:08d}")
    (run_dir / "COMPLETE").unlink()
    out = train(2, server, run_dir, "--max-steps", "8", *common)
    assert "resumed from checkpoint step 2" in out
    assert run_hashes(metrics(run_dir)) == want

    # the same command again (a requeue): no second rewind, no second skip
    (run_dir / "COMPLETE").unlink()
    out = train(2, server, run_dir, "--max-steps", "10", *flags)
    assert "resumed from checkpoint step 8" in out and "set aside" not in out
    assert run_hashes(metrics(run_dir)) == want + g[24:28]
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 11))
    shown = plan_cli("show", str(run_dir / "checkpoints" / "step_00000010"))
    assert "skip 3 global steps at step 2 (applied)" in shown and "skip 1 global steps at step 5 (applied)" in shown


def test_a_spike_traced_by_provenance_is_excluded_rewound_and_the_run_finishes(module_servers: Any,
                                                                                 tmp_path: Any) -> None:
    """The README's worked example: step 4's documents (from provenance) excluded from step 3 on,
    the run rewound to step 2 and finished; it reads the global order without the rows that hold them."""
    import hashlib
    from itertools import islice

    import torch

    from client import Edit, StreamingDataset

    server, run_dir = module_servers(None).address, tmp_path / "run"
    common = ["--checkpoint-every", "2", "eval.every=0", "checkpoint.keep=10"]
    train(2, server, run_dir, "--max-steps", "4", *common)
    (run_dir / "COMPLETE").unlink()

    def stream(*edits: Edit, provenance: bool = False) -> StreamingDataset:
        ds = StreamingDataset(server, "stdlib", seq_len=64, batch_size=4, seed=0, world_size=1, rank=0,
                              provenance=provenance)
        for e in edits:
            ds.apply(e)
        return ds
    # training step 4 on 2 ranks read global batches 6 and 7: the spike's documents
    spike = list(islice(stream(provenance=True), 8))[6:]
    torch.save([b["provenance"] for b in spike], tmp_path / "dump.pt")
    ckpt = run_dir / "checkpoints" / "step_00000002"
    out = plan_cli("exclude", "--from-provenance", str(tmp_path / "dump.pt"), "--at-step", "3", str(ckpt))
    assert "exclusion(s) from training step 3" in out and "exclude document" in out
    assert "dataset 'stdlib' is not a mixture" in plan_cli("weights", "--at-step", "3", "web=1", str(ckpt), ok=False)
    assert "--at-step 2 is in the past" in plan_cli("exclude", "--shard", "0", "--at-step", "2", str(ckpt), ok=False)
    train(2, server, run_dir, "--max-steps", "6", "--rewind-to", "2", *common)
    docs = {(s, d) for b in spike for s, d in b["provenance"][:, [4, 5]].tolist()}
    want = stream(*(Edit.exclude(4, s, d) for s, d in sorted(docs)))  # training step 3 = global batch 4
    hashes = [hashlib.blake2b(b["input_ids"].numpy().astype("<i8").tobytes(), digest_size=6).hexdigest()
              for b in islice(want, 12)]
    assert run_hashes(metrics(run_dir)) == hashes
    assert "(applied)" in plan_cli("show", str(run_dir / "checkpoints" / "step_00000006"))
