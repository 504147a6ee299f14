"""Measuring a trainer process: CPU seconds of its process tree (from ``/proc``), timed windows, and
the one-line JSON result a measurement subprocess prints. Standard library only, so that it runs
in both environments."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
RESULT_PREFIX = "RESULT "


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + sys seconds of all its threads) of ``pid``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = data[data.rindex(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK  # ppid, utime + stime


def tree_cpu(root: int | None = None) -> dict[int, float]:
    """CPU seconds (user + sys) of ``root`` (default: this process) and every live descendant,
    by pid. DataLoader workers, a forkserver and its children all count; a server started by
    another process does not."""
    root = os.getpid() if root is None else root
    stats: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = _stat(int(name))
            if s is not None:
                stats[int(name)] = s
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    result, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            result[pid] = stats[pid][1]
            todo.extend(children.get(pid, ()))
    return result


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the tree spent between two ``tree_cpu`` snapshots (a process born in between
    counts from zero; one that died in between is lost, so take ``after`` while workers live)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


@dataclass
class Window:
    """A measured stretch of an iteration: batches, tokens, seconds and the tree's CPU seconds."""

    batches: int
    tokens: int
    seconds: float
    cpu_s: float
    waits: list[float]
    server_cpu_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        tokens_per_s = self.tokens / self.seconds if self.seconds > 0 else 0.0
        waits = sorted(self.waits)
        p99 = waits[min(len(waits) - 1, int(0.99 * len(waits)))] if waits else 0.0
        return {"batches": self.batches, "tokens": self.tokens, "seconds": self.seconds, "cpu_s": self.cpu_s,
                "tokens_per_s": tokens_per_s,
                "cpu_s_per_m_tokens": self.cpu_s / (self.tokens / 1e6) if self.tokens else None,
                "batch_p50_ms": waits[len(waits) // 2] * 1e3 if waits else None, "batch_p99_ms": p99 * 1e3,
                "server_cpu_s": self.server_cpu_s,
                "server_cpu_s_per_m_tokens": (self.server_cpu_s / (self.tokens / 1e6)
                                              if self.tokens and self.server_cpu_s is not None else None)}


def measure(batches: Iterator[Any], tokens_of: Callable[[Any], int], *, warmup: int, seconds: float,
            max_batches: int | None = None, server: int | None = None) -> Window:
    """Take ``warmup`` batches, then measure until ``seconds`` pass, ``max_batches`` were taken or
    the iterator ends. CPU is the whole process tree's over the same window; ``server`` is a pid
    whose tree's CPU is reported apart (never added to the trainer's)."""
    for _ in range(warmup):
        tokens_of(next(batches))
    server_before = tree_cpu(server) if server else {}
    before, t0 = tree_cpu(), time.perf_counter()
    n = tokens = 0
    waits: list[float] = []
    last = t0
    while max_batches is None or n < max_batches:
        try:
            batch = next(batches)
        except StopIteration:
            break
        tokens += tokens_of(batch)
        now = time.perf_counter()
        waits.append(now - last)
        last, n = now, n + 1
        if now - t0 >= seconds:
            break
    after = tree_cpu()
    server_cpu = cpu_between(server_before, tree_cpu(server)) if server else None
    return Window(n, tokens, last - t0, cpu_between(before, after), waits, server_cpu)


def emit(result: dict[str, Any]) -> None:
    """Print the subprocess's result for the orchestrator (one line, after any logging)."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def parse(stdout: str) -> dict[str, Any]:
    """The result a subprocess printed with ``emit``."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise ValueError("the measurement printed no result")
