"""Per-rank Prometheus metrics and the run's ``metrics.jsonl`` (one line per step, rank 0)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

_WAIT_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
_STEP_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


class TrainerMetrics:
    """This rank's trainer metrics, served on ``port + rank`` when ``port`` is set.

    Args:
        rank: the label value of every series.
        port: base port (rank 0's); None or 0 serves nothing (the metrics are still kept).
        addr: interface to listen on.
    """

    def __init__(self, rank: int, port: int | None = None, addr: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry()
        r, reg = str(rank), self.registry
        self.data_wait = Histogram("tokenfeed_trainer_data_wait_seconds", "Time blocked in next(loader).",
                                   ["rank"], registry=reg, buckets=_WAIT_BUCKETS).labels(rank=r)
        self.stall = Gauge("tokenfeed_trainer_data_stall_fraction", "Fraction of the last step spent waiting "
                           "for data.", ["rank"], registry=reg).labels(rank=r)
        self.tokens_per_second = Gauge("tokenfeed_trainer_tokens_per_second", "This rank's training tokens per "
                                       "second over the last step.", ["rank"], registry=reg).labels(rank=r)
        self.step_seconds = Histogram("tokenfeed_trainer_step_seconds", "Wall time of an optimizer step.",
                                      ["rank"], registry=reg, buckets=_STEP_BUCKETS).labels(rank=r)
        self.loss = Gauge("tokenfeed_trainer_loss", "This rank's training loss at the last step.", ["rank"],
                          registry=reg).labels(rank=r)
        self.port = port + rank if port else None
        self._server = None
        if self.port is not None:
            self._server, _ = start_http_server(self.port, addr=addr, registry=self.registry)

    def step(self, step_s: float, wait_s: float, tokens: int, loss: float) -> None:
        """Record one optimizer step of this rank."""
        self.step_seconds.observe(step_s)
        self.stall.set(wait_s / step_s if step_s > 0 else 0.0)
        self.tokens_per_second.set(tokens / step_s if step_s > 0 else 0.0)
        self.loss.set(loss)

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class MetricsLog:
    """Appends one JSON object per line to ``path``; flushed every line so a kill loses at most one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def rewind(path: Path, step: int) -> int:
    """Drop the lines after ``step`` (steps a resumed run redoes) and torn lines; returns how many."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1  # torn by a kill mid-write
            continue
        if isinstance(record, dict) and record.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
    return dropped
