"""Where a source's files are: the server's own disk, or an object store (S3 and S3-compatible
stores, GCS, Azure, HTTP, anything fsspec knows) named by a URL such as ``s3://bucket/prefix``.

One ``Storage`` per source, made from its ``storage_options`` (passed to fsspec as given, the
convention of pandas, HF datasets and pyarrow; credentials also come from the environment and the
usual files). Local paths keep their guard (``safe_open``: confined to ``server.data_roots``);
URLs are opened through fsspec with ranged reads, so a byte range of a large object is fetched
alone, never the whole object.

Faults: whatever an object store's client raises while reading (a 503 SlowDown after its own
retries, a reset, a timeout) comes out as an ``OSError`` (``RemoteReadError``), the environment
fault that the dataset retries with backoff and a deadline, never a broken or empty shard. An
object's identity is its size and version (ETag, generation or version id): replicas reading one
bucket agree, and an object rewritten under a running server is noticed when its shard is read.
"""

from __future__ import annotations

import glob as local_glob
import os
import posixpath
import stat
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import IO, Any, cast

from server.errors import ConfigError
from server.stages.files import FileChanged, FileStat, is_url, listed_stats, safe_open, stat_listed

__all__ = ["ObjectStat", "RemoteReadError", "Storage", "is_url", "join"]

#: How much a sequential read of a remote object fetches per request (the line-boundary scan).
READ_BLOCK_BYTES = 1 << 20


def join(base: str, *names: str) -> str:
    """``os.path.join`` for local paths, ``/``-joining for URLs."""
    return posixpath.join(base, *names) if is_url(base) else os.path.join(base, *names)


def _local_files(pattern: str) -> list[str]:
    """Absolute paths of the regular files (symlinks followed) ``pattern`` matches, each stat'ed
    once, the stat kept for the rest of the start-up (``remember_stat``). An absolute, normal
    pattern yields absolute, normal matches: no ``abspath`` a file."""
    normal = os.path.isabs(pattern) and os.path.normpath(pattern) == pattern
    listed = listed_stats()
    found = []
    is_reg, stat_of = stat.S_ISREG, os.stat
    for match in local_glob.glob(pattern, recursive=True):
        path = match if normal else os.path.abspath(match)
        try:
            st = stat_of(path)
        except OSError:  # vanished or a dangling link: not a file (as os.path.isfile says)
            continue
        if is_reg(st.st_mode):
            if listed is not None:
                listed[path] = FileStat(st.st_size, st.st_mtime_ns, st.st_ino)
            found.append(path)
    return found


class RemoteReadError(OSError):
    """Reading from an object store failed (an environment fault: retried by the dataset)."""


@dataclass(frozen=True)
class ObjectStat:
    """A remote object's size and version (ETag / generation / version id / mtime)."""

    size: int
    version: str


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "generation", "VersionId", "md5Hash", "LastModified", "mtime", "last_modified"):
        value = info.get(key)
        if value not in (None, ""):
            return f"{key}:{str(value).strip(chr(34))}"
    return "size-only"


