"""Where ``prepare`` writes: a local directory, or a prefix in an object store (``--out
s3://bucket/prepared``). The same files either way (shard files, ``plan.json`` while unfinished,
``manifest.json`` last, which marks the preparation complete), written so that a reader or a
resumed run never sees half a file: locally a temporary file renamed into place, in a store one
PUT per object (visible whole or not at all).

Progress (which shards are finished, for a resumed run) is a JSON-lines file appended locally;
an object cannot be appended to, so in a store each finished shard gets a small entry object
under ``progress/``. Either is dropped once the manifest is written.
"""

from __future__ import annotations

import json
import os
from typing import Any

from server.stages.files import is_url
from server.stages.storage import Storage, join

PROGRESS = "progress.jsonl"   # local: one line per finished shard
PROGRESS_DIR = "progress"     # object store: one object per finished shard


class OutDir:
    """A preparation's output location."""

    def __init__(self, where: str, storage_options: dict[str, Any] | None = None) -> None:
        self.remote = is_url(where)
        self.where = where.rstrip("/") if self.remote else os.path.abspath(os.path.expanduser(where))
        self._fs = Storage(storage_options).fs(self.where) if self.remote else None
        self._progress: Any = None

    def path(self, name: str) -> str:
        return join(self.where, name)

    def __str__(self) -> str:
        return self.where

    # ---- reading ------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return bool(self._fs.exists(self.path(name))) if self._fs else os.path.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        if self._fs:
            return bytes(self._fs.cat_file(self.path(name)))
        with open(self.path(name), "rb") as f:
            return f.read()

    def size(self, name: str) -> int:
        return int(self._fs.size(self.path(name))) if self._fs else os.path.getsize(self.path(name))

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def names(self) -> list[str]:
        """The names directly under the location (none when it does not exist yet)."""
        if self._fs is None:
            return os.listdir(self.where) if os.path.isdir(self.where) else []
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(self.where, detail=False)]
        except FileNotFoundError:
            return []

    # ---- writing ------------------------------------------------------------------------------
    def create(self) -> None:
        if self._fs is None:
            os.makedirs(self.where, exist_ok=True)

    def write_bytes(self, name: str, data: bytes, tmp_tag: str = "") -> None:
        """Write ``name`` whole or not at all."""
        if self._fs is not None:
            self._fs.pipe_file(self.path(name), data)
            return
        tmp = self.path(f".{name}.{tmp_tag or os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path(name))

    def write_json(self, name: str, data: Any) -> None:
        self.write_bytes(name, (json.dumps(data, indent=1) + "\n").encode(), tmp_tag="json")

    def remove(self, name: str) -> None:
        if self._fs is not None:
            self._fs.rm(self.path(name), recursive=True)
        else:
            os.remove(self.path(name))

    def drop_temporaries(self) -> None:
        """Half-written files of a run that was killed (local only: a store has none)."""
        for name in self.names() if self._fs is None else []:
            if name.endswith(".tmp"):
                os.remove(self.path(name))

    # ---- progress -----------------------------------------------------------------------------
    def recorded(self) -> list[dict]:
        """The entries of finished shards recorded so far (a line cut by a kill is skipped)."""
        if self._fs is not None:
            entries = []
            for url in sorted(self._fs.glob(f"{self.path(PROGRESS_DIR)}/*.json")):
                try:
                    entries.append(json.loads(self._fs.cat_file(url)))
                except (ValueError, FileNotFoundError):
                    continue
            return entries
        path = self.path(PROGRESS)
        if not os.path.exists(path):
            return []
        out = []
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def keep_only(self, entries: list[dict]) -> None:
        """Rewrite the local progress log with ``entries`` only (so new lines do not append to a
        line a kill cut); in a store each entry is its own object, nothing to rewrite."""
        if self._fs is not None:
            return
        tmp = self.path(f"{PROGRESS}.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(entry) + "\n" for entry in entries)
        os.replace(tmp, self.path(PROGRESS))

    def record(self, entry: dict) -> None:
        """Note a finished shard (after its file is written)."""
        if self._fs is not None:
            self._fs.pipe_file(f"{self.path(PROGRESS_DIR)}/{int(entry['index']):06d}.json",
                               json.dumps(entry).encode())
            return
        if self._progress is None:
            self._progress = open(self.path(PROGRESS), "a")
        self._progress.write(json.dumps(entry) + "\n")
        self._progress.flush()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def drop_progress(self) -> None:
        self.close()
        if self._fs is not None:
            if self._fs.exists(self.path(PROGRESS_DIR)):
                self._fs.rm(self.path(PROGRESS_DIR), recursive=True)
        elif os.path.exists(self.path(PROGRESS)):
            os.remove(self.path(PROGRESS))
