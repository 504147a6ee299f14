"""Resume is a seek, not a replay (issue 3): time from ``load_state_dict`` to the first batch when
resuming at 10% and at 90% of an epoch, on a cold server (restarted, empty cache) and a warm one;
and the reconnect time after a server restart.

    python -m benchmarks.bench_resume [--repeats 5]

Corpus: the stdlib sources split into >= 100 shards of 256 KiB, byte tokenizer, seq_len 2048,
batch 8. Saves ``benchmarks/results/resume.json``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import Server, save
from client import StreamingDataset

SEQ, BATCH = 2048, 8


def write_config(directory: Path) -> Path:
    stdlib = sysconfig.get_paths()["stdlib"]
    config = {"datasets": {"stdlib": {"source": {
        "type": "text", "paths": [f"{stdlib}/**/*.py"], "exclude": ["**/site-packages/**"], "shard_bytes": "256KiB"}}}}
    path = directory / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def states_at(address: str, fractions: list[float]) -> tuple[dict[float, dict], int, int]:
    """Stream one epoch once; keep the state at each fraction of it."""
    ds = StreamingDataset(address, "stdlib", seq_len=SEQ, batch_size=BATCH)
    info = ds.describe()
    batches_bound = int((sum(s.bytes for s in info.shards) * 1.05 / SEQ + info.num_shards) / BATCH)
    states = []
    for _ in itertools.islice(ds, batches_bound):
        states.append(ds.state_dict())
    info = ds.describe()
    rows_epoch = sum(-(-s.tokens // SEQ) for s in info.shards)
    batches_epoch = rows_epoch // BATCH
    return {f: states[int(f * batches_epoch)] for f in fractions}, info.num_shards, rows_epoch


def first_batch_after_load(address: str, state: dict) -> float:
    ds = StreamingDataset(address, "stdlib", seq_len=SEQ, batch_size=BATCH)
    t0 = time.perf_counter()
    ds.load_state_dict(state)
    next(iter(ds))
    return time.perf_counter() - t0


def reconnect_time(server: Server) -> float:
    """Kill the server mid-stream, restart it on the same port, time the gap between batches."""
    ds = StreamingDataset(server.address, "stdlib", seq_len=SEQ, batch_size=BATCH)
    it = iter(ds)
    next(it)
    port = server.address.rsplit(":", 1)[1]
    server.proc.kill()
    server.proc.wait()
    t0 = time.perf_counter()
    restarted = Server(args=server.cmd[server.cmd.index("--port") + 2 :])
    restarted.cmd[restarted.cmd.index("--port") + 1] = port
    with restarted:
        next(it)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    fractions = [0.1, 0.9]
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp))
        with Server(config) as server:
            states, shards, rows_epoch = states_at(server.address, fractions)
            warm = {f: [first_batch_after_load(server.address, states[f]) for _ in range(args.repeats)]
                    for f in fractions}
        cold: dict[float, list[float]] = {f: [] for f in fractions}
        for _ in range(args.repeats):
            for f in fractions:
                with Server(config) as server:
                    cold[f].append(first_batch_after_load(server.address, states[f]))
        with Server(config) as server:
            reconnects = [reconnect_time(server)]
    result = {
        "shards": shards, "rows_per_epoch": rows_epoch, "seq_len": SEQ, "batch_size": BATCH,
        "state_bytes": len(__import__("json").dumps(states[0.9])),
        "cold_s": {str(f): statistics.median(v) for f, v in cold.items()},
        "warm_s": {str(f): statistics.median(v) for f, v in warm.items()},
        "cold_runs": {str(f): v for f, v in cold.items()}, "warm_runs": {str(f): v for f, v in warm.items()},
        "reconnect_after_restart_s": reconnects,
    }
    result["cold_ratio_90_over_10"] = result["cold_s"]["0.9"] / result["cold_s"]["0.1"]
    print(f"{shards} shards, {rows_epoch} rows/epoch, state {result['state_bytes']} bytes")
    for kind in ("cold", "warm"):
        med = result[f"{kind}_s"]
        print(f"{kind}: first batch after load_state_dict at 10%: {med['0.1'] * 1e3:.1f} ms, "
              f"at 90%: {med['0.9'] * 1e3:.1f} ms (ratio {med['0.9'] / med['0.1']:.2f})")
    print(f"reconnect after a SIGKILL + restart (includes server start): {reconnects[0]:.2f} s")
    print("saved", save("resume", result))


if __name__ == "__main__":
    main()
