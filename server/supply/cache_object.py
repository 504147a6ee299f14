"""The cache's second tier in an object store (``cache.disk.path: s3://bucket/tokenfeed-cache``):
tokenized shards shared by every job, sweep and replica that reads the same content with the same
tokenizer, so none of them tokenizes a shard that another has tokenized before.

Entries are content-addressed (``server.supply.cache.shard_key``: the shard's content identity,
the document settings, the tokenizer's identity, the format version), one object each, in the
disk tier's file format (a header naming the full key, then a checksummed zstd frame). A write
is one PUT, which an object store makes visible whole or not at all, so readers never see half
an entry; two writers of one key write the same bytes, so whichever lands last is right. A
reader checks the key and the frame's checksum: a damaged or foreign object is a miss (and is
removed), never served. The store's faults (throttling, a timeout) cost a miss or a skipped
write, never a stream. Its size is the bucket's business (a lifecycle rule expiring objects not
read for a while), not this server's budget.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from server.stages.storage import Storage
from server.supply.cache_disk import Blob, CorruptEntry, DiskTier, entry_bytes, parse_entry

log = logging.getLogger(__name__)


class ObjectTier:
    """Blobs as objects under a URL prefix; the ``DiskTier`` interface (get, put, remove, stats)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self._fs = Storage(storage_options).fs(self.url)
        self._lock = threading.Lock()
        self._n = dict.fromkeys(("reads", "read_bytes", "writes", "write_bytes", "corrupt", "read_errors",
                                 "write_errors"), 0)

    def _url(self, key: str) -> str:
        return f"{self.url}/{DiskTier.name_of(key)}"

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                self._n[name] += n

    def get(self, key: str) -> Blob | None:
        """The blob stored under ``key``, or ``None`` (absent, unreadable now, or damaged and removed)."""
        try:
            data = self._fs.cat_file(self._url(key))
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - the store's client errors: a miss, not a failed stream
            self._count(read_errors=1)
            log.warning("shared cache read of %s failed (%s: %s); tokenizing instead", self._url(key),
                        type(err).__name__, err)
            return None
        try:
            blob = parse_entry(bytes(data), key)
        except CorruptEntry as err:
            log.warning("dropping damaged shared cache object %s: %s", self._url(key), err)
            self.remove(key, corrupt=True)
            return None
        self._count(reads=1, read_bytes=len(data))
        return blob

    def put(self, key: str, blob: Blob) -> None:
        """Store ``blob`` (one PUT: visible whole or not at all)."""
        data = entry_bytes(key, blob)
        try:
            self._fs.pipe_file(self._url(key), data)
        except Exception as err:  # noqa: BLE001
            self._count(write_errors=1)
            log.warning("shared cache write of %s failed (%s: %s); continuing without it", self._url(key),
                        type(err).__name__, err)
            return
        self._count(writes=1, write_bytes=len(data))

    def remove(self, key: str, corrupt: bool = False) -> None:
        try:
            self._fs.rm_file(self._url(key))
        except Exception as err:  # noqa: BLE001 - gone already, or the store is down: a later reader checks again
            log.debug("cannot remove %s: %s", self._url(key), err)
        if corrupt:
            self._count(corrupt=1)

    def stats(self) -> dict[str, int]:
        """The tier's counters (its bytes and entries are the bucket's: not counted here), under
        the disk tier's names where they mean the same."""
        with self._lock:
            n = dict(self._n)
        return {"disk_corrupt": n["corrupt"], "disk_write_errors": n["write_errors"],
                "shared_reads": n["reads"], "shared_read_bytes": n["read_bytes"], "shared_writes": n["writes"],
                "shared_write_bytes": n["write_bytes"], "shared_read_errors": n["read_errors"]}
