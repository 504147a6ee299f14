"""``prepare --ray``: the shards of a preparation as Ray tasks across a cluster's nodes.

Each task reads, tokenizes and writes one shard file into the shared output directory exactly as
``prepare_shard`` does on one machine, and returns its manifest entry; the driver (``prepare``)
records the entries and writes the manifest last. A node lost mid-run costs only the shards it was
writing: Ray runs those tasks again elsewhere (``max_retries``), and since a shard's bytes depend
only on the corpus and the tokenizer, the result is byte-identical to a single-machine prepare.

Ray is imported here only, and only when ``--ray`` is given: the server never needs it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

from server.config import Config
from server.errors import ConfigError, TokenfeedError
from server.prepare import PrepareResult, prepare, prepare_shard
from server.stages.files import is_url
from server.stages.dataset import Dataset

log = logging.getLogger(__name__)

#: Times Ray runs a shard's task again after its worker or node died. A shard is idempotent (written
#: to a temporary name, then renamed), so a retry can never leave a mix of two attempts.
MAX_RETRIES = 5
#: Tasks in flight per CPU of the cluster: enough to keep every core busy while the driver records
#: finished shards, few enough that a huge corpus is never submitted (and held) at once.
IN_FLIGHT_PER_CPU = 2
INSTALL_HINT = "pip install 'tokenfeed[ray]'"


def connect(address: str) -> Any:
    """Attach this process to the Ray cluster at ``address`` (``auto``: the one started on this machine
    with ``ray start``, or ``RAY_ADDRESS``); the ``ray`` module. Raises a one-line ``ConfigError``
    naming ``--ray`` when ray is not installed or the cluster cannot be reached."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray: ray is not installed; install it with {INSTALL_HINT}") from None
    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--ray {address}: cannot connect to a Ray cluster ({first})") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody listens on (``ray.init`` would wait for a minute first)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 literal
    if not host or not port.isdigit():
        raise ConfigError(f"--ray: {address!r} is not `auto` or HOST:PORT (the head node's GCS address, "
                          "e.g. 10.0.0.5:6379, or ray://HOST:10001 for Ray Client)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise ConfigError(f"--ray {address}: cannot reach the Ray head node ({err.strerror or err}); "
                          "is the cluster started (`ray start --head`)?") from None


def prepare_on_ray(config: Config, name: str, out: str, address: str, *, max_shards: int | None = None,
                   level: int = 3) -> PrepareResult:
    """``prepare`` with its shards made by Ray tasks on the cluster at ``address``. ``out`` must be a
    directory every node sees at the same path (a shared file system), as must the corpus and tokenizer."""
    ray = connect(address)  # before anything is written: an unreachable cluster leaves no trace
    out = out if is_url(out) else os.path.abspath(out)
    try:
        result = prepare(config, name, out, max_shards=max_shards, level=level,
                         runner=lambda ds, cfg, todo, o, lvl: _fan_out(ray, ds, cfg, todo, o, lvl))
    finally:
        ray.shutdown()  # the job ends: Ray stops any task still running for it
    if not is_url(out):  # (an object store has no half-written files)
        _drop_dead_attempts(out)
    return result


def _drop_dead_attempts(out: str) -> None:
    """Remove the half-written files of attempts whose node died (their retries wrote the shard)."""
    if not os.path.isdir(out):
        return
    for name in os.listdir(out):
        if name.startswith(".shard-") and name.endswith(".tmp"):
            os.remove(os.path.join(out, name))


def _fan_out(ray: Any, ds: Dataset, config: Config, todo: list[int], out: str, level: int) -> Iterator[dict]:
    """Submit a bounded window of shard tasks, yield entries as they complete, log which nodes worked."""
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False,
                      scheduling_strategy="SPREAD")(_ray_shard)
    config_ref = ray.put(config.model_dump_json())  # shipped to each node once, not once per task
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus < 1:  # the tasks would wait forever for a CPU
        raise ConfigError("--ray: the Ray cluster offers no CPUs (start its nodes with `ray start --num-cpus N`)")
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    log.info("prepare on Ray: %d node(s), %d CPUs; %d shard tasks", nodes, cpus, len(todo))
    pending, per_node = iter(todo), Counter[str]()
    waiting: list[Any] = []  # ObjectRefs of the tasks in flight
    window = cpus * IN_FLIGHT_PER_CPU
    while True:
        waiting += [task.remote(config_ref, ds.name, i, out, level) for i in _take(pending, window - len(waiting))]
        if not waiting:
            break
        ready, waiting = ray.wait(waiting, num_returns=1)
        entry, node = _result(ray, ready[0])
        per_node[node] += 1
        yield entry
    log.info("prepare on Ray: shards per node: %s", ", ".join(f"{n[:12]}={c}" for n, c in sorted(per_node.items())))


def _take(it: Iterator[int], n: int) -> list[int]:
    return [i for _, i in zip(range(max(0, n)), it)]


def _result(ray: Any, ref: Any) -> tuple[dict, str]:
    """A finished task's (entry, node id). A task's own error is re-raised as itself (not wrapped with a
    remote traceback), so the CLI reports an ``Unavailable`` source or a bad config as on one machine."""
    try:
        entry, node = ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, (TokenfeedError, ConfigError)):
            raise err.cause from None
        if isinstance(err.cause, ImportError):  # a node whose Python lacks tokenfeed (or one of its parts)
            raise ConfigError(f"--ray: a node cannot run the shard tasks ({err.cause}); install the same "
                              f"tokenfeed with {INSTALL_HINT} on every node of the cluster") from None
        raise
    return entry, node


# ---- on the worker -------------------------------------------------------------------------------
#: This worker process's Datasets by (config, name): Ray reuses a worker for many tasks, and opening a
#: Dataset (globbing, sizing and fingerprinting the corpus) is worth doing once per process.
_DATASETS: dict[tuple[str, str], Dataset] = {}


def _ray_shard(config_json: str, name: str, index: int, out: str, level: int) -> tuple[dict, str]:
    """The body of one Ray task: ``prepare_shard`` on this node; its entry and this node's id."""
    import ray

    # One task is one core's worth (num_cpus=1): the tokenizers thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    key = (config_json, name)
    if key not in _DATASETS:
        _DATASETS.clear()  # one preparation at a time per worker: do not hold old corpora
        _DATASETS[key] = Dataset(name, Config.model_validate_json(config_json).datasets[name])
    entry = prepare_shard(_DATASETS[key], index, out, level)
    return entry, ray.get_runtime_context().get_node_id()
