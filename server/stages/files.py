"""Opening data files: ``safe_open``, the one way a source opens a file (confined to
``server.data_roots`` while serving), and the errors of a file that is not what it was."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from typing import IO, Any

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


def is_url(path: str) -> bool:
    """True for ``proto://...`` paths (an object store) other than ``file://``."""
    head, sep, _ = path.partition("://")
    return bool(sep) and head.isidentifier() and head != "file"


def common_root(paths: list[str]) -> str:
    """The directory (or URL prefix) that every path lies under (what identities and shard order
    are relative to)."""
    if not paths:
        return ""
    if any(is_url(p) for p in paths):
        return _url_root(paths)
    root = os.path.commonpath(paths)
    return os.path.dirname(root) if len(paths) == 1 or os.path.isfile(root) else root


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
    return os.path.relpath(path, root) if root else path
