"""Content identity of a dataset's files: each file's size and a digest of its bytes, never its
path's place on disk or its mtime, so two replicas with their own copies of a corpus (``cp``,
``rsync`` without ``-t``, an image layer) agree on the global order and on each other's cursors.

Digests cover the whole file up to ``FULL_HASH_BYTES`` and three ``SAMPLE_BYTES`` samples (start,
middle, end) plus the size beyond, so starting on a large corpus reads a bounded amount per file.
They are cached on disk keyed by (path, size, mtime, inode): a restart re-reads nothing that has not
changed; the format a source sniffed from a file's first bytes is kept beside its digest, so a
restart opens none of them (``remembered_format``). The stat seen at start-up is kept, so that a
file changed under a running server is noticed when its shard is read (``check_unchanged``) and
never served as a mix of versions.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import orjson

from server.stages.files import FileChanged, FileStat, listed_stats, safe_open, seen_of, stat_listed

__all__ = ["DigestCache", "FileIdentity", "FileStat", "check_unchanged", "default_cache_dir", "digest_file",
           "identify", "identify_all", "remembered_format", "remembered_formats", "remembering"]

log = logging.getLogger(__name__)

#: Files up to this size are hashed whole; larger ones by samples (measured: blake2b runs at
#: about 1 GB/s here, so the stdlib corpus, 1,790 files and 31.5 MB, costs ~40 ms at start-up).
FULL_HASH_BYTES = 8 << 20
SAMPLE_BYTES = 1 << 20
_CACHE_VERSION = 1


class FileIdentity(NamedTuple):
    """A file's content identity (``size``, ``digest``) and the stat it was taken from. A tuple:
    one is made a file at start-up (a frozen dataclass cost 1 us each)."""

    size: int
    digest: str
    seen: FileStat

    def content(self) -> list[int | str]:
        """The part that replicas compare: independent of path, mtime and inode."""
        return [self.size, self.digest]


def digest_file(path: str, size: int) -> str:
    """blake2b of the file's bytes (whole, or sampled past ``FULL_HASH_BYTES``) and its size."""

    h = hashlib.blake2b(digest_size=16)
    h.update(size.to_bytes(8, "little"))
    with safe_open(path) as f:
        if size <= FULL_HASH_BYTES:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        else:
            for offset in (0, (size - SAMPLE_BYTES) // 2, size - SAMPLE_BYTES):
                f.seek(offset)
                h.update(f.read(SAMPLE_BYTES))
    return ("blake2b:" if size <= FULL_HASH_BYTES else "blake2b-sampled:") + h.hexdigest()


def default_cache_dir() -> str:
    """Where digests are remembered between runs: ``$TOKENFEED_IDENTITY_CACHE``, else the user's
    cache directory."""
    explicit = os.environ.get("TOKENFEED_IDENTITY_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tokenfeed")


class DigestCache:
    """Digests by (path, size, mtime, inode), loaded from and saved to one JSON file (by orjson: at
    100,000 files the stdlib's ``json`` took 1.1 us a file to load, orjson 0.7, and a tenth of the
    time to write). Failing to read or write it only costs hashing again: it never stops a server.
    It is written only when something was learned: a restart on unchanged files writes nothing."""

    def __init__(self, directory: str | None) -> None:
        self.path = os.path.join(directory, "file-digests.json") if directory else None
        self._entries: dict[str, list[Any]] = {}
        self._dirty = False
        self._lock = threading.Lock()
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    data = orjson.loads(f.read())
                if data.get("version") == _CACHE_VERSION:
                    files = data["files"]
                    self._entries = files if isinstance(files, dict) else dict(files)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass

    def _entry(self, path: str, seen: FileStat) -> list[Any] | None:
        entry = self._entries.get(path)
        return entry if entry is not None and _same_stat(entry, seen) else None

    def get(self, path: str, seen: FileStat) -> str | None:
        entry = self._entry(path, seen)
        return str(entry[3]) if entry and entry[3] is not None else None

    def put(self, path: str, seen: FileStat, digest: str) -> None:
        with self._lock:
            entry = self._entry(path, seen)
            self._entries[path] = [seen.size, seen.mtime_ns, seen.inode, digest, *(entry[4:5] if entry else [])]
            self._dirty = True

    def get_format(self, path: str, seen: FileStat) -> tuple[bool, str | None]:
        """``(True, format)`` when a format was sniffed from this very file (same stat), else
        ``(False, None)``. Entries of older servers have no format: they are sniffed again."""
        entry = self._entry(path, seen)
        if entry is None or len(entry) < 5:
            return False, None
        return True, entry[4] or None

    def put_format(self, path: str, seen: FileStat, fmt: str | None) -> None:
        with self._lock:
            entry = self._entry(path, seen)
            self._entries[path] = [seen.size, seen.mtime_ns, seen.inode, entry[3] if entry else None, fmt or ""]
            self._dirty = True

    @property
    def dirty(self) -> bool:
        """Something was learned since the file was read (``save`` writes it)."""
        return self._dirty

    def save(self) -> None:
        """Write the file atomically (a concurrent server on the same host may write it too), if
        anything was learned; the entries of files that are gone are left out (``prune``)."""
        if self.path is None or not self._dirty:
            return
        self.prune()
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            data = orjson.dumps({"version": _CACHE_VERSION, "files": self._entries})
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".digests.")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._dirty = False
        except (OSError, TypeError) as err:  # orjson.JSONEncodeError is a TypeError
            log.debug("cannot save file digests to %s: %s", self.path, err)

    def prune(self) -> int:
        """Forget the files that no longer exist (a deleted corpus, a job's temporary directory):
        the cache holds what this host's datasets can still use, not every file it ever hashed,
        and each start loads all of it. When something was learned (``save``), a stat for each
        file that the start-up being built did not list (another corpus's: 4.5 us, against the
        60 us or more that hashing a new file costs). How many were forgotten."""
        listed = listed_stats() or {}
        with self._lock:
            gone = [path for path in self._entries if path not in listed and not os.path.exists(path)]
            for path in gone:
                del self._entries[path]
        if gone:
            log.debug("forgot the digests of %d files that are gone", len(gone))
        return len(gone)


