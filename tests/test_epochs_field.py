"""``BatchChunk.epochs`` (issue 16): each batch's epoch is that of its first row, on the fast path
(``Walker.take_now``, a message's rows copied from packed shards at once) as on the row-by-row
path (``Walker.take_now_rows``). A message of several batches can straddle an epoch's end: the fast path
used to stamp all its batches with the epoch where the message ended."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tests.conftest import jsonl_config, make_documents, write_jsonl
from tokenfeed import wire
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

SEQ, BATCH, PER_MESSAGE = 32, 4, 8


@pytest.fixture(scope="module")
def served(module_servers, tmp_path_factory):
    """A small corpus in a few shards of a few rows each: epochs end every few messages."""
    path = tmp_path_factory.mktemp("epochs") / "data"
    write_jsonl(path, make_documents(40, seed=9, max_len=600), files=2)
    server = module_servers(jsonl_config(path, shard_bytes=2048))
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)])
    yield pb_grpc.TokenFeedStub(channel)
    channel.close()


def messages(feed: pb_grpc.TokenFeedStub, n: int, **fields: int | bool) -> list[pb.BatchChunk]:
    """The first ``n`` messages of a stream (one DataLoader worker: every step of the rank)."""
    req = pb.StreamRequest(dataset="docs", seed=3, seq_len=SEQ, batch_size=BATCH, batches_per_message=PER_MESSAGE,
                           **fields)
    call = feed.StreamBatches(req, timeout=60)
    try:
        return [next(call) for _ in range(n)]
    finally:
        call.cancel()


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 3)])
def test_each_batch_carries_the_epoch_of_its_first_row(served, rank, world):
    """The fast path (no provenance) against the slow path (provenance forces it): the same
    batches, cursors and steps, and the same epoch for every batch, across many epoch ends."""
    fast = messages(served, 60, rank=rank, world_size=world)
    slow = messages(served, 60, rank=rank, world_size=world, provenance=True)
    straddling, previous = 0, 0
    for i, (f, s) in enumerate(zip(fast, slow)):
        np.testing.assert_array_equal(wire.decode_chunk(f), wire.decode_chunk(s), err_msg=f"message {i}")
        assert list(f.cursors) == list(s.cursors) and list(f.steps) == list(s.steps), f"message {i}"
        assert list(f.epochs) == list(s.epochs), f"message {i} (steps {list(f.steps)}): epochs differ"
        for j, epoch in enumerate(s.epochs):  # a batch starts at or after the cursor before it
            assert previous <= epoch <= s.cursors[j].epoch, f"message {i}, batch {j}"
            previous = s.cursors[j].epoch
        straddling += len(set(s.epochs)) > 1
    assert slow[-1].epochs[-1] >= 3, "the streams should cross several epochs"
    assert straddling, "no message straddled an epoch's end: the case under test never happened"
