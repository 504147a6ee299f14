"""``data-server prepare --ray``: shards made as Ray tasks on a real local cluster (a head and a worker
node, each its own raylet process) are byte-identical to a single-machine prepare, also when the
worker node is killed mid-run; a missing ray or an unreachable cluster is a one-line error."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_prepare import files_of
from tests.test_tokenizers import train_bpe

pytestmark = [pytest.mark.slow, pytest.mark.integration]

STDLIB = Path(sysconfig.get_paths()["stdlib"])
#: Python sources of a few stdlib packages: real text of mixed sizes, about 80 shards of 32 KiB.
PACKAGES = ("email", "json", "asyncio", "xml", "logging", "http", "unittest", "multiprocessing")


def ensure_ray() -> Any:
    """The ray module, installed into this environment if it is missing (the test fails if it cannot)."""
    try:
        import ray
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "ray>=2.9"], check=True, timeout=600)
        import ray
    return ray


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A real local Ray cluster: the head node (its own GCS and raylet processes, one CPU), no driver.
    Node deaths are noticed within about 2 s (the default takes over 10 s)."""
    ensure_ray()
    from ray.cluster_utils import Cluster

    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    try:
        head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": system})
    except Exception as err:  # noqa: BLE001 - Ray gives a raylet 30 s (fixed) to register: a loaded machine
        if "timed out during startup" not in str(err):  # may need longer; start once more, from nothing
            raise
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True,
                       timeout=60)
        head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": system})
    yield head
    head.shutdown()


@pytest.fixture
def worker(cluster: Any) -> Any:
    """A live worker node (one CPU, its own raylet process) of ``cluster``: the one already there, or a new
    one when a test killed it (joining takes seconds, so tests share it)."""
    if not cluster.worker_nodes:
        cluster.add_node(num_cpus=1)
    return next(iter(cluster.worker_nodes))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config (``py``: stdlib sources, a small BPE) and its local prepare in ``local/``."""
    root = tmp_path_factory.mktemp("rayprep")
    paths = [str(STDLIB / pkg / "**" / "*.py") for pkg in PACKAGES]
    train_bpe(root / "tokenizer.json")
    config = {"datasets": {"py": {"source": {"type": "text", "paths": paths, "shard_bytes": 32 << 10},
                                  "tokenizer": {"type": "hf", "path": str(root / "tokenizer.json")}}}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    local = run_prepare(root, "local", "--workers", "2")
    assert local.returncode == 0, local.stderr
    (root / "local.log").write_text(local.stderr)
    return root


def prepare_args(root: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server", "prepare", "--config", str(root / "config.yaml"), "--dataset", "py",
            "--out", str(root / out), *extra]


def run_prepare(root: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(prepare_args(root, out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=120)


def prepare_log(stderr: str, out: Path) -> list[str]:
    """The first and last lines of prepare's own log (those in between come every 5 s), without the time
    stamps, the output directory and the rates."""
    lines = [line.split(" server.prepare: ", 1)[1] for line in stderr.splitlines() if " server.prepare: " in line]
    lines = [line for line in lines if line.startswith("preparing") or "(done)" in line]
    return [re.sub(r"[\d.]+ (MB|s|M tokens)\b", r"N \1", line.replace(str(out), "OUT")) for line in lines]


def test_ray_prepare_is_byte_identical_to_a_local_one(corpus, cluster, worker):
    proc = run_prepare(corpus, "ray", "--ray", cluster.address)
    assert proc.returncode == 0, proc.stderr
    assert files_of(corpus / "ray") == files_of(corpus / "local")
    assert "prepare on Ray: 2 node(s), 2 CPUs" in proc.stderr
    local_log = (corpus / "local.log").read_text()
    assert prepare_log(proc.stderr, corpus / "ray") == prepare_log(local_log, corpus / "local")
    assert "shards (done)" in proc.stderr and "MB/s of input" in proc.stderr and "M tokens/s" in proc.stderr


def test_ray_prepare_resumes_after_its_driver_was_killed(corpus, cluster, worker):
    proc = subprocess.Popen(prepare_args(corpus, "resumed", "--ray", cluster.address), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = corpus / "resumed" / "progress.jsonl"
    deadline = time.monotonic() + 60
    while not (progress.exists() and progress.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "no shard was recorded"
        time.sleep(0.01)  # polling a file another process writes: there is no event to await
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (corpus / "resumed" / "manifest.json").exists(), "prepare finished before it could be killed"
    rerun = run_prepare(corpus, "resumed", "--ray", cluster.address)
    assert rerun.returncode == 0, rerun.stderr
    counts = re.search(r"(\d+) shards, (\d+) already done", rerun.stderr)
    assert counts is not None and 3 <= int(counts.group(2)) < int(counts.group(1)), rerun.stderr
    assert files_of(corpus / "resumed") == files_of(corpus / "local")


def children(pid: int) -> list[int]:
    """The direct children of a process (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_worker_node_killed_mid_run_costs_only_its_shards(corpus, cluster, worker):
    raylet = worker.all_processes["raylet"][0].process.pid
    proc = subprocess.Popen(prepare_args(corpus, "killed", "--ray", cluster.address), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Ray titles a worker process by the task it runs: wait until the worker node runs a shard.
        deadline = time.monotonic() + 60
        busy: list[int] = []
        while not busy:
            assert proc.poll() is None and time.monotonic() < deadline, "no shard task ran on the worker node"
            busy = [c for c in children(raylet) if cmdline(c).startswith("ray::_ray_shard")]
            time.sleep(0.01)  # polling other processes' state: there is no event to await
        for pid in [raylet, *children(raylet)]:  # the whole node at once, its running task included
            os.kill(pid, signal.SIGKILL)
        cluster.worker_nodes.discard(worker)
        assert not (corpus / "killed" / "manifest.json").exists(), "prepare finished before the kill"
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    # The task the node was running died with it: Ray ran it again on the head, and nothing shows.
    assert files_of(corpus / "killed") == files_of(corpus / "local")
    assert re.search(r"prepare py: (\d+)/\1 shards \(done\)", stderr), stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_cluster_is_a_one_line_error(corpus):
    ensure_ray()
    address = f"127.0.0.1:{free_port()}"
    proc = run_prepare(corpus, "nowhere", "--ray", address)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"data-server: --ray {address}: cannot reach")
    assert "Traceback" not in proc.stderr and not (corpus / "nowhere").exists()
    wrong = run_prepare(corpus, "nowhere", "--ray", "head-node")
    assert wrong.returncode == 2 and wrong.stderr.strip() == (
        "data-server: --ray: 'head-node' is not `auto` or HOST:PORT (the head node's GCS address, e.g. "
        "10.0.0.5:6379, or ray://HOST:10001 for Ray Client)")


def test_ray_not_installed_is_a_one_line_error_naming_the_extra(corpus):
    # `sys.modules['ray'] = None` is how Python spells "not importable": the import fails as if absent.
    code = ("import sys; sys.modules['ray'] = None\n"
            "from server.__main__ import main\n"
            f"sys.exit(main({prepare_args(corpus, 'noray', '--ray', 'auto')[3:]!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    hint = "data-server: --ray: ray is not installed; install it with pip install 'tokenfeed[ray]'"
    assert proc.stderr.strip() == hint
