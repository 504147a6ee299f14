"""DCP checkpoints of model, optimizer and loop state, written atomically and verified on load.

Layout under ``RUN_DIR/checkpoints``::

    step_00000040/          a complete checkpoint (a directory only ever appears by rename)
        .metadata           DCP's index: every tensor's global shape and its chunks, so any world
        __0_0.distcp ...    size can load it (DCP reshards)
        manifest.json       step, model shape, world size, size and sha256 of every file
    step_00000050.tmp/      a save in progress (or killed): never chosen, removed at the next start

The loop state (step, scheduler, every rank's data cursor and RNG states, best eval) is one
JSON string inside the DCP checkpoint, identical on every rank.

Durability: every file is fsynced by the rank that wrote it, then the ``.tmp`` directory, then it is
renamed and its parent directory fsynced; only then are older checkpoints pruned. Without that order
a power loss can persist the rename before the data (an empty or torn checkpoint) after the older
ones are already gone. A save that fails on any rank fails on every rank (``CheckpointError``),
within seconds, rather than leaving the others blocked until the process-group timeout.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer.parallelize import Runtime

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_NAME = re.compile(r"^step_(\d{8})$")
_T = TypeVar("_T")


class CheckpointMismatch(ValueError):
    """A checkpoint that is intact but cannot load into this model (another shape)."""


class CheckpointError(RuntimeError):
    """A save that failed on at least one rank, raised on every rank alike (so none waits for the rest).

    ``failures`` maps each failed rank to what went wrong there. The step's ``.tmp`` directory is
    removed and the checkpoints saved before it are untouched.
    """

    def __init__(self, step: int, stage: str, failures: dict[int, str]) -> None:
        self.step, self.stage, self.failures = step, stage, failures
        why = "; ".join(f"rank {rank}: {err}" for rank, err in sorted(failures.items()))
        super().__init__(
            f"checkpoint step {step} was not saved: {stage} failed on rank {', '.join(map(str, sorted(failures)))} "
            f"({why}). The checkpoints saved before it are untouched; fix the cause (disk space, permissions) "
            "and relaunch to resume from the newest one")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints (by name; not yet verified), newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def remove_partial(root: Path) -> None:
    """Delete ``*.tmp`` directories left by a save that was killed (call before any save starts)."""
    if root.is_dir():
        for p in root.glob("step_*.tmp"):
            log.warning("removing partial checkpoint %s (a save was interrupted)", p)
            shutil.rmtree(p, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (files created, renamed or removed in it), to the
    disk so they survive a power loss. A file is flushed by the rank that wrote it: on shared storage
    such as NFS another client's fsync does not flush this one's cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    """Write ``path`` and flush it to the disk; an error names the file (a failed flush does not)."""
    try:
        with path.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err


def _own_files(tmp: Path, rt: Runtime) -> list[Path]:
    """The files this rank wrote into a DCP save: its ``__<rank>_*.distcp``, and ``.metadata`` on rank 0."""
    mine = sorted(tmp.glob(f"__{rt.rank}_*.distcp"))
    return [*mine, tmp / ".metadata"] if rt.is_main else mine


def _attempt(work: Callable[[], _T]) -> tuple[_T | None, str | None]:
    """Run this rank's part of a save step: ``(result, None)``, or ``(None, why it failed)``."""
    try:
        return work(), None
    except Exception as err:  # noqa: BLE001 -- told to every rank by _agree, which raises it there
        return None, f"{type(err).__name__}: {err}"


def _fail(step: int, stage: str, failures: dict[int, str], tmp: Path, rt: Runtime) -> CheckpointError:
    """Remove the partial save (rank 0; every rank is past its writes by now) and build the error."""
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        log.error("checkpoint step %d failed while %s; removed %s", step, stage, tmp)
    return CheckpointError(step, stage, failures)


