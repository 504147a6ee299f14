"""Fuzzing (issues 8, 17): hypothesis-made stream requests and cursors (every field at and beyond
its limits, random bytes) against a real server, under small limits and under the server's
defaults, get a proper status, never UNKNOWN or INTERNAL, and the server keeps serving; so do
shared-memory offers (random paths and fields, files that are no ring, another user's ring, a ring
truncated mid-stream); corrupt zstd frames and truncated files on disk (sources and the disk cache)
never crash the server and never reach a client."""

from __future__ import annotations

import gzip
import json
import os
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import StreamingDataset
from server.config import ServerSettings
from server.serve.ring import RING_START_WINDOW
from tests.conftest import ServerProcess, decode_rows, jsonl_config, make_documents, write_jsonl
from tests.resume_helpers import same_batches, take
from tokenfeed import shm
from tokenfeed.shm import ClientRing
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

U32, U64 = (1 << 32) - 1, (1 << 64) - 1
LIMITS = {"max_seq_len": 512, "max_batch_size": 16, "max_rows_per_step": 2048}
#: The limits of a server whose config sets none: what most deployments run with.
DEFAULTS = {name: ServerSettings.model_fields[name].default for name in LIMITS}
#: What a bad request may get. UNKNOWN, INTERNAL, UNAVAILABLE or a timeout would be a bug.
PROPER = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
          grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass(frozen=True)
class Served:
    """A fuzzed server, what it was started with, and real cursors into its datasets."""

    server: ServerProcess
    feed: pb_grpc.TokenFeedStub
    cursors: dict[str, pb.Cursor]
    limits: dict[str, int]
    ring_dir: str  # where the server looks for clients' shared-memory rings
    elsewhere: str  # a directory it does not look in


@pytest.fixture(scope="module", params=["small-limits", "default-limits"])
def served(request, module_servers, tmp_path_factory):
    """One server with small limits (the edges are cheap to reach) and one with no ``server``
    section at all: the defaults, and the default shared-memory directory, are what runs."""
    path = tmp_path_factory.mktemp("fuzz") / "data"
    write_jsonl(path, make_documents(80, seed=12, max_len=2000), files=2)
    if request.param == "small-limits":
        limits, ring_dir = LIMITS, str(tmp_path_factory.mktemp("rings"))
        config = jsonl_config(path, shard_bytes=16 << 10, shared_memory_dir=ring_dir, **LIMITS)
    else:
        limits, ring_dir = DEFAULTS, os.path.abspath(shm.default_dir())  # the server's env is ours
        config = jsonl_config(path, shard_bytes=16 << 10)
    config["datasets"]["other"] = config["datasets"]["docs"]
    config["datasets"]["mix"] = {"mixture": {"docs": 0.7, "other": 0.3}}
    server = module_servers(config)
    channel = grpc.insecure_channel(server.address)
    feed = pb_grpc.TokenFeedStub(channel)
    cursors = {}
    for name in ("docs", "mix"):
        first = next(iter(feed.StreamBatches(pb.StreamRequest(dataset=name, seq_len=64, batch_size=4, world_size=1))))
        cursors[name] = first.cursors[0]
    yield Served(server, feed, cursors, limits, ring_dir, str(tmp_path_factory.mktemp("elsewhere")))
    channel.close()


def edge(limit: int, top: int) -> st.SearchStrategy[int]:
    """Values at and around ``limit``, the extremes of the field's type, and anything between."""
    near = [v for v in (0, 1, 2, limit - 1, limit, limit + 1, top - 1, top) if 0 <= v <= top]
    return st.one_of(st.sampled_from(near), st.integers(0, top))


NAMES = st.one_of(st.sampled_from(["docs", "mix", "other", "", "../etc/passwd", "/etc/passwd", "docs\x00"]),
                  st.text(max_size=40))
PACKINGS = st.one_of(st.sampled_from(["", "concat", "bfd", "pad", "split", "zip"]), st.text(max_size=12))


@st.composite
def requests(draw: st.DrawFn, odds: int = 6, limits: dict[str, int] = LIMITS) -> pb.StreamRequest:
    """A valid request with some fields pushed to, or past, the server's ``limits`` (each with
    chance 1/odds; none with odds 0). Unpushed fields stay within the small limits: each example
    stays cheap."""
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
        "dataset": NAMES, "seed": edge(0, U64), "seq_len": edge(limits["max_seq_len"], U32),
        "batch_size": edge(limits["max_batch_size"], U32), "packing": PACKINGS, "rank": edge(world, U32),
        "world_size": edge(1 << 20, U32), "first_step": edge(stride, U32), "step_stride": edge(2, U32),
        "batches_per_message": edge(64, U32), "compression": st.integers(-(1 << 31), (1 << 31) - 1),
        "worker_id": edge(0, U32), "max_tokens": edge(limits["max_seq_len"] * limits["max_batch_size"], U32),
    }
    for field, values in pushed.items():
        if odds and draw(st.integers(1, odds)) == 1:
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
        assert err.code() != grpc.StatusCode.DEADLINE_EXCEEDED, (req, "no first message within 20 s: a request's "
                                                                 "work must be bounded (contract 9)")
        assert err.code() in PROPER, (req, err.code(), err.details())
        assert err.details(), "a refusal must say why"
        return err.code()
    finally:
        call.cancel()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_requests_and_cursors_get_a_proper_status(served, data):
    kind = data.draw(st.sampled_from(["none", "real", "real", "random"]))
    req = data.draw(requests(odds=6 if kind != "real" else 25, limits=served.limits))
    if kind == "real":
        cursors = served.cursors
        req.cursor.CopyFrom(cursor_from(data.draw, cursors[data.draw(st.sampled_from(sorted(cursors)))], req))
    elif kind == "random":
        req.cursor.CopyFrom(random_cursor(data.draw))
    outcome(served.feed, req)
    assert served.server.proc.poll() is None


