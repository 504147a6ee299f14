"""The cache's codec (checksummed zstd frames) and its optional second tier on local disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import zstandard

from server.stages.packing import TokenizedShard

log = logging.getLogger(__name__)

_MAGIC = b"TFC1"
_HEAD = struct.Struct("<4sI")  # magic, header length
_SUFFIX = ".tfc"
_local = threading.local()  # zstd contexts are not thread-safe: one per thread


class CorruptEntry(Exception):
    """A cached entry failed its checksum or does not match its metadata."""


@dataclass(frozen=True, slots=True)
class Blob:
    """A tokenized shard as one zstd frame (content size + checksum): tokens, then document lengths;
    or, not ``compressed``, those bytes as they are (memory only: the disk tier stores frames)."""

    data: bytes
    dtype: str
    num_tokens: int
    num_docs: int
    compressed: bool = True

    @property
    def raw_bytes(self) -> int:
        """Size of the shard it decodes to (tokens + int64 offsets)."""
        return self.num_tokens * np.dtype(self.dtype).itemsize + (self.num_docs + 1) * 8


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cache[level]


def encode(shard: TokenizedShard, level: int) -> Blob:
    """Compress a tokenized shard (blocking: run it off the event loop); level 0 leaves it
    uncompressed (decoding it then costs no copy)."""
    lengths = np.diff(shard.offsets).astype("<i8", copy=False)
    payload = shard.tokens.tobytes() + lengths.tobytes()
    if level == 0:
        return Blob(payload, shard.tokens.dtype.str, shard.num_tokens, shard.num_docs, compressed=False)
    # zstd writes into a buffer of the input's size and shrinks it in place; an exact-size copy
    # (a memcpy of the compressed bytes) leaves less slack behind each long-lived entry.
    data = bytes(memoryview(_compressor(level).compress(payload)))
    return Blob(data, shard.tokens.dtype.str, shard.num_tokens, shard.num_docs)


def decode(blob: Blob) -> TokenizedShard:
    """Decompress and check a blob; raises ``CorruptEntry`` rather than return damaged tokens."""
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    dtype = np.dtype(blob.dtype)
    want = blob.num_tokens * dtype.itemsize + blob.num_docs * 8
    if not blob.compressed:
        raw = blob.data
    else:
        try:
            raw = _local.decompressor.decompress(blob.data, max_output_size=want)
        except zstandard.ZstdError as err:
            raise CorruptEntry(f"zstd: {err}") from None
    if len(raw) != want:
        raise CorruptEntry(f"decoded {len(raw)} bytes, expected {want}")
    tokens = np.frombuffer(raw, dtype=dtype, count=blob.num_tokens)
    lengths = np.frombuffer(raw, dtype="<i8", offset=blob.num_tokens * dtype.itemsize)
    offsets = np.zeros(blob.num_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] != blob.num_tokens or (blob.num_docs and lengths.min() < 0):
        raise CorruptEntry("document lengths do not add up to the token count")
    return TokenizedShard(tokens=tokens, offsets=offsets)


class SecondTier(Protocol):
    """Where the cache keeps what memory does not: a local directory (``DiskTier``) or an object
    store shared across jobs (``server.supply.cache_object.ObjectTier``)."""

    def get(self, key: str) -> Blob | None: ...

    def put(self, key: str, blob: Blob) -> None: ...

    def remove(self, key: str, corrupt: bool = False) -> None: ...

    def stats(self) -> dict[str, int]: ...


class DiskTier:
    """Blobs as files in a directory with its own byte budget, least recently used evicted.

    Safe to delete at any time: a missing file is a miss, a missing directory is re-created on
    the next write. A file carries its full key, so a damaged or foreign file is a miss (and
    removed), never served. Files from an earlier run are reused (keys are content-addressed).
    """

    def __init__(self, path: str | Path, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # file name -> size, LRU first
        self._bytes = 0
        self.evictions = self.corrupt = self.write_errors = 0
        self._scan()

    def _scan(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        found = []
        for entry in os.scandir(self.path):
            if entry.name.endswith(".tmp"):  # a write cut short by a crash
                _unlink(entry.path)
            elif entry.name.endswith(_SUFFIX):
                st = entry.stat()
                found.append((st.st_mtime_ns, entry.name, st.st_size))
        for _, name, size in sorted(found):
            self._files[name] = size
            self._bytes += size
        self._evict()

    @staticmethod
    def name_of(key: str) -> str:
        """The file (or object) name of ``key``'s entry."""
        return hashlib.sha256(key.encode()).hexdigest()[:40] + _SUFFIX

    _name = name_of

    def get(self, key: str) -> Blob | None:
        """The blob stored under ``key``, or ``None`` (absent, deleted, or damaged and removed)."""
        name = self._name(key)
        try:
            data = (self.path / name).read_bytes()
        except OSError:
            self._forget(name)
            return None
        try:
            blob = parse_entry(data, key)
        except CorruptEntry as err:
            log.warning("dropping damaged disk cache file %s: %s", name, err)
            self.remove(key, corrupt=True)
            return None
        with self._lock:
            self._bytes += len(data) - self._files.pop(name, 0)
            self._files[name] = len(data)
        try:  # persist recency across restarts
            os.utime(self.path / name)
        except OSError:
            pass
        return blob

    def put(self, key: str, blob: Blob) -> None:
        """Store ``blob`` (atomically: readers see the old file or the new one, never half)."""
        data = entry_bytes(key, blob)
        if len(data) > self.max_bytes:
            return
        name = self._name(key)
        tmp = self.path / f"{name}.{threading.get_ident()}.tmp"
        try:
            self.path.mkdir(parents=True, exist_ok=True)  # it may have been deleted under us
            tmp.write_bytes(data)
            os.replace(tmp, self.path / name)
        except OSError as err:
            _unlink(tmp)
            with self._lock:
                self.write_errors += 1
            log.warning("disk cache write failed (%s); continuing without it", err)
            return
        with self._lock:
            self._bytes += len(data) - self._files.pop(name, 0)
            self._files[name] = len(data)
            self._evict()

    def remove(self, key: str, corrupt: bool = False) -> None:
        name = self._name(key)
        _unlink(self.path / name)
        self._forget(name)
        if corrupt:
            with self._lock:
                self.corrupt += 1

    def _forget(self, name: str) -> None:
        with self._lock:
            self._bytes -= self._files.pop(name, 0)

    def _evict(self) -> None:
        """Assumes the lock is held (or no other thread can see the tier yet)."""
        while self._bytes > self.max_bytes and self._files:
            name, size = self._files.popitem(last=False)
            self._bytes -= size
            self.evictions += 1
            _unlink(self.path / name)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"disk_bytes": self._bytes, "disk_entries": len(self._files), "disk_max_bytes": self.max_bytes,
                    "disk_evictions": self.evictions, "disk_corrupt": self.corrupt,
                    "disk_write_errors": self.write_errors}


def entry_bytes(key: str, blob: Blob) -> bytes:
    """An entry as stored: a header naming its full key, then the blob's zstd frame."""
    header = json.dumps({"key": key, "dtype": blob.dtype, "num_tokens": blob.num_tokens,
                         "num_docs": blob.num_docs}).encode()
    return _HEAD.pack(_MAGIC, len(header)) + header + blob.data


def parse_entry(data: bytes, key: str) -> Blob:
    """The blob of a stored entry; ``CorruptEntry`` when it is damaged or holds another key (the
    frame's own checksum is checked when it is decoded)."""
    if len(data) < _HEAD.size:
        raise CorruptEntry("file too short")
    magic, size = _HEAD.unpack_from(data)
    if magic != _MAGIC or _HEAD.size + size > len(data):
        raise CorruptEntry("bad header")
    try:
        head = json.loads(data[_HEAD.size : _HEAD.size + size])
        if head["key"] != key:
            raise CorruptEntry("file holds another key")
        dtype = np.dtype(str(head["dtype"])).str
        return Blob(data[_HEAD.size + size :], dtype, int(head["num_tokens"]), int(head["num_docs"]))
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptEntry(f"bad header: {err}") from None


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
