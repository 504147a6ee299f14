"""What every source shares: shard specs, path resolution, bad-record counting."""

from __future__ import annotations

import glob
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Protocol

from server.errors import ConfigError


@dataclass(frozen=True)
class FilePart:
    """A whole file (``end == -1``) or the byte range ``[start, end)`` of one."""

    path: str
    start: int = 0
    end: int = -1


@dataclass(frozen=True)
class ShardSpec:
    """A unit of reading, tokenizing, caching and seeking: a few files or a range of one."""

    index: int
    name: str
    parts: tuple[FilePart, ...]
    bytes: int


@dataclass
class BadRecords:
    """Records skipped while reading, counted by reason; safe to share between threads."""

    counts: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.counts[reason] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class Source(Protocol):
    """A corpus split into shards; ``read_shard`` runs off the event loop."""

    def shards(self) -> list[ShardSpec]: ...

    def read_shard(self, shard: ShardSpec, bad: BadRecords) -> list[str]: ...


def resolve_paths(patterns: list[str], exclude: list[str], field: str) -> list[str]:
    """Sorted, de-duplicated files matching ``patterns``; a pattern matching nothing is an error."""
    found: set[str] = set()
    for i, pattern in enumerate(patterns):
        matches = [
            p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
            if os.path.isfile(p) and not any(fnmatch(p, x) for x in exclude)
        ]
        if not matches:
            raise ConfigError(f"{field}.paths[{i}]: {pattern!r} matches no file")
        found.update(os.path.abspath(p) for p in matches)
    return sorted(found)


def group_files(paths: list[str], shard_bytes: int) -> list[ShardSpec]:
    """Consecutive files grouped into shards of about ``shard_bytes`` each."""
    shards: list[ShardSpec] = []
    group: list[FilePart] = []
    size = 0
    for path in paths:
        group.append(FilePart(path))
        size += os.path.getsize(path)
        if size >= shard_bytes:
            shards.append(_shard(len(shards), group, size))
            group, size = [], 0
    if group:
        shards.append(_shard(len(shards), group, size))
    return shards


def _shard(index: int, parts: list[FilePart], size: int) -> ShardSpec:
    name = parts[0].path if len(parts) == 1 else f"{parts[0].path} (+{len(parts) - 1} files)"
    return ShardSpec(index=index, name=name, parts=tuple(parts), bytes=size)


def decode_utf8(data: bytes, bad: BadRecords) -> str | None:
    """Strict UTF-8 decoding; invalid text is counted and skipped, never guessed."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        bad.add("invalid_utf8")
        return None
