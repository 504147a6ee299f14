"""The README's main job: a data server on the embedded stdlib corpus feeding a short FSDP2
training on 2 CPU ranks, which is killed after a checkpoint, resumed, finished, and sampled.

    python -m scripts.main_job [--steps 600] [--ranks 2] [--run-dir runs/main]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Server

ROOT = Path(__file__).resolve().parents[1]


def torchrun(ranks: int, address: str, run_dir: Path, steps: int, every: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "trainer", "--address", address, "--dataset", "stdlib", "--run-dir", str(run_dir),
           "--max-steps", str(steps), "--checkpoint-every", str(every), "log_every=25", "eval.every=50"]
    return subprocess.Popen(cmd, cwd=ROOT)


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks (each rank runs in a session of its own), like a crash."""
    ranks = [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
             if _parent(stat) == job.pid]
    for pid in ranks + [job.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()
    for pid in ranks:  # a killed rank becomes a zombie of torchrun's, then is gone
        while Path(f"/proc/{pid}").exists() and _state(pid) not in ("Z", "X"):
            time.sleep(0.05)


def _parent(stat: Path) -> int:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def checkpoints(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    if not folder.exists():
        return []
    return sorted(int(p.name.split("_")[1]) for p in folder.glob("step_*") if not p.name.endswith(".tmp"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--run-dir", default="runs/main")
    args = parser.parse_args()
    run_dir = ROOT / args.run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    every, crash_after = 50, args.steps // 2
    with Server() as server:
        print(f"== data server on {server.address}, dataset 'stdlib' (the Python standard library)")
        print(f"== phase 1: training on {args.ranks} ranks; the job is killed after the checkpoint at step "
              f"{crash_after}")
        job = torchrun(args.ranks, server.address, run_dir, args.steps, every)
        while crash_after not in checkpoints(run_dir):
            if job.poll() is not None:
                raise SystemExit(f"training exited early with code {job.returncode}")
            time.sleep(0.5)  # polling a directory another process writes: no event to wait on
        kill_job(job)
        last = max(m["step"] for m in metrics(run_dir))
        print(f"== killed with SIGKILL at step {last}; newest checkpoint: step {max(checkpoints(run_dir))}")
        print("== phase 2: relaunching the same command: it resumes from the checkpoint")
        job = torchrun(args.ranks, server.address, run_dir, args.steps, every)
        if job.wait() != 0:
            raise SystemExit(f"training failed with code {job.returncode}")
    rows = metrics(run_dir)
    losses = {m["step"]: m["loss"] for m in rows}
    print("== loss by step:", ", ".join(f"{s}: {losses[s]:.3f}" for s in sorted(losses)
                                         if s == 1 or s % 50 == 0 or s == args.steps))
    waits = [m["data_wait_fraction"] for m in rows]
    speeds = [m["tokens_per_s"] for m in rows]
    print(f"== median data-wait fraction {statistics.median(waits):.2%}, "
          f"median {statistics.median(speeds):,.0f} tokens/s")
    print("== sample from the exported model (greedy):")
    subprocess.run([sys.executable, "-m", "trainer.generate", "--model", str(run_dir / "final"),
                    "--prompt", "def ", "--greedy", "--max-new-tokens", "200"], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
