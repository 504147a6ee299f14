"""Opening data files: ``safe_open``, the one way a source opens a file (confined to
``server.data_roots`` while serving), and the errors of a file that is not what it was."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import logging
import os
from collections.abc import Iterable, Iterator
from typing import IO, Any, NamedTuple

from server.errors import ConfigError

log = logging.getLogger(__name__)


class FileChanged(Exception):
    """A file's content is not what the server saw at start-up (rewritten, truncated, grown)."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"{path} {what}")
        self.path = path


#: Real paths of ``server.data_roots`` while a server runs; empty: files open as they are. Set
#: once by the server process at start (``server.serve.auth.install_guards``), read by every thread.
_DATA_ROOTS: tuple[str, ...] = ()


class OutsideDataRoots(FileChanged, ConfigError):
    """A data file whose real path is not under ``server.data_roots``: it, or a directory above
    it, was swapped for a symlink after the start-up checks. A ``FileChanged``, not an ``OSError``:
    retrying cannot help, so the dataset refuses the read at once (FAILED_PRECONDITION); during
    start-up it is the ``ConfigError`` that the path checks would have raised. The message names
    only the configured path: where the link points stays in the server's log."""

    def __init__(self, path: str) -> None:
        super().__init__(path, "resolves outside server.data_roots")


def confine_reads(roots: Iterable[str]) -> None:
    """Make ``safe_open`` refuse files outside ``roots`` (real, absolute directories); no roots:
    plain opens. Process-wide, because files are opened deep in sources and worker threads, where
    no config is at hand."""
    global _DATA_ROOTS
    _DATA_ROOTS = tuple(roots)


def data_roots() -> tuple[str, ...]:
    """The roots ``safe_open`` enforces now (empty when reads are not confined)."""
    return _DATA_ROOTS


def safe_open(path: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """``open(path, mode, **kwargs)`` for reading a data file; every source opens files this way.

    With data roots, the file is opened with ``O_NOFOLLOW`` (a symlink is followed only to a
    target under a root, checked before anything outside is opened), then the open descriptor's
    real path, which the kernel reports with every symlinked parent resolved, must lie under a
    root, else ``OutsideDataRoots``. Checking the descriptor that will be read, not the path,
    leaves no window for a swap between check and use."""
    if any(c in mode for c in "wax+"):
        raise ValueError(f"safe_open opens data files for reading only, not with mode {mode!r}")
    roots = _DATA_ROOTS
    if not roots:
        return open(path, mode, **kwargs)
    return open(path, mode, opener=lambda p, flags: _open_confined(p, flags, roots), **kwargs)


def _open_confined(path: str, flags: int, roots: tuple[str, ...]) -> int:
    """A descriptor of ``path`` whose real path is under ``roots``, or ``OutsideDataRoots``."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | nofollow)
    except OSError as err:
        if not nofollow or err.errno not in (errno.ELOOP, errno.EMLINK):
            raise  # an environment fault (missing, EIO, EMFILE, ...): the dataset retries it
        target = os.path.realpath(path)  # the file itself is a symlink: follow it only inside
        if not _under(target, roots):
            raise _escape(path, target, roots) from None
        fd = os.open(target, flags | nofollow)
    try:
        real = _descriptor_path(fd, path)
        if not _under(real, roots):
            raise _escape(path, real, roots)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _descriptor_path(fd: int, path: str) -> str:
    """Where an open descriptor really is, as the kernel resolved it (Linux ``/proc``); where
    there is no ``/proc``, the path's realpath taken after the open (a narrow window remains)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def _under(real: str, roots: tuple[str, ...]) -> bool:
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _escape(path: str, real: str, roots: tuple[str, ...]) -> OutsideDataRoots:
    log.error("refused to read %s: it resolves to %s, outside server.data_roots (%s)", path, real, ", ".join(roots))
    return OutsideDataRoots(path)


class FileStat(NamedTuple):
    """What ``os.stat`` said of a file that content identity needs: enough to tell that it may have
    changed. A tuple (cheap to make: one a file at start-up, where a frozen dataclass cost 1 us)."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: str) -> FileStat:
        """The file's stat now."""
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)

    @classmethod
    def listed(cls, path: str) -> FileStat:
        """The stat the start-up's listing took (``listing_stats``), else the stat now."""
        return stat_listed(path)

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


#: What a stat says of a file that content identity needs: (size, mtime in ns, inode).
Seen = FileStat

#: What a start-up's listing saw of each local file (``listing_stats``): path -> ``FileStat``. Three
#: ints, not the ``os.stat_result``: at 100,000 files the whole result held 40 MiB more at the peak.
_LISTED: contextvars.ContextVar[dict[str, FileStat] | None] = contextvars.ContextVar("tokenfeed_listed",
                                                                                    default=None)


@contextlib.contextmanager
def listing_stats() -> Iterator[dict[str, FileStat]]:
    """Inside the block, the stat the listing took of each local file (``remember_stat``) answers
    ``stat_listed``: building a dataset stats each file once (its size, its digest-cache key, its
    remembered format), not four times (measured: 4 stat calls a file, ~2 us each, at 100k files).
    Outside it, ``stat_listed`` stats afresh, as the checks while serving must."""
    listed: dict[str, FileStat] = {}
    token = _LISTED.set(listed)
    try:
        yield listed
    finally:
        _LISTED.reset(token)


