"""Batches a message sized by the server (issue 23, goal 2): ``server.serve.pacing`` follows the
round of its loop, and a stream whose messages change size on the way gives exactly the batches,
cursors and provenance of a stream of fixed messages."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from client import StreamingDataset
from server.config import PrefetchSettings, ServerSettings
from server.serve.drive import stream_chunks
from server.serve.pacing import Pacing
from server.serve.protocol import parse_request
from server.stages.dataset import Dataset
from server.supply.cache import ShardCache
from server.supply.store import ShardStore
from tokenfeed.v1 import tokenfeed_pb2 as pb


class Ticks:
    """A clock that moves by the next of ``steps`` each time it is read."""

    def __init__(self, steps: Iterator[float]) -> None:
        self.now, self.steps = 0.0, steps

    def clock(self) -> float:
        self.now += next(self.steps)
        return self.now


def paced(steps: Iterator[float], streams: int, min_tokens: int = 0) -> Pacing:
    pacing = Pacing(target_gap_s=0.025, window_s=0.0, clock=Ticks(steps).clock, min_tokens=min_tokens)
    for _ in range(streams):
        pacing.opened()
    return pacing


def sizes_after_each(pacing: Pacing, messages: int, ceiling: int, batch_tokens: int = 0) -> list[int]:
    """The batches granted after each of ``messages`` messages (each one a window of the clock)."""
    sizes = []
    for _ in range(messages):
        pacing.sent()
        sizes.append(pacing.batches(ceiling, batch_tokens))
    return sizes


def test_one_stream_gets_its_ceiling_and_many_share_it_until_measured():
    pacing = paced(itertools.repeat(0.001), streams=1)
    assert pacing.batches(64) == 64
    for _ in range(63):
        pacing.opened()
    assert pacing.batches(64) == 1 and pacing.batches(16) == 1  # the ceiling shared: 64 / 64 streams
    pacing.closed()
    assert pacing.streams == 63


def test_a_long_round_makes_messages_smaller_and_a_short_one_larger():
    # 64 streams, one message every 1 ms: a round of 64 ms, past the 25 ms target: halve each time
    pacing = paced(itertools.repeat(0.001), streams=64)
    pacing._scale = 16.0
    assert sizes_after_each(pacing, 6, 64) == [8, 4, 2, 1, 1, 1]  # never below one batch
    # a message every 0.1 ms: a round of 6.4 ms: double, up to the stream's own ceiling
    pacing = paced(itertools.repeat(0.0001), streams=64)
    pacing._scale = 1.0
    assert sizes_after_each(pacing, 8, 16) == [2, 4, 8, 16, 16, 16, 16, 16]
    assert pacing._scale == 32  # one step past the largest ceiling asked for, never on to 64 meanwhile
    assert sizes_after_each(pacing, 2, 64) == [32, 64]  # then on up to the server's own bound: MAX_BATCHES_PER_MESSAGE)


def test_the_round_is_measured_over_a_window():
    """Messages counted over ``window_s`` of the clock: 8 streams, 40 messages in 0.2 s, a round of
    40 ms, so 16 batches become 10."""
    pacing = Pacing(target_gap_s=0.025, window_s=0.2, clock=Ticks(itertools.repeat(0.005)).clock, min_tokens=0)
    for _ in range(8):
        pacing.opened()
    pacing._scale = 16.0
    for _ in range(40):
        pacing.sent()
    assert pacing.batches(64) == 10


def test_a_long_round_never_shrinks_messages_below_the_floor():
    """A loaded server's round is long whatever the message size: messages stop shrinking where
    they hold ``min_tokens`` (here 32 K tokens: 8 batches of 4 x 1,025), within the ceiling."""
    pacing = paced(itertools.repeat(0.001), streams=64, min_tokens=32_768)
    for _ in range(64):
        pacing.served()  # every stream has had its first message
    pacing._scale = 16.0
    assert sizes_after_each(pacing, 5, 16, 4 * 1025) == [8, 8, 8, 8, 8]
    assert pacing._scale == 4.0  # one step below the floor the messages were held at, no further
    pacing._scale = 1.0  # (the round alone gives one batch)
    pacing.opened()  # a stream waiting for its first message (a rank joining, a job starting): the round alone
    assert pacing.batches(16, 4 * 1025) == 1
    pacing.closed(served=False)  # it went before its first
    assert pacing.batches(16, 4 * 1025) == 8
    assert pacing.batches(4, 4 * 1025) == 4  # a ceiling below the floor holds
    assert pacing.batches(16, 1 << 20) == 1  # one batch holds a million tokens
    assert pacing.batches(16) == 1  # (no batch size given: the round alone)
    starting = paced(itertools.repeat(0.001), streams=64, min_tokens=32_768)
    assert starting.batches(16, 4 * 1025) == 1  # not measured yet (a job starting): no floor, first batches soon
    pacing = paced(itertools.repeat(0.001), streams=64, min_tokens=0)  # 0: the round alone
    pacing._scale = 1.0
    assert pacing.batches(16, 4 * 1025) == 1


def test_messages_held_at_the_floor_grow_as_soon_as_the_round_is_short_again():
    """A loaded server keeps 64 streams' messages at the floor (8 batches) for many windows; the
    window after the round is short again, they grow (the scale did not wind down beneath the
    floor meanwhile), and the gauge says what the messages held."""
    from server import metrics

    steps = iter([0.001] * 41 + [0.0001] * 10)  # (the clock is read once more at the start)
    pacing = paced(steps, streams=64, min_tokens=32_768)
    for _ in range(64):
        pacing.served()
    pacing._scale = 8.0
    assert sizes_after_each(pacing, 40, 16, 4 * 1025) == [8] * 40
    assert metrics.PACED_BATCHES._value.get() == 8
    assert sizes_after_each(pacing, 3, 16, 4 * 1025) == [16, 16, 16]


def test_a_stream_that_never_gets_its_first_message_suspends_the_floor_only_while_others_start():
    """A job starting (streams opening, getting their first messages) suspends the floor; a stream
    left waiting once the start has stalled for ``START_STALL_S`` (its shard's source down) does
    not keep the others' messages at the round's size; the next start suspends it again."""
    from server.serve.pacing import START_STALL_S

    now = [0.0]
    pacing = Pacing(target_gap_s=0.025, window_s=0.0, clock=lambda: now[0], min_tokens=32_768)
    for _ in range(64):
        pacing.opened()
    pacing._scale = 1.0
    for _ in range(63):
        pacing.served()
        now[0] += 0.01
        assert pacing.batches(16, 4 * 1025) == 1  # the start moving: the round alone
    now[0] += START_STALL_S / 2
    assert pacing.batches(16, 4 * 1025) == 1
    assert pacing.job_starting()
    now[0] += START_STALL_S  # the 64th still waits, nothing else moved: the floor is back
    assert pacing.batches(16, 4 * 1025) == 8 and not pacing.job_starting()
    pacing.opened()  # another job's rank: a start again
    assert pacing.batches(16, 4 * 1025) == 1 and pacing.job_starting()
    pacing.served()
    assert pacing.batches(16, 4 * 1025) == 1  # (the others' messages go on: each asks)
    now[0] += 2 * START_STALL_S
    assert pacing.batches(16, 4 * 1025) == 8
    pacing.closed(served=False)  # the stuck one goes: nobody starting
    assert pacing.starting == 0 and pacing.batches(16, 4 * 1025) == 8 and not pacing.job_starting()


def test_the_floor_is_a_server_setting():
    assert ServerSettings().paced_min_tokens == 32_768
    assert ServerSettings.model_validate({"paced_min_tokens": 0}).paced_min_tokens == 0
    with pytest.raises(ValueError, match="paced_min_tokens"):
        ServerSettings.model_validate({"paced_min_tokens": -1})


def batches_of(chunks: list) -> tuple[list[np.ndarray], list[tuple[int, ...]], list[list[np.ndarray]] | None]:
    tokens = [b for c in chunks for b in c.tokens]
    cursors = [(loc.row, loc.epoch, loc.shard, loc.shard_row) for c in chunks for loc in c.cursors]
    provenance = [p for c in chunks for p in c.provenance] if chunks[0].provenance is not None else None
    return tokens, cursors, provenance


async def take(dataset: Dataset, pool: ThreadPoolExecutor, count: int, pacing: Pacing | None,
               **fields: object) -> list:
    store = ShardStore(ShardCache(64 << 20), pool, prefetch=PrefetchSettings(depth=4, concurrency=2))
    request = pb.StreamRequest(dataset="d", seed=7, seq_len=48, batch_size=3, rank=1, world_size=3, **fields)
    chunks, got = stream_chunks(parse_request(request, {"d": dataset}, ServerSettings()), store, pacing=pacing), []
    async for chunk in chunks:
        got.append(chunk)
        if pacing is not None:  # (as the service does after each message)
            pacing.sent()
        if sum(len(c.tokens) for c in got) >= count:
            break
    await chunks.aclose()
    return got


async def test_messages_that_change_size_give_exactly_the_fixed_messages_batches(dataset: Dataset,
                                                                               pool: ThreadPoolExecutor) -> None:
    """A round that swings between long and short: message sizes go 8, 4, 2, 1, 2, 4, 8, 4, ...
    on the fast path (whole packed shards) and with provenance (the walker's slow path)."""
    for provenance in (False, True):
        steps = itertools.cycle([0.1] * 4 + [0.0001] * 4)  # 8 streams: a 0.8 s round, then 0.8 ms
        pacing = paced(steps, streams=8)
        pacing._scale = 8.0
        adaptive = await take(dataset, pool, 120, pacing, batches_per_message=8, batches_adaptive=True,
                              provenance=provenance)
        fixed = await take(dataset, pool, 120, None, batches_per_message=1, provenance=provenance)
        sizes = [len(c.tokens) for c in adaptive]
        assert len(set(sizes)) >= 3, sizes  # the pacing did change the sizes on the way
        got, want = batches_of(adaptive), batches_of(fixed)
        n = min(len(got[0]), len(want[0]))
        assert n >= 120
        assert all(np.array_equal(a, b) for a, b in zip(got[0][:n], want[0][:n]))
        assert got[1][:n] == want[1][:n]
        if provenance:
            assert got[2] is not None and want[2] is not None
            assert all(np.array_equal(a, b) for a, b in zip(got[2][:n], want[2][:n]))


@pytest.mark.integration
def test_default_clients_of_a_many_rank_job_read_exactly_their_batches(start_server):
    """Ranks that leave the batches a message to the server (the default) against ranks that name
    one batch a message: the same batches, whatever sizes the server chose."""
    server = start_server(None)

    def read(rank: int, world: int, **kw: object) -> list[np.ndarray]:
        ds = StreamingDataset(server.address, dataset="stdlib", seq_len=128, batch_size=2, rank=rank,
                              world_size=world, fields=["tokens"], decode_ahead=0, **kw)
        try:
            return [b["tokens"].numpy().copy() for b in itertools.islice(ds, 150)]
        finally:
            ds.close()

    world, ranks = 24, (0, 13, 23)
    with ThreadPoolExecutor(len(ranks)) as readers:  # at once: the server paces three streams
        paced_batches = list(readers.map(lambda r: read(r, world), ranks))
    for rank, got in zip(ranks, paced_batches):
        fixed = read(rank, world, batches_per_message=1)
        assert len(got) == len(fixed) == 150
        assert all(np.array_equal(a, b) for a, b in zip(got, fixed)), rank