@pytest.mark.timeout(120)
def test_token_budget_work_per_message_is_bounded(start_server, tmp_path):
    """Under the default limits a token-budget stream with a large ``step_stride`` (every rank plans
    every step it skips: 8 ranks x 3 pieces x 30,000 steps x 4 batches) used to get neither its
    first message nor a refusal in 10 s (about 80 s of one core here): now it is refused at once.
    Contract 9: every request's work is bounded."""
    write_jsonl(tmp_path / "data", make_documents(80, seed=12, max_len=2000), files=2)
    server = start_server(jsonl_config(tmp_path / "data", shard_bytes=16 << 10))
    req = pb.StreamRequest(dataset="docs", seq_len=39, batch_size=1, packing="split", world_size=8,
                           step_stride=30000, batches_per_message=4, max_tokens=117)
    with grpc.insecure_channel(server.address) as channel:
        call = pb_grpc.TokenFeedStub(channel).StreamBatches(req, timeout=10)
        try:
            next(iter(call))
        except grpc.RpcError as err:
            assert err.code() in PROPER, (err.code(), err.details())
        finally:
            call.cancel()


@settings(max_examples=120, deadline=None)
@given(junk=st.binary(max_size=300))
def test_random_bytes_as_a_request_get_a_proper_status(served, junk):
    server = served.server
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


# ---- shared-memory offers (issue 17) ---------------------------------------------------------------
#: What an offer names: a real ring of ours (offered as it is, with fields changed, or truncated
#: after its first messages), a real file that is no ring, something that is not a regular file,
#: a ring in another directory or of another user, any path at all.
OFFERS = ["ring", "ring", "cut", "cut", "changed", "resized", "garbage", "missing", "elsewhere", "directory",
          "fifo", "symlink", "foreign", "path"]
NOBODY = 65534
_RELEASED_AT = 40  # the header's released counter (tokenfeed.shm's layout)


@dataclass
class Offer:
    """A ``SharedMemory`` offer and what it is made of (removed after the example)."""

    spec: pb.SharedMemory
    ring: ClientRing | None = None  # a real ring behind the offer (removed with it)
    usable: bool = False  # the offer is our own ring, unchanged: the server may (and should) use it
    paths: tuple[str, ...] = ()

    def remove(self) -> None:
        if self.ring is not None:
            self.ring.close()
        for path in self.paths:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            elif os.path.lexists(path):
                os.unlink(path)


def ring_name(directory: str) -> str:
    """A fresh path that passes the server's name check (``tokenfeed-PID-HEX``)."""
    return os.path.join(directory, f"tokenfeed-{os.getpid()}-{os.urandom(8).hex()}")


