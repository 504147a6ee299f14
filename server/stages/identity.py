"""Content identity of a dataset's files: each file's size and a digest of its bytes, never its
path's place on disk or its mtime, so two replicas with their own copies of a corpus (``cp``,
``rsync`` without ``-t``, an image layer) agree on the global order and on each other's cursors.

Digests cover the whole file up to ``FULL_HASH_BYTES`` and three ``SAMPLE_BYTES`` samples (start,
middle, end) plus the size beyond, so starting on a large corpus reads a bounded amount per file.
They are cached on disk keyed by (path, size, mtime, inode): a restart re-reads nothing that has not
changed. The stat seen at start-up is kept, so that a file changed under a running server is
noticed when its shard is read (``check_unchanged``) and never served as a mix of versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass

from server.stages.files import FileChanged, safe_open

log = logging.getLogger(__name__)

#: Files up to this size are hashed whole; larger ones by samples (measured: blake2b runs at
#: about 1 GB/s here, so the stdlib corpus, 1,790 files and 31.5 MB, costs ~40 ms at start-up).
FULL_HASH_BYTES = 8 << 20
SAMPLE_BYTES = 1 << 20
_CACHE_VERSION = 1


@dataclass(frozen=True)
class FileStat:
    """What ``os.stat`` said of a file: enough to tell that it may have changed."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: str) -> FileStat:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class FileIdentity:
    """A file's content identity (``size``, ``digest``) and the stat it was taken from."""

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
    """Digests by (path, size, mtime, inode), loaded from and saved to one JSON file. Failing to
    read or write it only costs hashing again: it never stops a server."""

    def __init__(self, directory: str | None) -> None:
        self.path = os.path.join(directory, "file-digests.json") if directory else None
        self._entries: dict[str, list] = {}
        self._dirty = False
        self._lock = threading.Lock()
        if self.path is not None:
            try:
                with open(self.path) as f:
                    data = json.load(f)
                if data.get("version") == _CACHE_VERSION:
                    self._entries = dict(data["files"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass

    def get(self, path: str, seen: FileStat) -> str | None:
        entry = self._entries.get(path)
        if entry and entry[:3] == [seen.size, seen.mtime_ns, seen.inode]:
            return str(entry[3])
        return None

    def put(self, path: str, seen: FileStat, digest: str) -> None:
        with self._lock:
            self._entries[path] = [seen.size, seen.mtime_ns, seen.inode, digest]
            self._dirty = True

    def save(self) -> None:
        """Write the file atomically (a concurrent server on the same host may write it too)."""
        if self.path is None or not self._dirty:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".digests.")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _CACHE_VERSION, "files": self._entries}, f)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as err:
            log.debug("cannot save file digests to %s: %s", self.path, err)


def identify(path: str, cache: DigestCache | None = None) -> FileIdentity:
    """The identity of one file, from ``cache`` when its stat is unchanged."""
    seen = FileStat.of(path)
    digest = cache.get(path, seen) if cache is not None else None
    if digest is None:
        digest = digest_file(path, seen.size)
        if cache is not None:
            cache.put(path, seen, digest)
    return FileIdentity(seen.size, digest, seen)


def identify_all(paths: list[str], cache_dir: str | None = None) -> dict[str, FileIdentity]:
    """Identities of ``paths`` (start-up work; digests of unchanged files come from the cache)."""
    cache = DigestCache(cache_dir if cache_dir is not None else default_cache_dir())
    out = {path: identify(path, cache) for path in paths}
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
