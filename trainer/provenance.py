"""What made a checkpoint: code, library and data-server versions, world size and the dataset's identity."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from client import DatasetInfo


def tokenfeed_version() -> str:
    """The installed tokenfeed's version ("unknown" when run from a tree that is not installed)."""
    try:
        return importlib.metadata.version("tokenfeed")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the repository holding the trainer's code (``+dirty`` with local changes), or None
    when the code is not in a git repository (an installed wheel) or git is missing."""
    cwd = where or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_metadata(world_size: int, info: DatasetInfo, server_version: str) -> dict[str, Any]:
    """The metadata saved with every checkpoint and export, and sent to the tracker (JSON-able)."""
    return {
        "tokenfeed_version": tokenfeed_version(),
        "git_commit": git_commit(),
        "torch_version": str(torch.__version__),  # a TorchVersion, which torch.load(weights_only) refuses
        "python_version": platform.python_version(),
        "world_size": world_size,
        "data_server_version": server_version,
        "dataset": info.name,
        "dataset_fingerprint": info.fingerprint,
        "tokenizer": info.tokenizer,
    }