def _same_stat(entry: list[Any], seen: FileStat) -> bool:
    """A cache entry ``[size, mtime_ns, inode, ...]`` was taken from a file with the stat ``seen``."""
    return len(entry) >= 4 and entry[0] == seen[0] and entry[1] == seen[1] and entry[2] == seen[2]


def identify(path: str, cache: DigestCache | None = None) -> FileIdentity:
    """The identity of one file, from ``cache`` when its stat is unchanged."""
    seen = stat_listed(path)
    digest = cache.get(path, seen) if cache is not None else None
    if digest is None:
        digest = digest_file(path, seen.size)
        if cache is not None:
            cache.put(path, seen, digest)
    return FileIdentity(seen.size, digest, seen)


#: The digest cache of the dataset being built in this context (``remembering``), if any.
_STARTUP: contextvars.ContextVar[DigestCache | None] = contextvars.ContextVar("tokenfeed_startup_cache",
                                                                              default=None)


@contextlib.contextmanager
def remembering(cache: DigestCache) -> Iterator[DigestCache]:
    """Inside the block, ``remembered_format`` keeps what sources sniff in ``cache`` (which the
    caller saves, e.g. through ``identify_all``)."""
    token = _STARTUP.set(cache)
    try:
        yield cache
    finally:
        _STARTUP.reset(token)


def remembered_format(path: str, sniff: Callable[[], str | None]) -> str | None:
    """``sniff()`` (the format a local file's first bytes announce), remembered in the start-up's
    digest cache by the file's stat: a restart costs a stat per file, not an open and a read
    (measured: 15 us of the 50 us a small file cost at start-up). Outside ``remembering``, or
    when the file cannot be stat'ed, plainly ``sniff()``."""
    return remembered_formats([path], lambda _: sniff())[path]


def remembered_formats(paths: list[str], sniff: Callable[[str], str | None]) -> dict[str, str | None]:
    """``{path: sniff(path)}`` for local ``paths``, each remembered as ``remembered_format`` does
    (one loop, not a call a file: a restart on 100,000 files spent 2 us a file in the calls)."""
    cache = _STARTUP.get()
    if cache is None:
        return {path: sniff(path) for path in paths}
    listed = listed_stats() or {}
    entries = cache._entries
    out: dict[str, str | None] = {}
    for path in paths:
        seen = listed.get(path)
        if seen is None:
            try:
                seen = seen_of(os.stat(path))
            except OSError:
                out[path] = sniff(path)  # the sniff's own open raises what the caller expects
                continue
        entry = entries.get(path)
        if (entry is not None and len(entry) >= 5 and entry[0] == seen[0] and entry[1] == seen[1]
                and entry[2] == seen[2]):
            out[path] = entry[4] or None
        else:
            fmt = out[path] = sniff(path)
            cache.put_format(path, seen, fmt)
    return out


def identify_all(paths: list[str], cache_dir: str | None = None, cache: DigestCache | None = None
                 ) -> dict[str, FileIdentity]:
    """Identities of ``paths`` (start-up work; digests of unchanged files come from ``cache``, else
    from the cache in ``cache_dir``), the cache saved afterwards if a digest was taken. What
    ``identify`` does a file, inlined: at 100,000 files the calls were 4 us a file."""
    if cache is None:
        cache = DigestCache(cache_dir if cache_dir is not None else default_cache_dir())
    listed = listed_stats() or {}
    entries = cache._entries
    out: dict[str, FileIdentity] = {}
    for path in paths:
        seen = listed.get(path)
        if seen is None:
            seen = seen_of(os.stat(path))
        entry = entries.get(path)
        if (entry is not None and len(entry) >= 4 and entry[3] is not None and entry[0] == seen[0]
                and entry[1] == seen[1] and entry[2] == seen[2]):
            digest = str(entry[3])
        else:
            digest = digest_file(path, seen.size)
            cache.put(path, seen, digest)
        out[path] = FileIdentity(seen.size, digest, seen)
    cache.save()
    return out


def check_unchanged(path: str, ident: FileIdentity) -> FileIdentity:
    """Raise ``FileChanged`` unless ``path`` still holds the content ``ident`` names; returns the
    identity to compare with next time (a ``touch`` or a copy with the same bytes is no change,
    but costs one digest). An OSError (a missing file too: it may be renamed back) is the
    caller's to retry."""
    now = FileStat.of(path)
    if now == ident.seen:
        return ident
    if now.size != ident.size:
        raise FileChanged(path, f"changed size ({ident.size} -> {now.size} bytes)")
    digest = digest_file(path, now.size)
    if digest != ident.digest:
        raise FileChanged(path, "was rewritten (same size, other content)")
    return FileIdentity(ident.size, digest, now)
