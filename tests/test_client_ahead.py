"""Decoding ahead in a background thread: items in order, the source's error after them, and
nothing left running (thread, gRPC stream) once the consumer stops."""

from __future__ import annotations

import gc
import itertools
import threading
from collections.abc import Iterator

import pytest

from client import StreamingDataset
from client.ahead import Ahead
from tests.conftest import jsonl_config


def test_items_arrive_in_order_then_the_sources_error():
    def source() -> Iterator[int]:
        yield from range(5)
        raise ValueError("broken at 5")

    got = []
    with pytest.raises(ValueError, match="broken at 5"):
        for item in Ahead(source(), depth=2):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]


def test_close_interrupts_a_source_blocked_in_a_call_and_closes_it():
    wake, closed = threading.Event(), threading.Event()

    def source() -> Iterator[int]:
        try:
            yield 1
            wake.wait(30)  # blocked, as in a gRPC receive, until interrupted
            yield 2
        finally:
            closed.set()

    ahead = Ahead(source(), depth=1, interrupt=wake.set)
    it = iter(ahead)
    assert next(it) == 1
    it.close()
    assert closed.wait(10), "the source was not closed"
    ahead._thread.join(10)
    assert not ahead._thread.is_alive()


def decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.endswith("tokenfeed-decode")]


@pytest.mark.parametrize("how", ["close", "drop"])
def test_stopping_iteration_ends_the_decode_thread(start_server, corpus, how):
    path, _ = corpus
    server = start_server(jsonl_config(path))
    before = set(decode_threads())
    ds = StreamingDataset(server.address, "docs", seq_len=64, batch_size=2, decode_ahead=2)
    it = iter(ds)
    batches = list(itertools.islice(it, 3))
    assert len(batches) == 3
    started = [t for t in decode_threads() if t not in before]
    assert len(started) == 1
    if how == "close":
        it.close()
    else:
        del it
        gc.collect()
    started[0].join(10)
    assert not started[0].is_alive(), "the decode thread outlived its iterator"
    # the state is that of the last batch taken, not of what the thread had decoded ahead
    again = StreamingDataset(server.address, "docs", seq_len=64, batch_size=2, decode_ahead=0)
    reference = list(itertools.islice(again, 4))
    resumed = StreamingDataset(server.address, "docs", seq_len=64, batch_size=2)
    resumed.load_state_dict(ds.state_dict())
    assert next(iter(resumed))["input_ids"].equal(reference[3]["input_ids"])
