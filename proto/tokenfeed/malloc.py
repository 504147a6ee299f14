"""glibc allocator settings for the two processes that move tokens (``mallopt``; no-ops off glibc).

By default glibc adapts two thresholds as a program runs: allocations above the *mmap threshold*
get their own mapping (returned to the system on free), and free memory above the *trim
threshold* at the top of the heap is returned too. Both cost page faults when the memory is
needed again, and a loop that allocates and frees the same few hundred KiB per batch pays them
every time. Each side sets what suits it, once per process; ``TOKENFEED_MALLOC=0`` (or any
``MALLOC_*`` / ``GLIBC_TUNABLES`` malloc setting of the user's own) leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done: dict[int, bool] = {}  # pid -> whether set (a forked worker sets its own)


def _user_configured() -> bool:
    if os.environ.get("TOKENFEED_MALLOC", "1") == "0":
        return True
    return any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", "")


def tune(mmap_threshold: int, trim_threshold: int | None = None) -> bool:
    """Fix glibc's mmap threshold (and its trim threshold, when given) for this process; returns
    whether they were set. Fixing either stops glibc's own adaptation of both."""
    pid = os.getpid()
    if pid in _done:
        return _done[pid]
    ok = False
    if not _user_configured():
        try:
            libc = ctypes.CDLL(None)
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
            if ok and trim_threshold is not None:
                ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
        except (OSError, AttributeError):  # not glibc
            ok = False
        log.debug("malloc thresholds: mmap %d, trim %s: %s", mmap_threshold, trim_threshold, "set" if ok else "not set")
    _done[pid] = ok
    return ok


def tune_for_client() -> bool:
    """A trainer process makes and drops three 128 KiB tensors per batch (seq_len 2048, batch 8).
    Without this, glibc trimmed the heap between messages and every batch paid ~30 page faults:
    the client's CPU per token was 1.3-1.6x higher (issue 9). 32 MiB is the ceiling glibc's own
    adaptation would reach (so the trainer's other allocations are served as they would be after
    warm-up); up to 256 MiB of freed heap stays mapped, a small price on a trainer host."""
    return tune(32 << 20, 256 << 20)
