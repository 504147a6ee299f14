"""Helpers for benchmarks: a server subprocess, percentiles, and saving results."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


class Server:
    """``python -m server serve`` on a free port; ``with Server() as s: s.address``."""

    def __init__(self, config: Path | None = None, args: list[str] | None = None) -> None:
        self.cmd = [sys.executable, "-m", "server", "serve", "--port", "0"] + (args or [])
        if config is not None:
            self.cmd += ["--config", str(config)]
        self.address = ""
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stderr:
                m = re.search(r"listening on (\S+):(\d+)", line)
                if m:
                    self.address = f"127.0.0.1:{m.group(2)}"
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(60) or not self.address:
            self.__exit__()
            raise RuntimeError("server did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


def save(name: str, result: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` with the machine described, and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": {
        "python": platform.python_version(), "cpus": __import__("os").cpu_count(),
        "platform": platform.platform()}, **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
