"""The wire helpers: messages written with the tokens field first (as the server writes them)
parse to the same fields as protobuf's own parser, with the tokens left in the received bytes."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from tokenfeed import wire
from tokenfeed.v1 import tokenfeed_pb2 as pb


def header() -> pb.BatchChunk:
    return pb.BatchChunk(dtype=pb.TOKEN_DTYPE_UINT16, num_batches=2, rows=3, seq_len=4, eos_id=256, pad_id=257,
                         cursors=[pb.Cursor(version=1, dataset="d", row=6), pb.Cursor(version=1, dataset="d", row=12)],
                         steps=[0, 1], epochs=[0, 0])


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 1, 1), (16, 8, 2049)])
def test_tokens_first_message_parses_like_protobuf_without_copying_the_tokens(shape):
    tokens = np.arange(np.prod(shape), dtype="<u2").reshape(shape)
    buf, view = wire.chunk_buffer(shape, np.dtype("<u2"))
    view[...] = tokens
    h = header()
    h.num_batches, h.rows, h.seq_len = shape[0], shape[1], shape[2] - 1
    data = b"".join((buf, h.SerializeToString()))
    parsed = wire.parse_chunk(data)
    reference = pb.BatchChunk.FromString(data)
    assert isinstance(parsed, wire.ReceivedChunk)
    assert isinstance(parsed.tokens, memoryview) and parsed.tokens.obj is data  # a view, not a copy
    assert bytes(parsed.tokens) == reference.tokens == tokens.tobytes()
    assert parsed.header == pb.BatchChunk(**{f.name: getattr(reference, f.name) for f, _ in reference.ListFields()
                                           if f.name != "tokens"})
    np.testing.assert_array_equal(wire.decode_chunk(parsed), tokens)


def test_a_later_tokens_field_wins_as_in_protobuf():
    data = wire.tokens_field(3) + b"abc" + pb.BatchChunk(tokens=b"xyzw").SerializeToString()
    assert wire.parse_chunk(data).tokens == pb.BatchChunk.FromString(data).tokens == b"xyzw"


@pytest.mark.parametrize("data", [wire.tokens_field(10) + b"short", b"\x0a\xff\xff"])
def test_a_damaged_message_is_refused_not_misread(data):
    with pytest.raises(DecodeError):
        wire.parse_chunk(data)


def test_a_message_protobuf_wrote_parses_too():
    msg = header()
    msg.tokens = np.arange(2 * 3 * 5, dtype="<u2").tobytes()
    parsed = wire.parse_chunk(msg.SerializeToString())
    assert bytes(parsed.tokens) == msg.tokens and list(parsed.steps) == [0, 1]
