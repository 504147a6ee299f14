"""A host name of our own in /etc/hosts (tests run as root): the stdlib resolver reads the file on
every lookup, so a name maps to several loopback addresses the way a headless Service maps to pods."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HOSTS = Path("/etc/hosts")


@contextmanager
def hosts_name(ips: Sequence[str]) -> Iterator[str]:
    """A fresh name (unique per call, so concurrent runs never see each other's) resolving to ``ips``.

    The file is edited in place, not replaced: in a container it is often a bind mount. On the
    way out only our lines are removed, so edits others made meanwhile survive."""
    if not os.access(HOSTS, os.W_OK):
        raise PermissionError(f"{HOSTS} is not writable: this test maps a name to replicas there (run as root)")
    name = f"tokenfeed-{uuid.uuid4().hex[:10]}.test"
    lines = [f"{ip} {name}\n" for ip in ips]
    with HOSTS.open("a") as f:
        if HOSTS.read_text()[-1:] not in ("", "\n"):
            f.write("\n")
        f.writelines(lines)
    try:
        yield name
    finally:
        kept = [line for line in HOSTS.read_text().splitlines(keepends=True) if name not in line.split()]
        with HOSTS.open("w") as f:
            f.writelines(kept)
