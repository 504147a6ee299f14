"""What benchmarks that drive a real server process need from the test helpers, without pytest:
a server subprocess that can be killed and restarted on its port, and small synthetic JSONL corpora.
Same behaviour as ``tests/conftest.py``'s helpers of the same names (which need pytest), so that
``python -m benchmarks.<name>`` runs from a fresh clone with only the server and client installed."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"listening on (\S+):(\d+)")


class ServerProcess:
    """``python -m server serve`` in a subprocess; waits on its log line, never on a sleep.
    ``start()`` again after ``kill()``/``stop()`` reuses the port; ``lines`` is its stderr."""

    def __init__(self, config: dict[str, Any] | None, workdir: Path, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = workdir / f"server-{os.getpid()}-{id(self)}.yaml"
            self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.extra_args = list(extra_args or [])
        self.env = {**os.environ, **(env or {})}
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._new_line = threading.Condition()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        args = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        self.proc = subprocess.Popen(args + self.extra_args, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(self.proc, ready), daemon=True).start()
        if not ready.wait(timeout) or self.port == 0 or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-30:]))
        return self

    def _pump(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        for line in proc.stderr:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
            m = _LISTENING.search(line)
            if m and not ready.is_set():
                self.port = int(m.group(2))
                ready.set()
        ready.set()  # output closed (the process is exiting): wake the waiter

    def kill(self) -> None:
        """SIGKILL: the crash case; nothing is flushed or drained."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        return "".join(self.lines)

    def wait_log(self, *texts: str, timeout: float = 30.0) -> bool:
        """Wait until every one of ``texts`` is in the log (a line logged just before a status was
        sent may still be in the pipe when the client has the status); False at the deadline."""
        with self._new_line:
            return self._new_line.wait_for(lambda: all(t in self.log() for t in texts), timeout)


def make_documents(n: int, seed: int = 0, min_len: int = 20, max_len: int = 6000) -> list[str]:
    """``n`` distinct documents of mixed lengths; each begins with its own id."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "tokens", "stream", "packing", "cursor", "épée", "日本"]
    docs = []
    for i in range(n):
        length = int(min_len * (max_len / min_len) ** rng.random())  # log-uniform lengths
        body = []
        size = 0
        while size < length:
            w = rng.choice(words)
            body.append(w)
            size += len(w) + 1
        docs.append(f"doc-{i:06d} " + " ".join(body))
    return docs


def write_jsonl(path: Path, docs: list[str], files: int = 1) -> list[Path]:
    """Write documents round-robin into ``files`` JSONL files under ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    outs = [path / f"part-{i:03d}.jsonl" for i in range(files)]
    handles = [o.open("w") for o in outs]
    for i, doc in enumerate(docs):
        handles[i % files].write(json.dumps({"text": doc, "meta": {"i": i}}) + "\n")
    for h in handles:
        h.close()
    return outs


def jsonl_config(path: Path, name: str = "docs", shard_bytes: int = 64 << 10, **server: Any) -> dict[str, Any]:
    """A server config serving the JSONL files under ``path`` as ``name`` (byte tokenizer);
    keyword arguments go to its ``server`` section."""
    config: dict[str, Any] = {"datasets": {name: {
        "source": {"type": "jsonl", "paths": [str(path / "*.jsonl")], "text_field": "text",
                   "shard_bytes": shard_bytes},
        "tokenizer": {"type": "byte"}}}}
    if server:
        config["server"] = server
    return config


# ---- token-budget baselines (what server.stages.order.lpt is measured against) -------------------
def greedy(lengths: list[int], ranks: int, budget: int) -> list[int]:
    """The plain baseline: pieces in order, each rank filled up to the budget before the next."""
    owner, r, load = [], 0, 0
    for n in lengths:
        if load + n > budget and r < ranks - 1:
            r, load = r + 1, 0
        owner.append(r)
        load += n
    return owner


def imbalance(lengths: list[int], owner: list[int], ranks: int) -> float:
    """max / mean tokens per rank in a step."""
    loads = np.bincount(owner, weights=lengths, minlength=ranks)
    return float(loads.max() / loads.mean()) if loads.sum() else 1.0
