"""Checkpoints are durable before older ones are pruned, and a save that fails on one rank fails on all.

Each test runs a 2-rank gloo job on 127.0.0.1 whose ranks are subprocesses running this file as a
script (``python tests/test_checkpoint_durability.py SCENARIO RANK PORT ROOT``). A rank trains a tiny
FSDP model one step, saves step 1, trains another step and saves step 2 under its scenario, printing
one JSON line per event; after a failed save it waits for "go" on stdin (so the test sees every rank
fail while all are still alive), then both load the newest valid checkpoint together.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
#: How long a failed save may keep any rank (the process-group timeout is gloo's default, 30 minutes).
FAIL_WITHIN_S = 20.0
STALE = 9  # a newer-named checkpoint left behind by a run that fell back past it


# ---- one rank (run as a script) --------------------------------------------------------------

def _say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _tiny(rt: Any) -> tuple[Any, Any, dict[str, int]]:
    """A 1-block GPT sharded over the job, its AdamW, and its shape."""
    import torch

    from trainer.config import ModelConfig
    from trainer.model import build_model, shape_of
    from trainer.parallelize import shard_model

    cfg = ModelConfig(layers=1, width=16, heads=2, context=8)
    model = shard_model(build_model(cfg, 32, seed=0, device=rt.device), rt.mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), shape_of(cfg, 32)


def _train_step(model: Any, optimizer: Any, seed: int) -> None:
    import torch

    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(seed))
    model(ids, torch.arange(8).expand(2, 8)).float().logsumexp(-1).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _fingerprint(model: Any) -> float:
    """The full model's parameter sum (collective): equal only if the weights are."""
    return sum(float(p.detach().full_tensor().double().sum()) for p in model.parameters())


class _Recorder:
    """Records ``os.fsync`` (by the path of its descriptor), ``os.rename`` and ``shutil.rmtree`` with a
    host-wide monotonic clock, so the two ranks' events can be merged in order."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str, str, str]] = []
        self._saved = (os.fsync, os.rename, shutil.rmtree)

    def install(self) -> _Recorder:
        fsync, rename, rmtree = self._saved

        def rec_fsync(fd: int) -> None:
            fsync(fd)
            self.events.append((time.monotonic_ns(), "fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))

        def rec_rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            rename(src, dst, *args, **kwargs)
            self.events.append((time.monotonic_ns(), "rename", str(src), str(dst)))

        def rec_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
            self.events.append((time.monotonic_ns(), "rmtree", str(path), ""))
            rmtree(path, *args, **kwargs)

        os.fsync, os.rename, shutil.rmtree = rec_fsync, rec_rename, rec_rmtree  # type: ignore[assignment]
        return self

    def remove(self) -> None:
        os.fsync, os.rename, shutil.rmtree = self._saved  # type: ignore[assignment]


def _limit_file_size(limit: int) -> None:
    """Files this process writes cannot grow past ``limit`` bytes: a write beyond fails with EFBIG
    (SIGXFSZ, which would kill the process instead, is ignored). Pipes are not affected."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _unlimit_file_size() -> None:
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))


def _fill_disk_after_dcp() -> None:
    """From the moment DCP's files are all written, this process can write no file byte: the disk is
    full for what comes next on this rank (the manifest)."""
    import torch.distributed.checkpoint as dcp

    write = dcp.save

    def then_full(*args: Any, **kwargs: Any) -> Any:
        result = write(*args, **kwargs)
        _limit_file_size(0)
        return result

    dcp.save = then_full


def _arrange(scenario: str, rank: int, root: Path) -> None:
    """What goes wrong on this rank in save 2."""
    if rank != 0:
        return
    if scenario == "dcp-efbig":
        _limit_file_size(1024)  # smaller than rank 0's DCP shard file
    elif scenario == "manifest-efbig":
        _fill_disk_after_dcp()
    elif scenario == "ordered":
        (root / f"step_{STALE:08d}").mkdir()  # no manifest: found invalid, and newest by name