class Storage:
    """Lists, sizes, opens and reads a source's files, local or remote."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        self._fs: dict[str, Any] = {}
        self._listed: dict[str, ObjectStat] = {}  # what the start-up listing said of each object

    # ---- filesystems ------------------------------------------------------------------------------
    def fs(self, url: str) -> Any:
        """The fsspec filesystem of ``url``'s protocol, with this source's options (one per protocol)."""
        protocol = url.split("://", 1)[0]
        if protocol not in self._fs:
            try:
                import fsspec
                self._fs[protocol] = fsspec.filesystem(protocol, **self.options)
            except ImportError as err:
                extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
                hint = f" (pip install 'tokenfeed[{extra}]')" if extra else ""
                raise ConfigError(f"{url}: reading {protocol}:// needs a package that is not installed: "
                                  f"{err.name or err}{hint}") from None
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{url}: storage_options not accepted by the {protocol}:// filesystem: "
                                  f"{err}") from None
        return self._fs[protocol]

    # ---- start-up: listing ------------------------------------------------------------------------
    def glob(self, pattern: str, exclude: list[str]) -> list[str]:
        """Files matching ``pattern`` (``**`` recurses), not matching any of ``exclude``. A remote
        pattern lists the bucket once; errors (no bucket, denied) propagate as ``OSError``."""
        if not is_url(pattern):
            found = _local_files(os.path.expanduser(pattern))
        else:
            fs = self.fs(pattern)
            protocol = pattern.split("://", 1)[0]
            if any(c in pattern for c in "*?["):
                hits = fs.glob(pattern, detail=True)
            else:  # one object, or a "directory" prefix: its objects
                hits = {pattern: fs.info(pattern)}
            found = []
            for name, info in hits.items():
                if info.get("type") == "directory":
                    continue
                url = name if is_url(name) else f"{protocol}://{name}"
                self._listed[url] = ObjectStat(int(info.get("size") or 0), _version(info))
                found.append(url)
        if exclude:
            found = [p for p in found if not any(fnmatch(p, x) for x in exclude)]
        return sorted(found)

    def isfile(self, path: str) -> bool:
        if not is_url(path):
            return os.path.isfile(path)
        try:
            return bool(self.fs(path).isfile(path))
        except FileNotFoundError:
            return False

    def size(self, path: str) -> int:
        return self.listed(path).size if is_url(path) else stat_listed(path)[0]

    def listed(self, path: str) -> ObjectStat:
        """A remote object's size and version as the start-up listing saw it (else asked now)."""
        seen = self._listed.get(path)
        if seen is None:
            seen = self._listed[path] = self.stat(path)
        return seen

    def stat(self, path: str) -> ObjectStat:
        """A remote object's size and version now (one metadata request, never cached)."""
        try:
            fs = self.fs(path)
            fs.invalidate_cache(path)  # fsspec keeps listings: ask the store itself
            info = fs.info(path)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - the client's own error types: an environment fault
            raise RemoteReadError(f"{path}: {type(err).__name__}: {err}") from err
        return ObjectStat(int(info.get("size") or 0), _version(info))

    # ---- reading ----------------------------------------------------------------------------------
    def open(self, path: str) -> IO[bytes]:
        """A seekable binary file; remote reads are ranged requests of ``READ_BLOCK_BYTES``."""
        if not is_url(path):
            return safe_open(path)
        try:
            f = self.fs(path).open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")
            return cast(IO[bytes], _Remote(f))
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001
            raise RemoteReadError(f"{path}: {type(err).__name__}: {err}") from err

    def read(self, path: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of a file (all of it by default): one ranged request when remote."""
        if not is_url(path):
            with safe_open(path) as f:
                f.seek(start)
                data: bytes = f.read(-1 if end is None else end - start)
                return data
        try:
            data = self.fs(path).cat_file(path, start=start or None, end=end)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001
            raise RemoteReadError(f"{path}: {type(err).__name__}: {err}") from err
        if end is not None and len(data) != end - start:  # a short body: the object changed, or a cut response
            raise RemoteReadError(f"{path}: asked for bytes {start}-{end}, got {len(data)}")
        return bytes(data)

    def check_unchanged(self, path: str, seen: ObjectStat) -> None:
        """Raise ``FileChanged`` unless the object still has the size and version seen at start."""
        now = self.stat(path)
        if now.size != seen.size:
            raise FileChanged(path, f"changed size ({seen.size} -> {now.size} bytes)")
        if now.version != seen.version:
            raise FileChanged(path, f"was rewritten ({seen.version} -> {now.version})")


class _Remote:
    """An fsspec file whose failures are ``OSError`` (retried) whatever the client raised."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._f, name)(*args)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001
            raise RemoteReadError(f"{getattr(self._f, 'path', '?')}: {type(err).__name__}: {err}") from err

    def read(self, n: int = -1) -> bytes:
        return bytes(self._call("read", n))

    def readline(self) -> bytes:
        return bytes(self._call("readline"))

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._call("seek", offset, whence))

    def tell(self) -> int:
        return int(self._f.tell())

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return bool(self._f.closed)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
