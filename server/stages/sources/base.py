"""What every source shares: shard specs, path resolution (local globs and URLs), bad-record
counting, and format sniffing. Sources read files through their ``Storage`` (``server.stages.storage``):
local files by ``safe_open`` (confined to ``server.data_roots`` while serving), URLs by fsspec."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import NamedTuple, Protocol

from server.errors import ConfigError
from server.stages.files import common_root, relative
from server.stages.identity import remembered_format, remembered_formats
from server.stages.storage import Storage, is_url

log = logging.getLogger(__name__)


class FilePart(NamedTuple):
    """A whole file (``end == -1``) or the range ``[start, end)`` of one, in the source's unit:
    bytes (JSONL), row groups (Parquet) or rows (HF datasets). A tuple: one a file at start-up."""

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
    """Records skipped while reading, counted by reason, with the first sample of each reason;
    safe to share between threads."""

    counts: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str, n: int = 1, sample: str | None = None) -> None:
        """Count ``n`` records skipped for ``reason``; ``sample`` says where (kept once per reason)."""
        with self._lock:
            self.counts[reason] += n
            if sample is not None:
                self.samples.setdefault(reason, sample)

    def merge(self, other: BadRecords) -> None:
        """Add another tally (e.g. one shard's) to this one."""
        counts, samples = other.snapshot(), other.sample_snapshot()
        with self._lock:
            self.counts.update(counts)
            for reason, sample in samples.items():
                self.samples.setdefault(reason, sample)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def sample_snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self.samples)

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


class BrokenShard(Exception):
    """A whole shard's content does not decode (a truncated or corrupt file): a content fault,
    decided from the bytes alone. Never raise it for an I/O error (an ``OSError`` from opening or
    reading): those are environment faults, which the dataset retries."""


class Source(Protocol):
    """A corpus split into shards; ``read_shard`` runs off the event loop.

    ``files()`` lists every file the content depends on (the dataset fingerprint stats them).
    A ``read_shard`` whose shard's content does not decode raises ``BrokenShard``; an I/O error
    propagates as ``OSError`` (retried by the dataset, never cached); bad records inside a readable
    shard are counted in ``bad`` and skipped.
    """

    storage: Storage

    def shards(self) -> list[ShardSpec]: ...

    def files(self) -> list[str]: ...

    def read_shard(self, shard: ShardSpec, bad: BadRecords) -> list[str]: ...


def resolve_paths(patterns: list[str], exclude: list[str], field: str, key: str = "paths",
                  storage: Storage | None = None) -> list[str]:
    """Sorted, de-duplicated files matching ``patterns`` (local globs or URLs); a pattern matching
    nothing, or a store that cannot be listed (no bucket, denied credentials), is an error naming
    ``{field}.{key}[i]``."""
    storage = storage or Storage()
    found: set[str] = set()
    for i, pattern in enumerate(patterns):
        where = f"{field}.{key}[{i}]"
        try:
            matches = storage.glob(pattern, exclude)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        except FileNotFoundError:
            matches = []
        except Exception as err:  # noqa: BLE001 - an object store's client errors (denied, no bucket, ...)
            raise ConfigError(f"{where}: cannot list {pattern}: {type(err).__name__}: {err}") from None
        if not matches:
            raise ConfigError(f"{where}: {pattern!r} matches no {'object' if is_url(pattern) else 'file'}")
        if len(patterns) == 1:
            return list(dict.fromkeys(matches))  # sorted already (``Storage.glob``)
        found.update(matches)
    return sorted(found)


def group_files(paths: list[str], shard_bytes: int, storage: Storage | None = None) -> list[ShardSpec]:
    """Files grouped into shards of about ``shard_bytes`` each. Files are taken in the order of a
    hash of their path, not sorted: neighbours in a directory tend to be alike (one package, one
    crawl), and a shard is the unit that a trainer reads for a while, so each shard should be a
    sample of the whole corpus. The order is a pure function of the paths relative to their common
    directory, so a copy of the corpus elsewhere groups the same way."""
    shards: list[ShardSpec] = []
    group: list[FilePart] = []
    size = 0
    root = common_root(paths)
    storage = storage or Storage()

    def order(path: str) -> bytes:
        return hashlib.blake2b(relative(path, root).encode(), digest_size=8).digest()

    for path in sorted(paths, key=order):
        group.append(FilePart(path))
        size += storage.size(path)
        if size >= shard_bytes:
            shards.append(_shard(len(shards), group, size))
            group, size = [], 0
    if group:
        shards.append(_shard(len(shards), group, size))
    return shards


def _shard(index: int, parts: list[FilePart], size: int) -> ShardSpec:
    name = parts[0].path if len(parts) == 1 else f"{parts[0].path} (+{len(parts) - 1} files)"
    return ShardSpec(index=index, name=name, parts=tuple(parts), bytes=size)


def decode_utf8(data: bytes, bad: BadRecords, where: str = "") -> str | None:
    """Strict UTF-8 decoding; invalid text is counted and skipped, never guessed."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad.add("invalid_utf8", sample=f"{where}: {err.reason} at byte {err.start}: {data[:60]!r}")
        return None


# Leading bytes of formats a source may be pointed at by mistake (or, for gzip/zstd, on purpose).
_MAGIC = {b"PAR1": "parquet", b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"ARROW1": "arrow",
          b"PK\x03\x04": "zip", b"\xff\xff\xff\xff": "arrow stream"}


def sniff_format(path: str, storage: Storage | None = None) -> str | None:
    """The binary format a file's first bytes announce (``parquet``, ``gzip``, ``zstd``, ...),
    ``binary`` for other files with NUL bytes near the start, or ``None`` for text. A local
    file's answer is remembered across starts while a dataset is built (``remembered_format``)."""
    storage = storage or Storage()
    if is_url(path):
        return _sniff(path, storage)
    return remembered_format(path, lambda: _sniff(path, storage))


def sniff_formats(paths: list[str], storage: Storage | None = None) -> dict[str, str | None]:
    """``{path: sniff_format(path, storage)}``, local files' answers remembered in one loop."""
    store = storage or Storage()
    local = [p for p in paths if not is_url(p)]
    out = remembered_formats(local, lambda path: _sniff(path, store)) if local else {}
    if len(local) < len(paths):
        out.update((p, _sniff(p, store)) for p in paths if is_url(p))
    return {p: out[p] for p in paths} if len(local) < len(paths) else out


def _sniff(path: str, storage: Storage) -> str | None:
    size = storage.size(path)
    head = storage.read(path, 0, min(size, 4096)) if size else b""
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    return "binary" if b"\x00" in head else None


def check_text_files(paths: list[str], patterns: list[str], field: str, kind: str,
                     allowed: tuple[str, ...] = (), storage: Storage | None = None) -> None:
    """Refuse (at start-up) files whose content is not ``kind``, naming the config entry."""
    for path, fmt in sniff_formats(paths, storage).items():
        if fmt is not None and fmt not in allowed:
            raise ConfigError(f"{path_field(path, patterns, field)}: {path} is a {fmt} file, not {kind} "
                              f"(set the source's `type` to match the data)")


def path_field(path: str, patterns: list[str], field: str, key: str = "paths") -> str:
    """``{field}.{key}[i]`` for the first pattern that matches ``path`` (for error messages)."""
    for i, pattern in enumerate(patterns):
        if fnmatch(path, pattern if is_url(pattern) else os.path.abspath(os.path.expanduser(pattern))):
            return f"{field}.{key}[{i}]"
    return f"{field}.{key}"