def make_offer(offer: Offer, draw: st.DrawFn, kind: str, served: Served, need: int) -> None:
    """Make ``offer`` one of ``kind``; ``need`` is what one message of the request takes. Every
    file is recorded in ``offer`` as soon as it exists: an example may stop at any draw."""
    slots = draw(st.integers(1, 4))
    slot_bytes = draw(st.sampled_from([need, need + 1, max(1, need - 1), 4096]))
    slot_bytes = slot_bytes if slot_bytes <= 4 << 20 else 4096  # files stay small; too small is refused
    if kind == "path":
        spec = pb.SharedMemory(path=draw(st.one_of(st.text(max_size=60), st.sampled_from(
            ["", "/", "/etc/passwd", "/dev/zero", served.ring_dir, served.ring_dir + "/", "/proc/self/mem",
             os.path.join(served.ring_dir, "tokenfeed-1-0123456789abcdef", "..", "x"),
             os.path.join(served.ring_dir, "..", os.path.basename(ring_name(served.ring_dir)))]))),
            nonce=draw(st.binary(max_size=20)), slots=slots, slot_bytes=slot_bytes)
        offer.spec.CopyFrom(spec)
        return
    if kind in ("missing", "directory", "fifo", "garbage"):
        path = ring_name(served.ring_dir)
        nonce = draw(st.binary(min_size=16, max_size=16))
        offer.spec.CopyFrom(pb.SharedMemory(path=path, nonce=nonce, slots=slots, slot_bytes=slot_bytes))
        other = bytes(b ^ 0xFF for b in nonce)  # never the offer's nonce (a shrunk example drew zeros for both)
        header = draw(st.binary(max_size=64)) if draw(st.booleans()) else (
            shm.MAGIC + other + struct.pack("<I4xQ", slots, slot_bytes))  # a ring's, another nonce
        offer.paths = (path,)
        if kind == "directory":
            os.mkdir(path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "garbage":  # the right size, a header that is no ring's
            with open(path, "wb") as f:
                f.write(header)
                f.truncate(shm.HEADER_BYTES + slots * slot_bytes)
        return
    offer.ring = ring = ClientRing(slots, slot_bytes, served.elsewhere if kind == "elsewhere" else served.ring_dir)
    offer.spec.CopyFrom(ring.spec())
    offer.usable = kind in ("ring", "cut")
    if kind == "changed":
        for name, values in {"slots": edge(shm.MAX_SLOTS, U32), "slot_bytes": edge(slot_bytes, U64),
                             "nonce": st.binary(max_size=20), "path": st.just(ring_name(served.ring_dir))}.items():
            if draw(st.booleans()):
                setattr(offer.spec, name, draw(values))
        offer.usable = offer.spec == ring.spec()
    elif kind == "resized":
        size = shm.HEADER_BYTES + slots * slot_bytes
        os.truncate(ring.path, draw(st.sampled_from([0, 40, shm.HEADER_BYTES, size - 1, size + 1, 2 * size])))
    elif kind == "symlink":
        offer.spec.path = ring_name(served.ring_dir)
        offer.paths = (offer.spec.path,)
        os.symlink(ring.path, offer.spec.path)
    elif kind == "foreign" and os.geteuid() == 0:
        os.chown(ring.path, NOBODY, NOBODY)


def message_bytes(req: pb.StreamRequest) -> int:
    """Token bytes of one message of ``req`` (byte tokenizer: uint16), for sizing a ring."""
    rows, width = (1, req.max_tokens + 1) if req.max_tokens else (req.batch_size, req.seq_len + 1)
    return max(1, (req.batches_per_message or 1) * rows * width * 2)


def cut_mid_stream(call: Iterator[pb.BatchChunk], ring: ClientRing, cut: int) -> grpc.StatusCode:
    """With every slot the server writes before a first release written (it now waits for one),
    truncate the ring to ``cut`` bytes and free every slot: the server's next read or write of the
    ring must end the stream with FAILED_PRECONDITION, never SIGBUS. The slots are never read
    here: that would kill us."""
    for _ in range(min(ring.slots, RING_START_WINDOW) - 1):  # the first message is in
        assert next(call).HasField("shm_slot")
    os.truncate(ring.path, cut)
    if cut >= _RELEASED_AT + 8:
        fd = os.open(ring.path, os.O_WRONLY)
        try:
            os.pwrite(fd, struct.pack("<Q", 1 << 40), _RELEASED_AT)
        finally:
            os.close(fd)
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (info.value.code(), info.value.details())
    assert "shared-memory ring" in info.value.details()
    return info.value.code()


def offer_outcome(feed: pb_grpc.TokenFeedStub, req: pb.StreamRequest, offer: Offer, cut: int | None) -> grpc.StatusCode:
    """A proper status, or a first message that went through the ring only if the ring was usable."""
    req.shared_memory.CopyFrom(offer.spec)
    call = feed.StreamBatches(req, timeout=20)
    try:
        first = next(iter(call))
        used = first.HasField("shm_slot")
        assert not used or offer.usable, ("the server wrote into a ring it must not use", offer.spec)
        assert used or not offer.usable or req.max_tokens, "the server ignored a usable ring"
        if used and cut is not None:
            return cut_mid_stream(call, offer.ring, cut)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        assert err.code() in PROPER, (req, err.code(), err.details())
        assert err.details(), "a refusal must say why"
        return err.code()
    finally:
        call.cancel()


@pytest.mark.timeout(300)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_shared_memory_offers_never_hurt_the_server(served, data):
    """The offer is what is fuzzed here; the request is a valid one (the test above pushes its fields)."""
    req = data.draw(requests(odds=0, limits=served.limits))
    kind = data.draw(st.sampled_from(OFFERS))
    offer = Offer(pb.SharedMemory())
    try:
        make_offer(offer, data.draw, kind, served, message_bytes(req))
        size = shm.HEADER_BYTES + offer.spec.slots * offer.spec.slot_bytes
        cuts = [c for c in (0, 1, 40, 47, 48, shm.HEADER_BYTES - 1, shm.HEADER_BYTES, shm.HEADER_BYTES + 1) if c < size]
        cut = data.draw(st.sampled_from([*cuts, size - 1]) | st.integers(0, size - 1)) if kind == "cut" else None
        offer_outcome(served.feed, req, offer, cut)
    finally:
        offer.remove()
    assert served.server.proc.poll() is None, f"the server died (exit {served.server.proc.returncode})"


def test_the_server_is_unharmed_after_fuzzing(served):
    server, feed = served.server, served.feed
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
