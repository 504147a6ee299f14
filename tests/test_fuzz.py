"""Fuzzing (issue 8): hypothesis-made stream requests and cursors (every field at and beyond its
limits, random bytes) against a real server get a proper status, never UNKNOWN or INTERNAL, and
the server keeps serving; corrupt zstd frames and truncated files on disk (sources and the disk
cache) never crash the server and never reach a client."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import grpc
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import StreamingDataset
from tests.conftest import decode_rows, jsonl_config, make_documents, write_jsonl
from tests.resume_helpers import same_batches, take
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

U32, U64 = (1 << 32) - 1, (1 << 64) - 1
LIMITS = {"max_seq_len": 512, "max_batch_size": 16, "max_rows_per_step": 2048}
#: What a bad request may get. UNKNOWN, INTERNAL, UNAVAILABLE or a timeout would be a bug.
PROPER = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
          grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def served(module_servers, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "data"
    write_jsonl(path, make_documents(80, seed=12, max_len=2000), files=2)
    config = jsonl_config(path, shard_bytes=16 << 10, **LIMITS)
    config["datasets"]["other"] = config["datasets"]["docs"]
    config["datasets"]["mix"] = {"mixture": {"docs": 0.7, "other": 0.3}}
    server = module_servers(config)
    channel = grpc.insecure_channel(server.address)
    feed = pb_grpc.TokenFeedStub(channel)
    cursors = {}
    for name in ("docs", "mix"):
        first = next(iter(feed.StreamBatches(pb.StreamRequest(dataset=name, seq_len=64, batch_size=4, world_size=1))))
        cursors[name] = first.cursors[0]
    yield server, feed, cursors
    channel.close()


def edge(limit: int, top: int) -> st.SearchStrategy[int]:
    """Values at and around ``limit``, the extremes of the field's type, and anything between."""
    near = [v for v in (0, 1, 2, limit - 1, limit, limit + 1, top - 1, top) if 0 <= v <= top]
    return st.one_of(st.sampled_from(near), st.integers(0, top))


NAMES = st.one_of(st.sampled_from(["docs", "mix", "other", "", "../etc/passwd", "/etc/passwd", "docs\x00"]),
                  st.text(max_size=40))
PACKINGS = st.one_of(st.sampled_from(["", "concat", "bfd", "pad", "split", "zip"]), st.text(max_size=12))


@st.composite
def requests(draw: st.DrawFn, odds: int = 6) -> pb.StreamRequest:
    """A valid request with some fields pushed to, or past, their limits (each with chance 1/odds)."""
    world = draw(st.integers(1, 8))
    stride = draw(st.integers(1, 4))
    budget = draw(st.booleans()) and draw(st.booleans())
    seq_len = draw(st.integers(1, LIMITS["max_seq_len"]))
    req = pb.StreamRequest(
        dataset=draw(st.sampled_from(["docs", "mix", "other"])), seed=draw(st.integers(0, 1000)), seq_len=seq_len,
        batch_size=draw(st.integers(1, LIMITS["max_batch_size"])),
        packing="split" if budget else draw(st.sampled_from(["", "concat", "bfd", "pad"])),
        rank=draw(st.integers(0, world - 1)), world_size=world, first_step=draw(st.integers(0, stride - 1)),
        step_stride=stride, batches_per_message=draw(st.integers(1, 8)), compression=draw(st.sampled_from([0, 1])),
        worker_id=draw(st.integers(0, 7)), provenance=draw(st.booleans()),
        max_tokens=draw(st.integers(seq_len, 4 * seq_len)) if budget else 0)
    pushed = {
        "dataset": NAMES, "seed": edge(0, U64), "seq_len": edge(LIMITS["max_seq_len"], U32),
        "batch_size": edge(LIMITS["max_batch_size"], U32), "packing": PACKINGS, "rank": edge(world, U32),
        "world_size": edge(1 << 20, U32), "first_step": edge(stride, U32), "step_stride": edge(2, U32),
        "batches_per_message": edge(64, U32), "compression": st.integers(-(1 << 31), (1 << 31) - 1),
        "worker_id": edge(0, U32), "max_tokens": edge(LIMITS["max_seq_len"] * LIMITS["max_batch_size"], U32),
    }
    for field, values in pushed.items():
        if draw(st.integers(1, odds)) == 1:
            setattr(req, field, draw(values))
    return req


