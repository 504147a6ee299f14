"""A real Prometheus scrapes a real server under load from a real client, and two trainer-rank
exporters; every query of the Grafana dashboard must be valid PromQL that returns data.

What is real here: the server, the client streams, Prometheus (Debian's package) with the job
layout of docker/prometheus.yml, and the trainer's own ``trainer.metrics.TrainerMetrics``. What is
not: the trainer ranks are a stand-in loop that records made-up steps through that class, not a
training run. Every series the dashboard queries must have data: none is optional.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, jsonl_config, make_documents, write_jsonl
from test_metrics import metrics_url, poll, scrape, value

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "tokenfeed.json"
TRAINER = """
import sys, threading
from trainer.metrics import TrainerMetrics
rank, base = int(sys.argv[1]), int(sys.argv[2])
m = TrainerMetrics(rank, base, addr="127.0.0.1")
print("ready", flush=True)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
step = 0
while not stop.wait(0.2):  # a stand-in loop: one made-up step every 0.2 s, until stdin closes
    step += 1
    wait = 0.002 * (rank + 1)
    m.data_wait.observe(wait)
    m.step(step_s=0.2, wait_s=wait, tokens=8 * 128, loss=5.0 / step)
m.close()
"""


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    """The ``prometheus`` binary on PATH. ``scripts/test.sh`` installs it (and stops if it cannot):
    this test fails, never skips, without it."""
    found = shutil.which("prometheus")
    if not found:
        pytest.fail("prometheus is not on PATH: install it with `bash scripts/install_prometheus.sh` (Debian's "
                    "package; root or sudo), which scripts/test.sh runs before the tests", pytrace=False)
    return found


def free_ports(n: int) -> int:
    """A base port such that ``base .. base + n - 1`` are free on 127.0.0.1 now."""
    for _ in range(200):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:  # 400 for a bad query: the body says why
        return json.loads(err.read())


def text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def dashboard_queries(rate_interval: str = "1m") -> list[tuple[str, str, str]]:
    """``(panel title, legend, PromQL)`` with Grafana's variables resolved as Grafana would for
    "All" datasets."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", rate_interval).replace("$dataset", ".*")
            out.append((panel["title"], target.get("legendFormat", ""), expr))
    return out


def sample_names(exposition: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line and line[0] != "#"}


@pytest.fixture
def trainers(tmp_path: Path) -> Iterator[int]:
    """Two trainer ranks serving their metrics on ``base`` and ``base + 1``; yields ``base``."""
    base = free_ports(2)
    procs = [subprocess.Popen([sys.executable, "-c", TRAINER, str(rank), str(base)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for rank in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        yield base
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(20)


@pytest.fixture
def prometheus(prometheus_bin: str, tmp_path: Path) -> Iterator:
    """``start(server_target, trainer_targets)``: Prometheus with docker/prometheus.yml's jobs,
    pointed at local targets and scraping every second; returns its base URL."""
    procs: list[subprocess.Popen] = []

    def start(server: str, trainer_targets: list[str]) -> str:
        config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        targets = {"tokenfeed-server": [server], "tokenfeed-trainer": trainer_targets}
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = free_ports(1)
        procs.append(subprocess.Popen(
            [prometheus_bin, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w")))
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert procs[-1].poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                return urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200
            except OSError:
                return False
        poll(ready, timeout=60, interval=0.2)
        return base

    yield start
    for p in procs:
        p.terminate()
        p.wait(30)


def test_dashboard_queries_return_data_from_a_real_prometheus(start_server, prometheus, trainers, tmp_path):
    docs = make_documents(600, seed=11)
    files = write_jsonl(tmp_path / "data", docs, files=3)
    with files[0].open("a") as f:
        f.write("{broken json\n")
    server = start_server(jsonl_config(tmp_path / "data", shard_bytes=8 << 10), extra_args=["--metrics-port", "0"])
    server_metrics = metrics_url(server)
    target = server_metrics.removeprefix("http://").removesuffix("/metrics")
    base = prometheus(target, [f"127.0.0.1:{trainers}", f"127.0.0.1:{trainers + 1}"])

    def targets_up() -> bool:
        active = api(base, "/api/v1/targets")["data"]["activeTargets"]
        return len(active) == 3 and all(t["health"] == "up" for t in active)
    poll(targets_up, timeout=60, interval=0.25)  # scraped before the load starts: counters rise in view

    from client import StreamingDataset

    stop, counted = threading.Event(), [0, 0]

    def load(rank: int) -> None:
        ds = StreamingDataset(server.address, "docs", seq_len=128, batch_size=8, seed=1, rank=rank, world_size=2)
        assert ds.describe().name == "docs"  # as a trainer does at start-up (a finished RPC to count)
        for batch in ds:
            counted[rank] += batch["input_ids"].numel()
            if stop.wait(0.004):  # a modest, steady load on a shared 2-core machine
                break

    clients = [threading.Thread(target=load, args=(r,), daemon=True) for r in range(2)]
    for c in clients:
        c.start()
    try:
        queries = dashboard_queries()
        missing: dict[str, str] = {}
        exposed: set[str] = set()

        def all_have_data() -> bool:
            missing.clear()
            exposed.clear()
            exposed.update(sample_names(text(server_metrics)),
                           sample_names(text(f"http://127.0.0.1:{trainers}/metrics")))
            for title, legend, expr in queries:
                reply = api(base, "/api/v1/query", query=expr)
                assert reply["status"] == "success", f"{title} / {legend}: invalid PromQL {expr!r}: {reply}"
                if not reply["data"]["result"]:
                    missing[f"{title} / {legend}"] = expr
            return not missing
        try:
            poll(all_have_data, timeout=90, interval=0.5)
        except AssertionError:
            pytest.fail(f"dashboard queries without data after 90 s: {json.dumps(missing, indent=1)}")
    finally:
        stop.set()
        for c in clients:
            c.join(30)

    assert min(counted) > 0
    names = {n for _, _, e in queries for n in re.findall(r"tokenfeed_\w+", e)}
    assert names <= exposed, f"dashboard names series the server and trainers do not expose: {names - exposed}"

    by_legend = {(t, legend): e for t, legend, e in queries}
    hit = _scalar(base, by_legend[("Cache hit rate", "hit rate")])
    assert 0.0 <= hit <= 1.0
    p50 = _scalar(base, by_legend[("Batch latency (assembly of one message)", "p50")])
    p99 = _scalar(base, by_legend[("Batch latency (assembly of one message)", "p99")])
    assert 0 < p50 <= p99 < 60
    stall = api(base, "/api/v1/query", query=by_legend[("Data-stall fraction per rank", "rank {{rank}}")])
    assert sorted(r["metric"]["rank"] for r in stall["data"]["result"]) == ["0", "1"]
    sent = value(scrape(server_metrics), "tokenfeed_sent_tokens_total", dataset="docs")
    assert sent >= sum(counted)  # the server sent at least what the clients consumed


def _scalar(base: str, expr: str) -> float:
    (result,) = api(base, "/api/v1/query", query=expr)["data"]["result"]
    value = float(result["value"][1])
    assert math.isfinite(value), f"{expr} = {value}"
    return value