def _agree(step: int, stage: str, error: str | None, tmp: Path, rt: Runtime) -> None:
    """Every rank reports how its part of ``stage`` went; if any failed, every rank raises.

    Why: a rank that raised alone would leave the others blocked in the save's next collective until
    the process-group timeout (30 minutes by default). This gather is that next collective, so they
    all learn of the failure at once and fail together, naming the rank and the cause.
    """
    errors: list[Any] = [None] * rt.world_size
    dist.all_gather_object(errors, error)
    failures = {rank: e for rank, e in enumerate(errors) if e is not None}
    if failures:
        raise _fail(step, stage, failures, tmp, rt)


def _prepare(root: Path, tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             rt: Runtime) -> dict[str, Any]:
    """This rank's state dict; rank 0 also makes an empty ``tmp`` (with ``root`` durably in its parent)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        _fsync(root.parent)  # the first save creates root: its entry must outlive a power loss too
        tmp.mkdir()
    return {"model": model_sd, "optim": optim_sd}


def _write_dcp(state: dict[str, Any], step: int, tmp: Path, rt: Runtime) -> None:
    """DCP's collective write. It gathers every rank's write error itself and raises the same
    ``CheckpointException`` on all ranks, so only the translation to ``CheckpointError`` is ours."""
    try:
        dcp.save(state, checkpoint_id=tmp)
    except CheckpointException as err:  # a BaseException: an `except Exception` would miss it
        failures = {rank: f"{type(exc).__name__}: {exc}" for rank, (exc, _trace) in err.failures.items()}
        raise _fail(step, "writing the DCP files", failures, tmp, rt) from None


def _sync_and_hash(tmp: Path, rt: Runtime) -> dict[str, dict[str, Any]]:
    """fsync this rank's own files, then hash its round-robin share of all of them (for the manifest)."""
    for path in _own_files(tmp, rt):
        _fsync(path)
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for i, p in enumerate(files) if i % rt.world_size == rt.rank}