def cursor_from(draw: st.DrawFn, base: pb.Cursor, req: pb.StreamRequest) -> pb.Cursor:
    """A real cursor (its identity matches the request) with fields pushed to and past their limits."""
    c = pb.Cursor()
    c.CopyFrom(base)
    req.dataset, req.seq_len, req.seed, req.packing = c.dataset, c.seq_len, c.seed, c.packing
    req.max_tokens = 0
    targets = [c, *c.components]
    for _ in range(draw(st.integers(1, 2))):
        where = targets[draw(st.integers(0, len(targets) - 1))]
        field, top = draw(st.sampled_from([("row", U64), ("epoch", U64), ("shard", U32), ("shard_row", U64)]))
        now = getattr(where, field)
        picks = [v for v in (now + 1, now + 1000, top - 1, top, (1 << 62) - 1, 1 << 62) if v <= top]
        setattr(where, field, draw(st.sampled_from(picks) | st.integers(0, top)))
    if draw(st.integers(0, 4)) == 0:
        del c.components[draw(st.integers(0, max(0, len(c.components) - 1))):]
    return c


def random_cursor(draw: st.DrawFn) -> pb.Cursor:
    parts = [pb.ComponentCursor(dataset=draw(NAMES), row=draw(edge(0, U64)), shard=draw(edge(0, U32)))
             for _ in range(draw(st.integers(0, 3)))]
    return pb.Cursor(version=draw(edge(1, U32)), dataset=draw(NAMES), fingerprint=draw(st.text(max_size=20)),
                     seed=draw(edge(0, U64)), seq_len=draw(edge(64, U32)), packing=draw(PACKINGS),
                     row=draw(edge(0, U64)), epoch=draw(edge(0, U64)), shard=draw(edge(0, U32)),
                     shard_row=draw(edge(0, U64)), components=parts)


def outcome(feed: pb_grpc.TokenFeedStub, req: pb.StreamRequest) -> grpc.StatusCode:
    call = feed.StreamBatches(req, timeout=20)
    try:
        message = next(iter(call))
        assert isinstance(message, pb.BatchChunk) and message.num_batches >= 1
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        assert err.code() in PROPER, (req, err.code(), err.details())
        assert err.details(), "a refusal must say why"
        return err.code()
    finally:
        call.cancel()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_requests_and_cursors_get_a_proper_status(served, data):
    server, feed, cursors = served
    kind = data.draw(st.sampled_from(["none", "real", "real", "random"]))
    req = data.draw(requests(odds=6 if kind != "real" else 25))
    if kind == "real":
        req.cursor.CopyFrom(cursor_from(data.draw, cursors[data.draw(st.sampled_from(sorted(cursors)))], req))
    elif kind == "random":
        req.cursor.CopyFrom(random_cursor(data.draw))
    outcome(feed, req)
    assert server.proc.poll() is None


@settings(max_examples=120, deadline=None)
@given(junk=st.binary(max_size=300))
def test_random_bytes_as_a_request_get_a_proper_status(served, junk):
    server = served[0]
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_stream("/tokenfeed.v1.TokenFeed/StreamBatches", request_serializer=lambda b: b,
                                   response_deserializer=pb.BatchChunk.FromString)
        call = raw(junk, timeout=20)
        try:
            next(iter(call))  # some byte strings parse into a valid request
        except grpc.RpcError as err:
            assert err.code() in PROPER, (junk, err.code(), err.details())
        finally:
            call.cancel()