def listed_stats() -> dict[str, FileStat] | None:
    """The listing's stats of the start-up being built (``listing_stats``), else ``None``."""
    return _LISTED.get()


def seen_of(st: os.stat_result) -> FileStat:
    return FileStat(st.st_size, st.st_mtime_ns, st.st_ino)


def remember_stat(path: str, st: os.stat_result) -> None:
    """Keep the listing's stat of ``path`` for the rest of the start-up (if one is being built)."""
    listed = _LISTED.get()
    if listed is not None:
        listed[path] = FileStat(st.st_size, st.st_mtime_ns, st.st_ino)


def stat_listed(path: str) -> FileStat:
    """What the start-up's listing saw of ``path``, else what ``os.stat(path)`` says now."""
    listed = _LISTED.get()
    seen = listed.get(path) if listed is not None else None
    return seen if seen is not None else seen_of(os.stat(path))


def is_url(path: str) -> bool:
    """True for ``proto://...`` paths (an object store) other than ``file://``."""
    if "://" not in path:  # a local path (the common case: a million calls at a 100k-file start-up)
        return False
    head, sep, _ = path.partition("://")
    return bool(sep) and head.isidentifier() and head != "file"


def common_root(paths: list[str]) -> str:
    """The directory (or URL prefix) that every path lies under (what identities and shard order
    are relative to)."""
    if not paths:
        return ""
    if any(is_url(p) for p in paths):
        return _url_root(paths)
    root = _common_dir(paths) or os.path.commonpath(paths)
    return os.path.dirname(root) if len(paths) == 1 or os.path.isfile(root) else root


def _common_dir(paths: list[str]) -> str | None:
    """``os.path.commonpath(paths)`` from the first and the last path in string order (their
    common prefix is every path's), when both are absolute and normal; ``None`` otherwise.
    ``commonpath`` splits every path: 1.2 s of a 100,000-file start-up (measured)."""
    lo, hi = min(paths), max(paths)
    if not (_is_normal(lo) and _is_normal(hi)):
        return None
    prefix = os.path.commonprefix([lo, hi])
    sep = os.sep
    if all(len(p) == len(prefix) or p[len(prefix)] == sep for p in (lo, hi)):
        return prefix or sep  # the prefix ends at a component's end in both
    cut = prefix.rfind(sep)
    return prefix[:cut] or sep


def _url_root(paths: list[str]) -> str:
    """The longest common ``/``-prefix of URLs (``s3://b/x/a``, ``s3://b/x/c/d`` -> ``s3://b/x``)."""
    split = [p.rstrip("/").split("/") for p in paths]
    common: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if common == split[0] or common == split[-1]:  # one object's own path: its "directory"
        common = common[:-1]
    return "/".join(common)


def relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` (a directory or URL prefix from ``common_root``)."""
    if is_url(path) or is_url(root):
        prefix = root.rstrip("/") + "/"
        return path[len(prefix):] if root and path.startswith(prefix) else path
    if not root:
        return path
    return _relative_fast(path, root) or os.path.relpath(path, root)


def relative_all(paths: list[str], root: str) -> dict[str, str]:
    """``{path: relative(path, root)}`` for local ``paths`` (one prefix cut each where they lie
    under a normal ``root``)."""
    if not root:
        return {p: p for p in paths}
    sep = os.sep
    prefix = root if root.endswith(sep) else root + sep
    if not _is_normal(root):
        return {p: _relative_fast(p, root) or os.path.relpath(p, root) for p in paths}
    cut, dot, double = len(prefix), sep + ".", sep * 2
    out = {}
    for p in paths:  # _relative_fast inlined (a call a file was half the cost)
        rest = p[cut:]
        if (p.startswith(prefix) and rest and rest[0] != "." and rest[0] != sep and rest[-1] != sep
                and dot not in rest and double not in rest):
            out[p] = rest  # no empty, "." or ".." component: already normal
        else:
            out[p] = _relative_fast(p, root) or os.path.relpath(p, root)
    return out


def _relative_fast(path: str, root: str) -> str | None:
    """``os.path.relpath(path, root)`` by cutting the prefix, when both are absolute, normal paths
    and ``path`` lies under ``root`` (the common case: every file of a dataset under its root);
    ``None`` otherwise. ``relpath`` normalises both paths each call: 17 us a file, most of a
    100,000-file start-up's dataset building (measured), where cutting costs well under 1 us."""
    prefix = root if root.endswith(os.sep) else root + os.sep
    if not (path.startswith(prefix) and _is_normal(root)):
        return None
    rest = path[len(prefix):]
    return rest if rest and _normal_tail(rest) else None


@functools.lru_cache(maxsize=64)
def _is_normal(path: str) -> bool:
    """True when ``path`` is absolute and already what ``os.path.normpath`` makes of it."""
    return os.path.isabs(path) and (path == os.path.normpath(path) or path == os.sep)


def _normal_tail(rest: str) -> bool:
    """True when the relative ``rest`` has no empty, ``.`` or ``..`` component (three substring
    searches: cheaper than normalising to compare)."""
    sep = os.sep
    wrapped = sep + rest + sep
    return sep * 2 not in wrapped and f"{sep}.{sep}" not in wrapped and f"{sep}..{sep}" not in wrapped