def _worker(scenario: str, rank: int, port: int, root: Path) -> int:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from trainer import checkpoint
    from trainer.parallelize import init_distributed, shutdown_distributed

    rt = init_distributed()
    model, optimizer, shape = _tiny(rt)
    _train_step(model, optimizer, seed=rank)
    checkpoint.save(root, 1, model, optimizer, {"fingerprint": _fingerprint(model)}, shape, rt, keep=1)
    _train_step(model, optimizer, seed=10 + rank)  # the weights in memory now differ from step 1's
    saving = _fingerprint(model)
    _arrange(scenario, rank, root)
    recorder = _Recorder().install() if scenario == "ordered" else None
    _say("saving")
    start = time.monotonic()
    try:
        checkpoint.save(root, 2, model, optimizer, {"fingerprint": saving}, shape, rt, keep=1)
        _say("saved", elapsed=time.monotonic() - start, events=recorder.events if recorder else [])
    except BaseException as err:  # noqa: BLE001 -- reported, whatever it is (DCP's exception is a BaseException)
        _say("failed", elapsed=time.monotonic() - start, error=f"{type(err).__name__}: {err}")
        _unlimit_file_size()
        sys.stdin.readline()  # "go": the test has seen every rank fail
    finally:
        if recorder is not None:
            recorder.remove()
    found = checkpoint.load_latest(root, model, optimizer, shape, rt)
    assert found is not None
    _say("loaded", step=found[0], same_weights=found[1]["fingerprint"] == _fingerprint(model))
    shutdown_distributed()
    return 0


# ---- the tests: start a job, read its events -------------------------------------------------

class Job:
    """Two ranks of ``scenario`` as subprocesses; their stdout JSON lines are read by threads."""

    def __init__(self, scenario: str, root: Path) -> None:
        from trainer.parallelize import _free_port

        root.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.procs = [subprocess.Popen([sys.executable, __file__, scenario, str(rank), str(port), str(root)],
                                       cwd=ROOT, env=ENV, text=True, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
        self.lines: list[queue.Queue[dict[str, Any]]] = [queue.Queue() for _ in self.procs]
        self.logs: list[list[str]] = [[] for _ in self.procs]
        for rank, proc in enumerate(self.procs):
            threading.Thread(target=self._pump, args=(proc, rank), daemon=True).start()
            threading.Thread(target=self._collect, args=(proc, rank), daemon=True).start()

    def _pump(self, proc: subprocess.Popen, rank: int) -> None:
        for line in proc.stdout:
            self.lines[rank].put(json.loads(line))
        self.lines[rank].put({"event": "exited"})  # output closed: a waiter learns at once, not at its deadline

    def _collect(self, proc: subprocess.Popen, rank: int) -> None:
        for line in proc.stderr:
            self.logs[rank].append(line)

    def expect(self, event: str, timeout: float) -> list[dict[str, Any]]:
        """Every rank's next event, which must be ``event``, all within ``timeout`` seconds."""
        deadline, got = time.monotonic() + timeout, []
        for rank, lines in enumerate(self.lines):
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"rank {rank} did not report {event!r} within {timeout:.0f} s; its log:\n"
                                     + "".join(self.logs[rank][-30:])) from None
            assert line["event"] == event, f"rank {rank}: {line} instead of {event!r}; its log:\n" + "".join(
                self.logs[rank][-30:])
            got.append(line)
        return got

    def tell(self, text: str) -> None:
        for proc in self.procs:
            proc.stdin.write(text + "\n")
            proc.stdin.flush()

    def finish(self, timeout: float = 60.0) -> None:
        for rank, proc in enumerate(self.procs):
            assert proc.wait(timeout) == 0, f"rank {rank} exited {proc.returncode}:\n" + "".join(self.logs[rank][-30:])

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)


