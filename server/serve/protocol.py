"""The wire edge of the server: the only module that reads and writes protobuf messages. A
``StreamRequest`` becomes ``StreamParams`` here (every field checked, errors naming it), a chunk
becomes a ``BatchChunk``'s bytes, a ``Locator`` a ``Cursor`` and back, a served dataset its
``DatasetInfo``."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from server.config import ServerSettings
from server.errors import FailedPrecondition, InvalidArgument, NotFound
from server.stages.exclusion import Stages, stages_of
from server.stages.mixture import EditedSchedule, Mixture, WeightSchedule
from server.stages.order import Locator
from server.stages.served import Served
from server.stages.sources.tokens import MANIFEST, TokensSource
from server.stages.storage import is_url
from server.stream.params import Chunk, MessageSpace, StreamParams
from tokenfeed import wire
from tokenfeed.v1 import tokenfeed_pb2 as pb

MAX_BATCHES_PER_MESSAGE = 64


def parse_request(req: pb.StreamRequest, datasets: Mapping[str, Served],
                  limits: ServerSettings) -> StreamParams:
    """Check every field of a request; errors name the field and the allowed range."""
    ds = datasets.get(req.dataset)
    if ds is None:
        known = ", ".join(sorted(datasets)) or "none"
        raise NotFound(f"unknown dataset {req.dataset!r}; this server serves: {known}")
    _check_range("seq_len", req.seq_len, 1, limits.max_seq_len)
    _check_range("batch_size", req.batch_size, 1, limits.max_batch_size)
    _check_range("world_size", req.world_size, 1, 1 << 20)
    if req.rank >= req.world_size:
        raise InvalidArgument("rank", f"must be in [0, world_size={req.world_size}), got {req.rank}")
    packing = req.packing or wire.DEFAULT_PACKING
    if packing not in wire.PACKINGS:
        raise InvalidArgument("packing", f"must be one of {', '.join(wire.PACKINGS)}, got {packing!r}")
    per_msg = req.batches_per_message or 1
    _check_range("batches_per_message", per_msg, 1, MAX_BATCHES_PER_MESSAGE)
    if req.max_tokens:
        if req.packing not in ("", "split"):
            raise InvalidArgument("packing", f"token-budget batches pack pieces ('split'), got {req.packing!r}")
        packing = "split"
        _check_range("max_tokens", req.max_tokens, req.seq_len, limits.max_seq_len * limits.max_batch_size)
    # (the size of the stream's messages is checked with its other bounds: limits.check_request)
    if req.compression not in (pb.COMPRESSION_NONE, pb.COMPRESSION_ZSTD):
        raise InvalidArgument("compression", f"unknown value {req.compression}")
    start = _check_cursor(req, ds, packing) if req.HasField("cursor") else Locator()
    if req.skip_rows and req.max_tokens:  # a budget step holds no fixed number of rows to pass over
        raise InvalidArgument("skip_rows", "token-budget streams (max_tokens) cannot skip rows")
    if req.plan and req.max_tokens:
        raise InvalidArgument("plan", "token-budget streams (max_tokens) cannot carry exclude or weights edits")
    schedule, stages = _check_plan(req, ds)
    return StreamParams(
        dataset=ds, seed=req.seed, seq_len=req.seq_len, batch_size=req.batch_size, packing=packing,
        rank=req.rank, world_size=req.world_size, first_step=req.first_step,
        step_stride=req.step_stride or 1, batches_per_message=per_msg,
        zstd=req.compression == pb.COMPRESSION_ZSTD, start=start, provenance=req.provenance, max_tokens=req.max_tokens,
        skip_rows=req.skip_rows, schedule=schedule, stages=stages,
        plan_edits=(*(e.op for e in req.plan), *(("skip",) if req.skip_rows else ())),
        batches_adaptive=req.batches_adaptive and not req.max_tokens,
    )


def _check_plan(req: pb.StreamRequest, ds: Served) -> tuple[WeightSchedule | None, dict[str, Stages]]:
    """The data plan's edits a stream carries: exclusions of known shards (documents are checked
    against their shard's count when the stream starts, where it may not be known yet) and mixture
    weights; errors name the edit and the problem."""
    plain = {part.name: part for part in ds.parts}
    excludes, schedule = [], None
    for i, e in enumerate(req.plan):
        field = f"plan[{i}]"
        if e.op == "exclude":
            part = plain.get(e.dataset or ds.name)
            if part is None:
                raise InvalidArgument(f"{field}.dataset", f"{e.dataset!r} is not {ds.name!r} or one of its "
                                      f"components ({', '.join(plain)})")
            if e.shard >= part.num_shards:
                raise InvalidArgument(f"{field}.shard", f"unknown shard {e.shard} of {part.name!r}, which has "
                                      f"{part.num_shards} shards (0 to {part.num_shards - 1})")
            if e.document < -1:
                raise InvalidArgument(f"{field}.document", f"must be a document id >= 0 (or -1: the whole shard), "
                                      f"got {e.document}")
            excludes.append((e.from_row, part.name, e.shard, e.document))
        elif e.op == "weights":
            if not isinstance(ds, Mixture):
                raise InvalidArgument(f"{field}.weights", f"dataset {ds.name!r} is not a mixture: it has no weights")
            try:
                schedule = EditedSchedule(schedule or ds.schedule, e.from_row, dict(e.weights))
            except ValueError as err:
                raise InvalidArgument(f"{field}.weights", str(err)) from None
        else:
            raise InvalidArgument(f"{field}.op", f"must be 'exclude' or 'weights', got {e.op!r}")
    return schedule, stages_of(excludes)


def _check_range(field: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise InvalidArgument(field, f"must be in [{lo}, {hi}], got {value}")


def _check_cursor(req: pb.StreamRequest, ds: Served, packing: str) -> Locator:
    """A cursor must belong to the requested sequence; a mismatch is refused, never ignored."""
    c = req.cursor
    if c.version != wire.CURSOR_VERSION:
        raise FailedPrecondition(f"cursor version {c.version} is not supported (this server reads "
                                 f"{wire.CURSOR_VERSION})")
    expected = {"dataset": ds.name, "seed": req.seed, "seq_len": req.seq_len, "packing": packing,
                "fingerprint": ds.fingerprint}
    for field, want in expected.items():
        got = getattr(c, field)
        if got != want:
            hint = " (the dataset's content or tokenizer changed)" if field == "fingerprint" else ""
            raise FailedPrecondition(f"cursor was made for {field}={got!r}, this stream has {field}={want!r}{hint}")
    if ds.components:  # a mixture: one position per component
        names = [part.name for part in ds.components]
        if [p.dataset for p in c.components] != names:
            raise FailedPrecondition(f"cursor has components {[p.dataset for p in c.components]}, "
                                     f"mixture {ds.name!r} has {names}")
        parts = tuple((p.dataset, _locator(p, part, f"cursor.components[{i}]"))
                      for i, (p, part) in enumerate(zip(c.components, ds.components)))
        if sum(loc.row for _, loc in parts) != c.row:
            raise FailedPrecondition("cursor's component rows do not add up to its mixture row")
        return Locator(row=c.row, components=parts)
    return _locator(c, ds, "cursor")


def _locator(c: pb.Cursor | pb.ComponentCursor, ds: Served, field: str) -> Locator:
    if c.shard >= ds.num_shards:
        raise InvalidArgument(f"{field}.shard", f"must be below {ds.name!r}'s {ds.num_shards} shards, got {c.shard}")
    return Locator(row=c.row, epoch=c.epoch, shard=c.shard, shard_row=c.shard_row)


def cursor_message(loc: Locator, params: StreamParams) -> pb.Cursor:
    return pb.Cursor(
        version=wire.CURSOR_VERSION, dataset=params.dataset.name, fingerprint=params.dataset.fingerprint,
        seed=params.seed, seq_len=params.seq_len, packing=params.packing,
        row=loc.row, epoch=loc.epoch, shard=loc.shard, shard_row=loc.shard_row,
        components=[pb.ComponentCursor(dataset=name, row=c.row, epoch=c.epoch, shard=c.shard, shard_row=c.shard_row)
                    for name, c in loc.components],
    )


#: Serialised cursors kept for the ranks of a job (every rank's message after step t ends with the
#: same cursor), by the streams' dataset, seed, seq_len and packing: ``_cursor_fields``.
MAX_SHARED_CURSORS = 4096
_SHARED_CURSORS: dict[tuple[object, ...], dict[Locator, bytes]] = {}
#: Kinds of stream whose cursors are kept (past it, all are let go: jobs come and go).
MAX_CURSOR_KINDS = 64
#: Jobs of this many ranks share their cursors' bytes (fewer: each cursor is encoded once anyway).
SHARED_CURSORS_WORLD = 4


def _cursor_fields(cursors: list[Locator], params: StreamParams) -> bytes:
    """``BatchChunk.cursors`` as bytes, each cursor serialised once for all the ranks of a job:
    a ``BatchChunk`` holding only that cursor, so that joining them (protobuf merges concatenated
    messages, appending repeated fields in order) gives the field."""
    ds = params.dataset
    kind = (ds.fingerprint, ds.name, params.seed, params.seq_len, params.packing)
    known = _SHARED_CURSORS.get(kind)
    if known is None:
        if len(_SHARED_CURSORS) >= MAX_CURSOR_KINDS:
            _SHARED_CURSORS.clear()
        known = _SHARED_CURSORS[kind] = {}
    out = []
    for loc in cursors:
        field = known.get(loc)
        if field is None:
            field = pb.BatchChunk(cursors=[cursor_message(loc, params)]).SerializeToString()
            if len(known) >= MAX_SHARED_CURSORS:
                del known[next(iter(known))]
            known[loc] = field
        out.append(field)
    return b"".join(out)


@functools.cache
def _slot_field(slot: int) -> bytes:
    """``BatchChunk.shm_slot`` as bytes (a ring has at most ``shm.MAX_SLOTS``)."""
    return pb.BatchChunk(shm_slot=slot).SerializeToString()


def fixed_fields(params: StreamParams) -> bytes:
    """The header fields every message of a stream carries alike (dtype, compression, EOS and PAD,
    the plan's edits), serialised once for the stream: ``encode_chunk`` joins them to the rest."""
    info = params.dataset.info
    return pb.BatchChunk(
        dtype=wire.dtype_enum(params.dataset.dtype),
        compression=pb.COMPRESSION_ZSTD if params.zstd else pb.COMPRESSION_NONE,
        eos_id=info.eos_id, pad_id=info.pad_id,
        plan_edits=sum(1 for kind in params.plan_edits if kind != "skip"),
    ).SerializeToString()


def encode_chunk(chunk: Chunk, params: StreamParams, fixed: bytes | None = None) -> tuple[bytes, int]:
    """A chunk as the bytes of a ``BatchChunk``, and the size of its token payload. The tokens
    field comes first and the other fields, serialised by protobuf, after it; a chunk assembled
    in a message buffer (``Chunk.buffer``) is joined as it is. Protobuf would copy the tokens
    twice more (into the message, then out of it when serialising). The stream's ``fixed_fields``
    (``fixed``, computed here when not given) come next, then what changes from message to message
    (protobuf merges concatenated messages: no field is in both). A job's ranks share their
    cursors' bytes (``_cursor_fields``), which come last."""
    shared = params.world_size >= SHARED_CURSORS_WORLD
    changing: dict[str, Any] = {"num_batches": len(chunk.steps), "rows": chunk.tokens.shape[1],
                                "seq_len": chunk.tokens.shape[2] - 1, "steps": chunk.steps, "epochs": chunk.epochs}
    if not shared:
        changing["cursors"] = [cursor_message(c, params) for c in chunk.cursors]
    if chunk.provenance:
        changing["provenance"] = b"".join(p.tobytes() for p in chunk.provenance)
        changing["provenance_counts"] = [len(p) for p in chunk.provenance]
    if chunk.starts:
        changing["piece_starts"] = [c for s in chunk.starts for c in s]
        changing["piece_start_counts"] = [len(s) for s in chunk.starts]
    header = (fixed_fields(params) if fixed is None else fixed) + pb.BatchChunk(**changing).SerializeToString()
    if shared:
        header += _cursor_fields(chunk.cursors, params)
    if chunk.shm_slot is not None:  # the tokens are in the client's ring already
        return _slot_field(chunk.shm_slot) + header, chunk.tokens.nbytes
    if params.zstd:
        payload = wire.compress(chunk.tokens.data)
        return b"".join((wire.tokens_field(len(payload)), payload, header)), len(payload)
    if chunk.buffer is not None:
        return b"".join((chunk.buffer.data, header)), chunk.tokens.nbytes
    return b"".join((wire.tokens_field(chunk.tokens.nbytes), chunk.tokens.data, header)), chunk.tokens.nbytes


def dataset_info(ds: Served, settings: ServerSettings) -> pb.DatasetInfo:
    """What Describe says of a served dataset, and the limits a stream of it must keep."""
    d = ds.describe()
    shards = [pb.ShardInfo(**s) for s in d.pop("shards")]
    return pb.DatasetInfo(**d, shards=shards, dtype=wire.dtype_enum(ds.dtype), max_seq_len=settings.max_seq_len,
                          max_batch_size=settings.max_batch_size, sources=[pb.SourceInfo(**x) for x in ds.sources()])


def tokenizer_files(ds: Served, settings: ServerSettings) -> list[pb.TokenizerFile]:
    """The files of the tokenizer a dataset's ids come from, for a trainer to keep with its model: those
    the tokenizer was built from, or a prepared directory's copy; none for the byte tokenizer (or a
    prepared directory that kept none). Blocking reads: call it off the event loop.

    Raises:
        FailedPrecondition: the files do not fit in one message (``server.max_message_bytes``).
    """
    plain = ds.parts[0]  # a mixture's components share one tokenizer
    if plain.tokenizer is not None:
        paths = list(plain.tokenizer.files)
    elif isinstance(plain.source, TokensSource) and not is_url(plain.source.path):
        with open(os.path.join(plain.source.path, MANIFEST)) as f:
            kept = json.load(f).get("tokenizer_file")
        paths = [os.path.join(plain.source.path, kept)] if kept else []
    else:  # a prepared directory in an object store: not fetched here
        paths = []
    size = sum(os.path.getsize(p) for p in paths)
    if size + 65536 > settings.max_message_bytes:
        raise FailedPrecondition(f"dataset {ds.name!r}: its tokenizer's files ({size} bytes) do not fit in one "
                                 f"message (server.max_message_bytes = {int(settings.max_message_bytes)}); raise it")
    files = []
    for path in paths:
        with open(path, "rb") as f:
            files.append(pb.TokenizerFile(name=os.path.basename(path), data=f.read()))
    return files


class MessageBuffers:
    """Inline messages: each chunk's tokens are written straight into the buffer of the message
    that carries them (``wire.chunk_buffer``), so sending copies them once, into gRPC."""

    async def take(self, shape: tuple[int, ...], dtype: np.dtype) -> MessageSpace:
        buffer, tokens = wire.chunk_buffer(shape, dtype)
        return MessageSpace(tokens, buffer=buffer)
