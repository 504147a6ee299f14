"""The choices a ``StreamingDataset`` built with only address, dataset, seq_len and batch_size makes
(batches per message from the transport and the world size, decoding ahead only behind steps, fields
made when read, the cache's compression from its budget), and that none of them changes a batch:
the same batches, and exact resumes, whatever the batches per message."""

from __future__ import annotations

import copy
import itertools
import pickle
import threading
import time

import numpy as np
import pytest
import torch

from client import StreamingDataLoader, StreamingDataset
from client.batch import LazyBatch, lazy_batch, to_batch
from client.dataset import default_batches_per_message
from server.config import CacheSettings
from server.supply.cache import ShardCache
from server.stages.packing import TokenizedShard
from tests.conftest import jsonl_config

SEQ, BATCH = 64, 2


def take(ds: StreamingDataset, n: int) -> list[dict[str, torch.Tensor]]:
    return [dict(b) for b in itertools.islice(iter(ds), n)]


def assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert list(x) == list(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and x[k].equal(y[k]), k


# ---- the choices, without a server -----------------------------------------------------------
def test_batches_per_message_follows_the_transport_and_the_world_size():
    """The ceiling the server paces under: the transport's, shared among the ranks past 16."""
    tokens = 8 * 2048
    assert default_batches_per_message(tokens, shared_memory=True, world_size=1) == 64
    assert default_batches_per_message(tokens, shared_memory=False, world_size=1) == 16
    assert default_batches_per_message(tokens, shared_memory=True, world_size=16) == 64
    assert default_batches_per_message(tokens, shared_memory=True, world_size=64) == 16
    assert default_batches_per_message(tokens, shared_memory=True, world_size=1024) == 1
    assert default_batches_per_message(tokens, shared_memory=False, world_size=256) == 1
    # large batches: bounded by the message's tokens (4 MiB ring slots, 512 KiB inline at uint16)
    assert default_batches_per_message(32 * 8192, shared_memory=True, world_size=1) == 4
    assert default_batches_per_message(32 * 8192, shared_memory=False, world_size=1) == 1


def test_the_dataset_chooses_from_its_address_and_world_size():
    local = StreamingDataset("127.0.0.1:1", "d", seq_len=2048, batch_size=8)
    assert local.shared_memory and local.batches_per_message == 64 and local.decode_ahead is None
    remote = StreamingDataset("10.1.2.3:1", "d", seq_len=2048, batch_size=8)
    assert not remote.shared_memory and remote.batches_per_message == 16
    job = StreamingDataset("127.0.0.1:1", "d", seq_len=2048, batch_size=8, rank=3, world_size=64)
    assert job.batches_per_message == 16 and job.batches_adaptive
    named = StreamingDataset("127.0.0.1:1", "d", seq_len=2048, batch_size=8, batches_per_message=3, decode_ahead=0)
    assert named.batches_per_message == 3 and named.decode_ahead == 0
    assert not named.batches_adaptive  # a number given is exact
    with pytest.raises(ValueError, match="batches_per_message"):
        StreamingDataset("127.0.0.1:1", "d", batches_per_message=0)


def test_cache_compression_follows_its_budget():
    assert CacheSettings().compression == "auto"
    rows = np.tile(np.arange(100, dtype=np.uint16), 400)
    shard = TokenizedShard(tokens=rows, offsets=np.array([0, 40_000], dtype=np.int64))
    roomy = ShardCache(10 << 20, compression="auto")
    assert roomy.put("a", shard) and roomy.get("a") is not None
    assert roomy.stats()["compressed_bytes"] >= rows.nbytes  # kept as it is (zstd would make these 80 KB tiny)
    tight = ShardCache(3 * (shard.nbytes // 2), compression="auto")  # one raw shard fits, two do not
    assert tight.put("a", shard) and tight.put("b", shard)
    stats = tight.stats()
    assert stats["compressed_bytes"] < stats["raw_bytes_compressed"] - shard.nbytes // 2  # the second: compressed
    assert np.array_equal(tight.get("b").tokens, rows) and np.array_equal(tight.get("a").tokens, rows)


# ---- fields made when read ------------------------------------------------------------------
def test_a_lazy_batch_reads_as_the_batch_to_batch_makes():
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 258, size=(3, 33)).astype(np.uint16)
    rows[1, -5:] = 257
    eager = to_batch(rows, 256, 257)
    lazy = lazy_batch(rows.copy(), 256, 257)
    assert isinstance(lazy, dict) and len(lazy) == 4 and list(lazy) == list(eager) and "labels" in lazy
    assert lazy._pending and lazy["labels"].equal(eager["labels"]) and len(lazy._pending) == 3
    for other in (dict(lazy), {**lazy}, lazy.copy(), copy.copy(lazy), pickle.loads(pickle.dumps(lazy))):
        assert type(other) is dict and list(other) == list(eager)
        assert all(other[k].equal(eager[k]) for k in eager)
    assert [k for k, _ in lazy.items()] == list(eager) and not lazy._pending
    more = lazy_batch(rows.copy(), 256, 257)
    more["extra"] = torch.zeros(1)
    assert list(more) == [*eager, "extra"] and more.pop("cu_seqlens").equal(eager["cu_seqlens"])
    assert "cu_seqlens" not in more and more.get("cu_seqlens") is None and len(more) == 4
    assert LazyBatch({"a": 1}) == {"a": 1}


# ---- through a real server ----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(module_servers, tmp_path_factory):
    from tests.conftest import make_documents, write_jsonl

    path = tmp_path_factory.mktemp("docs")
    write_jsonl(path, make_documents(200, seed=5), files=3)
    return module_servers(jsonl_config(path, shard_bytes=16 << 10))


def test_batches_are_the_same_whatever_the_batches_per_message(server):
    reference = take(StreamingDataset(server.address, "docs", SEQ, BATCH, batches_per_message=1, decode_ahead=2), 40)
    for bpm, ahead, shm in [(None, None, None), (3, 0, True), (7, 2, False), (64, None, False)]:
        ds = StreamingDataset(server.address, "docs", SEQ, BATCH, batches_per_message=bpm, decode_ahead=ahead,
                              shared_memory=shm)
        assert_same(take(ds, 40), reference)
    ranks = [take(StreamingDataset(server.address, "docs", SEQ, BATCH, rank=r, world_size=2), 10) for r in (0, 1)]
    assert_same([b for pair in zip(*ranks) for b in pair], reference[:20])


@pytest.mark.parametrize("bpm", [None, 5])
def test_resume_is_exact_inside_a_message(server, bpm):
    reference = take(StreamingDataset(server.address, "docs", SEQ, BATCH, batches_per_message=1), 30)
    ds = StreamingDataset(server.address, "docs", SEQ, BATCH, batches_per_message=bpm)
    it = iter(ds)
    for _ in range(13):  # not a message boundary at either size
        next(it)
    state = ds.state_dict()
    it.close()
    for other_bpm in (None, 1, 4):
        resumed = StreamingDataset(server.address, "docs", SEQ, BATCH, batches_per_message=other_bpm)
        resumed.load_state_dict(state)
        assert_same(take(resumed, 17), reference[13:])


def test_decoding_goes_ahead_only_behind_steps(server):
    ds = StreamingDataset(server.address, "docs", SEQ, BATCH, batches_per_message=4)
    reference = take(StreamingDataset(server.address, "docs", SEQ, BATCH, batches_per_message=1), 60)
    it = iter(ds)
    quick = [next(it) for _ in range(20)]  # back to back: decoded in this thread, fields on read
    assert all(isinstance(b, LazyBatch) for b in quick)
    assert not [t for t in __import__("threading").enumerate() if t.name.endswith("tokenfeed-decode")]
    slow = []
    for _ in range(40):  # a 3 ms step per batch: decoded ahead, every field at once
        slow.append(next(it))
        time.sleep(0.003)
    assert type(slow[-1]) is dict
    assert_same([dict(b) for b in quick + slow], reference)
    it.close()


def test_one_long_pause_is_not_a_step_to_decode_behind(server):
    """A first step that compiles, or a rank waiting for its job to start, pauses once: the batches
    that follow back to back stay decoded in the consumer's thread (a many-rank job's ranks went
    ahead after the job's start, each with a thread, at 0.6x the tokens/s)."""
    ds = StreamingDataset(server.address, "docs", SEQ, BATCH, batches_per_message=4)
    reference = take(StreamingDataset(server.address, "docs", SEQ, BATCH, batches_per_message=1), 40)
    it = iter(ds)
    got = [next(it)]
    time.sleep(0.3)  # one pause, 100 steps' worth of the 3 ms that sends decoding ahead
    got += [next(it) for _ in range(39)]
    assert all(isinstance(b, LazyBatch) for b in got)
    assert not [t for t in threading.enumerate() if t.name.endswith("tokenfeed-decode")]
    assert_same([dict(b) for b in got], reference)
    it.close()


def test_the_loader_hands_batches_over_as_they_are(server):
    reference = take(StreamingDataset(server.address, "docs", SEQ, BATCH, batches_per_message=1), 12)
    for workers in (0, 2):
        loader = StreamingDataLoader(StreamingDataset(server.address, "docs", SEQ, BATCH), num_workers=workers)
        assert_same([dict(b) for b in itertools.islice(iter(loader), 12)], reference)
