"""Shared fixtures: real server processes on 127.0.0.1 (port 0) and small real corpora."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The server process and corpus helpers are shared with the benchmarks (which run without pytest).
from benchmarks._common import ROOT, ServerProcess, jsonl_config, make_documents, write_jsonl

__all__ = ["ROOT", "ServerProcess", "jsonl_config", "make_documents", "write_jsonl"]


_LIVE: list[ServerProcess] = []  # servers the fixtures started and have not stopped yet


def _servers(workdir: Path) -> Iterator:
    """A ``start(config_dict | None, **kwargs)`` function; stops every server it started."""
    servers: list[ServerProcess] = []

    def start(config: dict[str, Any] | None = None, **kwargs: Any) -> ServerProcess:
        server = ServerProcess(config, workdir, **kwargs).start()
        servers.append(server)
        _LIVE.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
        _LIVE.remove(server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    """A failed test's report ends with the log of every server it was talking to: a timeout seen by
    the client is explained (or ruled out) by what the server said meanwhile."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for server in _LIVE:
            report.sections.append((f"server {server.address} log (last 40 lines)", "".join(server.lines[-40:])))


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """``start_server(config_dict | None, extra_args=None)`` -> a running ServerProcess."""
    yield from _servers(tmp_path)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """A small JSONL corpus of 300 documents of mixed lengths in 3 files."""
    docs = make_documents(300)
    write_jsonl(tmp_path / "data", docs, files=3)
    return tmp_path / "data", docs


@pytest.fixture
def dataset(tmp_path: Path) -> Any:
    """A server-side ``Dataset`` of about 40 JSONL shards of a few KiB (for store and walker tests)."""
    from server.config import DatasetConfig
    from server.stages.dataset import Dataset

    write_jsonl(tmp_path / "data", make_documents(160, seed=3), files=4)
    config = {"source": {"type": "jsonl", "paths": [str(tmp_path / "data" / "*.jsonl")], "shard_bytes": 4096}}
    ds = Dataset("d", DatasetConfig.model_validate(config))
    assert ds.num_shards >= 20
    return ds


@pytest.fixture
def pool() -> Iterator[Any]:
    """The thread pool a ``ShardStore`` loads and packs in."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4, thread_name_prefix="test-load") as executor:
        yield executor


def decode_rows(rows: Any, eos: int = 256, pad: int = 257) -> list[str]:
    """Documents in a sequence of byte-tokenizer rows ``[n, seq_len]`` (PAD dropped, split at EOS)."""
    import numpy as np

    flat = np.asarray(rows).reshape(-1)
    flat = flat[flat != pad]
    docs, start = [], 0
    for end in np.flatnonzero(flat == eos).tolist():
        docs.append(bytes(flat[start:end].astype(np.uint8).tolist()).decode("utf-8"))
        start = end + 1
    return docs


@pytest.fixture(scope="session")
def mlflow_booting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One MLflow server (``tests.test_tracking.MlflowServer``) for the session's tracking tests,
    launched but maybe not ready yet: a test that asks for it early overlaps its slow start (about
    10 s of imports) with its own work, then calls ``wait_ready()``. Tests that kill it start it
    again; each test's runs are found by their run ids, or in an experiment of its own."""
    from tests.test_tracking import MlflowServer

    tracker = MlflowServer(tmp_path_factory.mktemp("mlflow")).launch()
    yield tracker
    tracker.kill()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_booting: Any) -> Any:
    return mlflow_booting.wait_ready()


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Like ``start_server`` but shared by a module's tests: ``module_servers(config)``."""
    yield from _servers(tmp_path_factory.mktemp("servers"))
