"""Replicas behind one name, on this machine: a host name of our own in /etc/hosts (tests run as
root; the stdlib resolver reads the file on every lookup) mapped to several loopback addresses the
way a headless Service maps to pods, and server processes listening on those addresses."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import ServerProcess

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


class ReplicaProcess:
    """A server process on one loopback address (127/8) and ``port`` (0: a free one, known once started)."""

    def __init__(self, host: str, config: dict[str, Any], workdir: Path, port: int,
                 extra_args: Sequence[str] = ()) -> None:
        # ServerProcess listens on 127.0.0.1; a later --host wins (argparse keeps the last one)
        self.host, self.server = host, ServerProcess(config, workdir, extra_args=[*extra_args, "--host", host])
        self.server.port = port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.server.port}"

    def start(self) -> ReplicaProcess:
        self.server.start()
        return self
