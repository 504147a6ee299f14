"""Per-request work and memory are bounded (issue 17): locating a far position costs a division,
not a walk over epochs; a mixture's long row assignment leaves the event loop free; a request
whose padded packing would need more memory than allowed is refused; Describe shows no absolute
server paths."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import StreamingDataset
from server.serve.drive import complete
from server.stream import walk
from server.supply.cache import ShardCache
from server.config import DatasetConfig, MixtureConfig
from server.stages.dataset import Dataset
from server.stages.mixture import build_mixture
from server.stages.order import Locator
from server.supply.store import ShardStore
from server.stream.walker import MixtureWalker, Walker
from tests.conftest import jsonl_config, make_documents, write_jsonl
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

SEQ = 32


def small(tmp_path: Path, name: str, seed: int) -> Dataset:
    write_jsonl(tmp_path / name, make_documents(12, seed=seed, max_len=400), files=2)
    return Dataset(name, DatasetConfig.model_validate(
        {"source": {"type": "jsonl", "paths": [str(tmp_path / name / "*.jsonl")], "shard_bytes": 1024}}))


async def test_a_far_skip_on_a_small_dataset_is_one_jump(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    """A rank of a large job on a tiny dataset skips thousands of epochs per message: it lands
    where reading row by row would, and costs a division (it walked epoch by epoch)."""
    ds = small(tmp_path, "tiny", 1)
    store = ShardStore(ShardCache(64 << 20), pool)
    reader = Walker(store, ds, 3, SEQ, "concat", Locator())
    out = np.empty((1, SEQ + 1), dtype=ds.dtype)
    while len(ds.shard_tokens) < ds.num_shards:  # learn every count (one epoch and a bit)
        await complete(reader.store, walk.take(reader, out))
    per_epoch = store.epoch_rows(ds, 3, 0, SEQ, "concat")[-1]
    far = 5000 * per_epoch + 7
    jumper = Walker(store, ds, 3, SEQ, "concat", Locator())
    await complete(jumper.store, walk.skip(jumper, 1))
    t0 = time.perf_counter()
    await complete(jumper.store, walk.skip(jumper, far - 1))
    took = time.perf_counter() - t0
    first = np.empty((1, SEQ + 1), dtype=ds.dtype)
    await complete(jumper.store, walk.take(jumper, first))
    walker = Walker(store, ds, 3, SEQ, "concat", Locator(row=0))
    walker.epoch, walker.row = 5000, 5000 * per_epoch  # the epoch start, by the definition of the order
    await complete(walker.store, walk.skip(walker, 7))
    expected = np.empty((1, SEQ + 1), dtype=ds.dtype)
    await complete(walker.store, walk.take(walker, expected))
    assert np.array_equal(first, expected) and jumper.epoch == 5000
    assert took < 0.05, f"skipping 5,000 epochs took {took:.3f} s"
    for w in (reader, jumper, walker):
        w.close()


async def test_a_long_mixture_assignment_leaves_the_loop_free(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    a, b = small(tmp_path, "a", 1), small(tmp_path, "b", 2)
    mix = build_mixture("mix", MixtureConfig.model_validate({"weights": {"a": 0.7, "b": 0.3}}), {"a": a, "b": b})
    store = ShardStore(ShardCache(64 << 20), pool)
    walker = MixtureWalker(store, mix, 1, SEQ, "concat", Locator())
    out = np.empty((64, SEQ + 1), dtype=a.dtype)
    await complete(walker.store, walk.take(walker, out))  # counts learned
    counts = [p.row for p in walker.parts]
    mix.schedule.assign(walker.row, counts, 1_000_000)  # in one go: what the sliced assignment must reach
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.005)

    task = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0.02)
    # ~1.7 s of sequential assignment: a loop that waited for it stalls that long
    await complete(walker.store, walk.skip(walker, 1_000_000))
    task.cancel()
    gaps = np.diff(ticks)
    assert len(gaps) > 20 and gaps.max() < 0.5, f"the loop stalled {gaps.max():.3f} s"
    assert walker.row == 64 + 1_000_000 and [p.row for p in walker.parts] == counts
    walker.close()


@pytest.mark.integration
def test_a_padded_packing_too_big_for_the_memory_budget_is_refused(tmp_path: Path, start_server) -> None:
    write_jsonl(tmp_path / "data", make_documents(200, seed=4, max_len=300), files=2)
    server = start_server(jsonl_config(tmp_path / "data", max_seq_len=65536, max_batch_size=4,
                                       stream_memory_bytes="8MiB"))
    ds = StreamingDataset(server.address, "docs", seq_len=256, batch_size=4, packing="pad")
    next(iter(ds))  # the first shards' counts are known now
    ds.close()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenFeedStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            next(iter(stub.StreamBatches(pb.StreamRequest(dataset="docs", seq_len=65536, batch_size=1, world_size=1,
                                                          packing="pad", batches_per_message=1), timeout=30)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("seq_len: packing='pad' at this seq_len makes packed shards of")
    assert "server.stream_memory_bytes" in err.value.details()


@pytest.mark.integration
def test_describe_shows_no_absolute_server_paths(tmp_path: Path, start_server) -> None:
    write_jsonl(tmp_path / "data", make_documents(40, seed=4), files=2)
    server = start_server(jsonl_config(tmp_path / "data", shard_bytes=4096))
    with grpc.insecure_channel(server.address) as channel:
        info = pb_grpc.TokenFeedStub(channel).Describe(pb.DescribeRequest(), timeout=30).datasets[0]
    names = [s.name for s in info.shards]
    assert len(names) > 2 and all(n.startswith("part-00") for n in names), names
    assert str(tmp_path) not in str(info)