def _publish(root: Path, tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Rank 0: write and fsync the manifest, fsync ``tmp``, rename it to ``final``, fsync ``root``.

    After this returns the checkpoint survives a power loss; before the rename it never appears.
    """
    _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1))
    _fsync(tmp)  # the entries of every rank's files (all fsynced by their writers by now)
    if final.exists():  # left by a run that fell back past it: it was found invalid
        shutil.rmtree(final)
    os.rename(tmp, final)  # atomic: the checkpoint exists completely or not at all
    _fsync(root)  # the rename itself


def _prune_after_save(root: Path, step: int, keep: int, protect: Collection[int]) -> list[int]:
    """Rank 0, once ``step`` is durable: prune, never removing ``step`` itself. A failure to delete
    old checkpoints costs disk space, not the run, so it is logged rather than raised."""
    try:
        return prune(root, keep, protect={step, *protect})
    except OSError as err:
        log.warning("checkpoint step %d is saved, but pruning older checkpoints in %s failed (%s); they "
                    "stay until the next save", step, root, err)
        return []


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, loop_state: dict[str, Any],
         shape: dict[str, int], rt: Runtime, keep: int | None = None, protect: Collection[int] = (),
         metadata: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` (collective). It appears under its final name only when complete and
    durable; then, with ``keep``, the older checkpoints beyond the newest ``keep`` (and not in
    ``protect``) are deleted. The checkpoint just written is never deleted.

    ``loop_state`` must be JSON-able and identical on every rank (gather per-rank parts first).
    ``metadata`` (what made the checkpoint: versions, dataset identity) goes into its manifest.

    Raises:
        CheckpointError: on every rank, when any rank's part failed (no rank is left waiting); the
            partial save is removed and the older checkpoints are untouched.
    """
    tmp, final = root / f"step_{step:08d}.tmp", step_dir(root, step)
    start = time.perf_counter()
    state, error = _attempt(lambda: _prepare(root, tmp, model, optimizer, rt))
    _agree(step, "preparing the save", error, tmp, rt)
    assert state is not None
    _write_dcp({**state, "loop": json.dumps(loop_state)}, step, tmp, rt)
    mine, error = _attempt(lambda: _sync_and_hash(tmp, rt))
    _agree(step, "syncing and hashing the files", error, tmp, rt)
    parts: list[Any] = [None] * rt.world_size
    dist.all_gather_object(parts, mine)
    error = None
    if rt.is_main:
        manifest = {"step": step, "shape": shape, "world_size": rt.world_size,
                    "files": {k: v for part in parts for k, v in part.items()}, "created": time.time(),
                    "metadata": metadata or {}}
        _, error = _attempt(lambda: _publish(root, tmp, final, manifest))
    _agree(step, f"writing {MANIFEST} and renaming the directory", error, tmp, rt)
    if rt.is_main:
        removed = _prune_after_save(root, step, keep, protect) if keep is not None else []
        log.info("checkpoint step %d saved to %s in %.2fs%s", step, final, time.perf_counter() - start,
                 f"; removed checkpoints {removed}" if removed else "")
    return final


def _check_files(path: Path, rt: Runtime) -> str | None:
    """Why the checkpoint at ``path`` is damaged, or None when every file matches its manifest."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST}: {err}"
    if ".metadata" not in files:
        return "no DCP .metadata recorded"
    for i, name in enumerate(sorted(files)):
        if i % rt.world_size != rt.rank:
            continue
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != files[name]["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {files[name]['bytes']}"
        if _sha256(p) != files[name]["sha256"]:
            return f"{name} does not match its sha256"
    return None


def verify(path: Path, rt: Runtime) -> str | None:
    """Collective integrity check (each rank hashes a share): the first problem found, or None."""
    problems: list[Any] = [None] * rt.world_size
    dist.all_gather_object(problems, _check_files(path, rt))
    return next((p for p in problems if p), None)


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def check_shape(path: Path, shape: dict[str, int]) -> None:
    """Refuse a checkpoint written for another model shape, saying what differs."""
    saved = read_manifest(path)["shape"]
    if saved != shape:
        diff = ", ".join(f"{k}: checkpoint {saved.get(k)} vs config {shape.get(k)}"
                         for k in sorted(set(saved) | set(shape)) if saved.get(k) != shape.get(k))
        raise CheckpointMismatch(
            f"checkpoint {path} holds a model of another shape ({diff}); set the model config it was "
            "trained with, or start a new run_dir")


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load checkpoint ``path`` into the (sharded) model and optimizer; returns its loop state.

    Raises:
        torch.distributed.checkpoint.api.CheckpointException: a rank failed to read (a BaseException).
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd, "loop": ""}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads(state["loop"])


def load_latest(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, shape: dict[str, int],
                rt: Runtime) -> tuple[int, dict[str, Any]] | None:
    """Load the newest valid checkpoint, skipping damaged ones with a warning (collective).

    Returns ``(step, loop_state)``, or None when there is none.

    Raises:
        CheckpointMismatch: the newest intact checkpoint is for another model shape.
    """
    names: list[Any] = [list_checkpoints(root) if rt.is_main else None]
    dist.broadcast_object_list(names, src=0)  # one rank lists, so all try the same candidates
    for step, path in names[0]:
        problem = verify(path, rt)
        if problem is None:
            check_shape(path, shape)
            try:
                return step, load(path, model, optimizer)
            except CheckpointException as err:  # raised on every rank alike
                problem = f"DCP could not load it: {str(err)[:500]}"
        if rt.is_main:
            log.warning("skipping checkpoint %s: %s; trying the previous one", path, problem)
    return None


def prune(root: Path, keep: int, protect: Collection[int] = ()) -> list[int]:
    """Delete all but the newest ``keep`` checkpoints and those in ``protect``; returns the removed steps.

    Call it only once the newest checkpoint is durable (``save`` does, with ``keep``), and protect the
    step just saved: a newer-named checkpoint left by a run that fell back past it counts as "newest".
    """
    removed = []
    for i, (step, path) in enumerate(list_checkpoints(root)):
        if i >= keep and step not in protect:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(step)
    return removed


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, Python, numpy) as JSON-able values."""
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy tuple form, the default
    kind, keys, pos, has_gauss, gauss = np_state
    return {"torch": b64(torch.get_rng_state()),
            "cuda": b64(torch.cuda.get_rng_state().cpu()) if torch.cuda.is_available() else None,
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}


def restore_rng(state: dict[str, Any]) -> None:
    """Undo ``capture_rng`` (the CUDA state only where there is a GPU)."""
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