def test_the_server_is_unharmed_after_fuzzing(served):
    server, feed, _ = served
    assert outcome(feed, pb.StreamRequest(dataset="docs", seq_len=64, batch_size=4, world_size=1)) == grpc.StatusCode.OK
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log and "failed" not in log.lower(), log[-3000:]


# ---- damage on disk -----------------------------------------------------------------------------
def corpus_files(path: Path, docs: list[str]) -> None:
    """The documents in five files of different kinds, then damaged: a zstd file with a flipped
    byte (frames carry checksums, as the zstd tool writes them), a truncated zstd file, a
    truncated gzip file, a plain file cut in the middle of a line, and an intact one."""
    path.mkdir(parents=True)
    parts = [docs[i::5] for i in range(5)]
    blobs = [("\n".join(json.dumps({"text": d}) for d in part) + "\n").encode() for part in parts]
    zstd = zstandard.ZstdCompressor(write_checksum=True)
    flipped = bytearray(zstd.compress(blobs[0]))
    flipped[len(flipped) // 2] ^= 0x5A
    (path / "a.jsonl.zst").write_bytes(bytes(flipped))
    (path / "b.jsonl.zst").write_bytes(zstd.compress(blobs[1])[: -len(blobs[1]) // 7])
    (path / "c.jsonl.gz").write_bytes(gzip.compress(blobs[2])[:-40])
    (path / "d.jsonl").write_bytes(blobs[3][: len(blobs[3]) // 2 + 17])
    (path / "e.jsonl").write_bytes(blobs[4])


def test_damaged_source_files_never_reach_a_client(start_server, tmp_path):
    docs = make_documents(100, seed=21, max_len=1500)
    corpus_files(tmp_path / "data", docs)
    config = {"datasets": {"docs": {"source": {"type": "jsonl", "paths": [str(tmp_path / "data" / "*")],
                                               "shard_bytes": 4096}}}}
    server = start_server(config)
    batches = take(StreamingDataset(server.address, "docs", seq_len=64, batch_size=8), 150)  # > 2 epochs
    rows = [b["input_ids"].numpy() for b in batches]
    served_docs = decode_rows(rows)
    assert served_docs, "nothing was served"
    intact = set(docs)
    assert all(d in intact for d in served_docs), [d[:60] for d in served_docs if d not in intact][:3]
    assert set(docs[4::5]) <= set(served_docs), "the intact file was not served whole"
    info = StreamingDataset(server.address, "docs", seq_len=64, batch_size=8).describe()
    assert info.bad_records.get("broken_shard", 0) >= 3, dict(info.bad_records)
    assert server.proc.poll() is None and "Traceback" not in server.log()


def test_a_damaged_disk_cache_is_dropped_and_rebuilt_exactly(start_server, tmp_path):
    path = tmp_path / "data"
    write_jsonl(path, make_documents(120, seed=5), files=2)
    config = jsonl_config(path, shard_bytes=16 << 10)
    config["cache"] = {"max_bytes": "1MiB", "disk": {"path": str(tmp_path / "cache")}}
    server = start_server(config)
    reference = take(StreamingDataset(server.address, "docs", seq_len=64, batch_size=4), 120)
    server.stop()
    entries = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert entries, "the disk tier holds nothing to damage"
    rng = random.Random(0)
    for i, entry in enumerate(entries):
        data = bytearray(entry.read_bytes())
        if i % 3 == 0:
            data = data[: len(data) // 2]  # truncated
        elif i % 3 == 1:
            data[rng.randrange(len(data))] ^= 0xFF  # one flipped byte (zstd checksum or header)
        else:
            data[-8:] = os.urandom(8)  # a damaged frame end
        entry.write_bytes(bytes(data))
    server.start()
    again = take(StreamingDataset(server.address, "docs", seq_len=64, batch_size=4), 120)
    assert same_batches(again, reference), "damaged cache entries reached a client"
    assert server.proc.poll() is None and "Traceback" not in server.log()
