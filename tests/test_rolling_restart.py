"""Rolling restarts and a lost replica under a running job, with nothing lost: three server processes
on 127.0.0.1-3 behind one name (a headless Service in miniature), a 4-rank job streaming through
``dns:///name:port``; each replica is restarted in turn with SIGTERM, then the busiest is killed
with SIGKILL. Every rank's batches must equal an uninterrupted stream's: 0 lost, 0 repeated."""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from client import StreamingDataset
from tests.conftest import jsonl_config, make_documents, write_jsonl
from tests.hosts import ReplicaProcess, hosts_name

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]  # Linux routes all of 127/8 to loopback
WORLD, SEQ, ROWS, SEED = 4, 128, 4, 7
STEP_S = 0.02  # a "training step": paces the job so that every restart falls mid-stream
ADVANCE = 20  # batches every rank must take between two events: the job goes on
DEADLINE_S = 60.0  # generous: a loaded 2-core machine; nothing here asserts a time


class Progress:
    """Batches taken per rank; waits that end as soon as a condition holds (or a rank failed)."""

    def __init__(self) -> None:
        self.counts = [0] * WORLD
        self.error: BaseException | None = None
        self._cond = threading.Condition()

    def advance(self, rank: int) -> None:
        with self._cond:
            self.counts[rank] += 1
            self._cond.notify_all()

    def fail(self, err: BaseException) -> None:
        with self._cond:
            self.error = err
            self._cond.notify_all()

    def wait_for(self, done: Callable[[], bool], what: str) -> None:
        """Wait until ``done()``; re-checked after every batch, so it may read the ranks' state."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self.error is not None or done(), DEADLINE_S)
        if self.error is not None:
            raise AssertionError(f"a rank failed while waiting for {what}") from self.error
        assert ok, f"not within {DEADLINE_S:.0f}s: {what} (batches per rank: {self.counts})"

    def each_advances(self, n: int, what: str) -> None:
        target = [c + n for c in self.counts]
        self.wait_for(lambda: all(c >= t for c, t in zip(self.counts, target, strict=True)),
                      f"every rank takes {n} batches {what}")


class Rank(threading.Thread):
    """One rank of the job: takes batches at the pace of a training step until told to stop."""

    def __init__(self, rank: int, address: str, progress: Progress, stop: threading.Event) -> None:
        super().__init__(name=f"rank-{rank}", daemon=True)
        self.rank, self.progress, self.stop = rank, progress, stop
        self.dataset = StreamingDataset(address, dataset="docs", seq_len=SEQ, batch_size=ROWS, seed=SEED, rank=rank,
                                        world_size=WORLD, fields=["tokens"], batches_per_message=4,
                                        reconnect_deadline_s=DEADLINE_S)
        self.batches: list[np.ndarray] = []
        self.waits: list[float] = []  # seconds each next() took: the data-wait the trainer would see

    def run(self) -> None:
        batches = iter(self.dataset)
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                batch = next(batches)
                self.waits.append(time.monotonic() - t0)
                self.batches.append(batch["tokens"].numpy().astype(np.uint16))
                self.progress.advance(self.rank)
                self.stop.wait(STEP_S)
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread, which raises it
            self.progress.fail(err)
        finally:
            batches.close()  # type: ignore[attr-defined]
            self.dataset.close()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[ReplicaProcess]]:
    write_jsonl(tmp_path / "data", make_documents(300, seed=11), files=3)
    config = jsonl_config(tmp_path / "data", shard_bytes=32 << 10)
    first = ReplicaProcess(HOSTS[0], config, tmp_path, 0).start()  # port 0: the first picks the port for all
    rest = [ReplicaProcess(host, config, tmp_path, first.server.port) for host in HOSTS[1:]]
    starting = [threading.Thread(target=r.start) for r in rest]
    for t in starting:
        t.start()
    for t in starting:
        t.join()
    started = [first, *rest]
    try:
        assert all(r.server.proc is not None and r.server.proc.poll() is None for r in started), "a replica died"
        yield started
    finally:
        for r in started:
            r.server.stop()


def _hash(batch: np.ndarray) -> bytes:
    return hashlib.blake2b(batch.tobytes(), digest_size=16).digest()


def _reference(address: str, rank: int, n: int) -> list[np.ndarray]:
    """The rank's first ``n`` batches from one replica, without interruption."""
    ds = StreamingDataset(address, dataset="docs", seq_len=SEQ, batch_size=ROWS, seed=SEED, rank=rank,
                          world_size=WORLD, fields=["tokens"])
    try:
        return [b["tokens"].numpy().astype(np.uint16) for b in itertools.islice(iter(ds), n)]
    finally:
        ds.close()