def run_job(scenario: str, root: Path, middle: Callable[[Job], Any]) -> Any:
    """Start the job, wait for both ranks to start save 2, apply ``middle``, then let it finish."""
    job = Job(scenario, root)
    try:
        job.expect("saving", timeout=120)
        result = middle(job)
        job.finish()
        return result
    finally:
        job.kill()


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def fail_together(job: Job) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Both ranks must report the failed save (while both are alive), then load together."""
    failed = job.expect("failed", timeout=FAIL_WITHIN_S + 10)
    job.tell("go")
    return failed, job.expect("loaded", timeout=60)


def check_failed_together(failed: list[dict[str, Any]], loaded: list[dict[str, Any]], root: Path,
                          stage: str) -> None:
    for rank, line in enumerate(failed):
        assert line["elapsed"] < FAIL_WITHIN_S, (rank, line)
        assert line["error"].startswith("CheckpointError: checkpoint step 2 was not saved"), (rank, line)
        assert f"{stage} failed on rank 0 (rank 0: " in line["error"] and "File too large" in line["error"], line
    assert failed[0]["error"] == failed[1]["error"]  # the same account of what happened, on every rank
    assert names(root) == ["step_00000001"]  # no step_00000002, no step_00000002.tmp
    assert [(x["step"], x["same_weights"]) for x in loaded] == [(1, True), (1, True)]  # the older one loads


@pytest.fixture(scope="module")
def ordered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    """A job whose save 2 (keep=1, with a stale newer-named leftover) succeeds, with its fsync/rename
    events recorded on both ranks; then both load the newest valid checkpoint."""
    root = tmp_path_factory.mktemp("ordered") / "checkpoints"
    saved, loaded = run_job("ordered", root, lambda job: (job.expect("saved", 60), job.expect("loaded", 60)))
    return root, saved, loaded


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_every_file_is_fsynced_before_the_rename_and_pruning_comes_last(
        ordered: tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    root, saved, _ = ordered
    tmp, final, old = (str(root / n) for n in ("step_00000002.tmp", "step_00000002", "step_00000001"))
    events = sorted((*e, rank) for rank, line in enumerate(saved) for e in line["events"])
    when = {(kind, a, b, rank): t for t, kind, a, b, rank in events}
    renamed = when[("rename", tmp, final, 0)]
    files = names(Path(final))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "manifest.json"} <= set(files)
    writer = {name: int(name[2]) if name.startswith("__") else 0 for name in files}  # .metadata, manifest: 0
    synced = {name: when.get(("fsync", f"{tmp}/{name}", "", writer[name])) for name in files}
    assert all(t is not None and t < renamed for t in synced.values()), synced  # each by its writer, before
    dir_synced = when[("fsync", tmp, "", 0)]
    assert max(synced.values()) < dir_synced < renamed  # the directory after its last file's entry
    root_synced = min(t for (kind, a, _, rank), t in when.items() if (kind, a, rank) == ("fsync", str(root), 0)
                      and t > renamed)
    assert renamed < root_synced < when[("rmtree", old, "", 0)]  # prune only once the rename is durable


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_the_new_checkpoint_is_kept_and_loads_even_with_a_newer_named_leftover(
        ordered: tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    root, saved, loaded = ordered
    # keep=1 counts the leftover step 9 as the newest; the checkpoint just saved must survive anyway
    assert names(root) == ["step_00000002", f"step_{STALE:08d}"]
    manifest = json.loads((root / "step_00000002" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(set(names(root / "step_00000002")) - {"manifest.json"})
    assert [(x["step"], x["same_weights"]) for x in loaded] == [(2, True), (2, True)]  # verified, then loaded


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_disk_full_writing_the_manifest_on_rank_0_fails_every_rank_within_seconds(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    failed, loaded = run_job("manifest-efbig", root, fail_together)
    check_failed_together(failed, loaded, root, "writing manifest.json and renaming the directory")


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_disk_full_in_the_dcp_write_on_rank_0_fails_every_rank_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    failed, loaded = run_job("dcp-efbig", root, fail_together)
    check_failed_together(failed, loaded, root, "writing the DCP files")


if __name__ == "__main__":
    _scenario, _rank, _port, _root = sys.argv[1:]
    sys.exit(_worker(_scenario, int(_rank), int(_port), Path(_root)))
