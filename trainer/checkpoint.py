"""DCP checkpoints of model, optimizer and loop state, written atomically and verified on load.

Layout under ``RUN_DIR/checkpoints``::

    step_00000040/          a complete checkpoint (a directory only ever appears by rename)
        .metadata           DCP's index: every tensor's global shape and its chunks, so any world
        __0_0.distcp ...    size can load it (DCP reshards)
        manifest.json       step, model shape, world size, size and sha256 of every file
    step_00000050.tmp/      a save in progress (or killed): never chosen, removed at the next start

The loop state (step, scheduler, every rank's data cursor and RNG states, best eval) is one
JSON string inside the DCP checkpoint, identical on every rank.
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
from collections.abc import Collection
from pathlib import Path
from typing import Any

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


class CheckpointMismatch(ValueError):
    """A checkpoint that is intact but cannot load into this model (another shape)."""


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_share(files: list[Path], rt: Runtime) -> dict[str, dict[str, Any]]:
    """Hash this rank's share of ``files`` (round robin) and gather every rank's answer."""
    mine = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for i, p in enumerate(files) if i % rt.world_size == rt.rank}
    parts: list[Any] = [None] * rt.world_size
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, loop_state: dict[str, Any],
         shape: dict[str, int], rt: Runtime) -> Path:
    """Write checkpoint ``step`` (collective). It appears under its final name only when complete.

    ``loop_state`` must be JSON-able and identical on every rank (gather per-rank parts first).
    """
    tmp, final = root / f"step_{step:08d}.tmp", step_dir(root, step)
    start = time.perf_counter()
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "loop": json.dumps(loop_state)}, checkpoint_id=tmp)
    dist.barrier()  # every rank's files are written
    files = _hash_share(sorted(p for p in tmp.iterdir() if p.is_file()), rt)
    if rt.is_main:
        manifest = {"step": step, "shape": shape, "world_size": rt.world_size, "files": files,
                    "created": time.time()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # left by a run that fell back past it: it was found invalid
            shutil.rmtree(final)
        os.rename(tmp, final)  # atomic: the checkpoint exists completely or not at all
        _fsync_dir(root)
        log.info("checkpoint step %d saved to %s in %.2fs", step, final, time.perf_counter() - start)
    dist.barrier()
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
    """Delete all but the newest ``keep`` checkpoints and those in ``protect``; returns the removed steps."""
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