def _disrupt(replica: ReplicaProcess, ranks: list[Rank], progress: Progress, kill: bool) -> None:
    """Stop (SIGTERM: drain) or kill (SIGKILL) a replica; the ranks it served move elsewhere and the
    whole job goes on while it is down; then it comes back on its address."""
    served = [r for r in ranks if r.dataset.address == replica.address]
    assert served, f"no rank streams from {replica.address}: nothing would happen mid-stream"
    how = "SIGKILL" if kill else "SIGTERM"
    if kill:
        replica.server.kill()
    else:
        assert replica.server.stop() == 0, replica.server.log()[-3000:]
    progress.wait_for(lambda: all(r.dataset.address != replica.address for r in served),
                      f"ranks {[r.rank for r in served]} leave {replica.address} after its {how}")
    progress.each_advances(ADVANCE, f"while {replica.address} is down ({how})")
    replica.start()
    progress.each_advances(ADVANCE, f"after {replica.address} came back")


def test_rolling_restart_and_a_killed_replica_lose_and_repeat_nothing(replicas: list[ReplicaProcess]) -> None:
    port = replicas[0].server.port
    progress, stop = Progress(), threading.Event()
    with hosts_name(HOSTS) as name:
        ranks = [Rank(rank, f"dns:///{name}:{port}", progress, stop) for rank in range(WORLD)]
        assert [r.dataset.address for r in ranks] == [f"{h}:{port}" for h in (*HOSTS, HOSTS[0])]
        for r in ranks:
            r.start()
        try:
            progress.each_advances(ADVANCE, "at the start")
            for replica in replicas:  # the rolling restart
                _disrupt(replica, ranks, progress, kill=False)
            busiest = max(replicas, key=lambda p: sum(r.dataset.address == p.address for r in ranks))
            _disrupt(busiest, ranks, progress, kill=True)  # a lost pod, mid-stream
        finally:
            stop.set()
            for r in ranks:
                r.join(DEADLINE_S)
    assert progress.error is None, progress.error
    lost = repeated = 0
    differ: list[str] = []
    for r in ranks:
        ref = _reference(replicas[0].address, r.rank, len(r.batches))
        got_h, ref_h = Counter(map(_hash, r.batches)), Counter(map(_hash, ref))
        lost += sum((ref_h - got_h).values())
        repeated += sum((got_h - ref_h).values())  # or foreign: batches the reference does not hold
        first = next((i for i, (a, b) in enumerate(zip(r.batches, ref, strict=True)) if not np.array_equal(a, b)), None)
        if first is not None:
            differ.append(f"rank {r.rank} from batch {first}")
    # the data-wait a trainer would see (the first batch also waits for the connection: left out)
    print(f"\nrolling restart: {sum(len(r.batches) for r in ranks)} batches, lost {lost}, repeated {repeated}; "
          "data-wait, longest per rank: " + ", ".join(f"rank {r.rank} {max(r.waits[1:]):.2f}s" for r in ranks)
          + "; in all: " + ", ".join(f"rank {r.rank} {sum(r.waits[1:]):.2f}s" for r in ranks))
    assert lost == 0 and repeated == 0 and not differ, f"lost {lost}, repeated {repeated}, differing: {differ}"
