"""Pure helpers shared by server and client: token dtypes, wire compression, cursor version."""

from __future__ import annotations

from typing import Any

import numpy as np
import zstandard

from tokenfeed.constants import (CURSOR_VERSION, DEFAULT_PACKING, PACKINGS, PROVENANCE_FIELDS, RETRY_AFTER_KEY,
                                 token_dtype)
from tokenfeed.v1 import tokenfeed_pb2 as pb

__all__ = ["CURSOR_VERSION", "DEFAULT_PACKING", "PACKINGS", "PROVENANCE_FIELDS", "RETRY_AFTER_KEY", "ReceivedChunk",
           "chunk_buffer", "compress", "decode_chunk", "decode_piece_starts", "decode_provenance", "dtype_enum",
           "numpy_dtype", "parse_chunk", "token_dtype", "tokens_field", "wire_dtype"]

_NP_DTYPES: dict[int, np.dtype] = {
    pb.TOKEN_DTYPE_UINT16: np.dtype("<u2"),
    pb.TOKEN_DTYPE_UINT32: np.dtype("<u4"),
}


def wire_dtype(vocab_size: int) -> pb.TokenDtype:
    """The smallest wire dtype (a ``TokenDtype`` value) that holds every id of the vocabulary."""
    return pb.TOKEN_DTYPE_UINT16 if vocab_size <= 1 << 16 else pb.TOKEN_DTYPE_UINT32


def dtype_enum(dtype: np.dtype) -> pb.TokenDtype:
    """The ``TokenDtype`` value of a numpy token dtype (``token_dtype``)."""
    if dtype == _NP_DTYPES[pb.TOKEN_DTYPE_UINT16]:
        return pb.TOKEN_DTYPE_UINT16
    if dtype == _NP_DTYPES[pb.TOKEN_DTYPE_UINT32]:
        return pb.TOKEN_DTYPE_UINT32
    raise ValueError(f"no wire dtype for {dtype}")


def numpy_dtype(dtype: int) -> np.dtype:
    """The numpy dtype of a ``TokenDtype`` value."""
    try:
        return _NP_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown token dtype {dtype}") from None


#: ``BatchChunk.tokens`` is field 1, length-delimited: its tag byte on the wire.
_TOKENS_TAG = b"\x0a"


def tokens_field(nbytes: int) -> bytes:
    """The bytes that precede ``nbytes`` of tokens when ``BatchChunk.tokens`` is written by hand:
    the field's tag and its length as a varint. Protobuf reads fields in any order and merges
    concatenated messages, so ``tokens_field(n) + tokens + BatchChunk(...rest).SerializeToString()``
    is a valid ``BatchChunk``; the server writes messages so, filling the tokens in place."""
    out = bytearray(_TOKENS_TAG)
    while True:
        byte, nbytes = nbytes & 0x7F, nbytes >> 7
        out.append(byte | (0x80 if nbytes else 0))
        if not nbytes:
            return bytes(out)


def chunk_buffer(shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A message buffer (uint8, not zeroed: every token is written) that starts with the tokens
    field, and the array (of ``shape``) inside it where the tokens go: filling the array fills
    the message without another copy."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    prefix = tokens_field(nbytes)
    buf = np.empty(len(prefix) + nbytes, dtype=np.uint8)
    buf[: len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    return buf, buf[len(prefix) :].view(dtype).reshape(shape)


class ReceivedChunk:
    """A received ``BatchChunk`` whose tokens were not copied out of the message: ``tokens`` is
    a view of the received bytes; every other field is the parsed header's, kept here once read
    (a field read through ``__getattr__`` each time cost a failed lookup, and its AttributeError's
    formatted message, first: several a batch on the client's hot path). The header is never
    changed after it is received."""

    __slots__ = ("__dict__", "header", "tokens")

    def __init__(self, header: pb.BatchChunk, tokens: memoryview) -> None:
        self.header, self.tokens = header, tokens

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.header, name)
        self.__dict__[name] = value
        return value


def parse_chunk(data: bytes) -> pb.BatchChunk | ReceivedChunk:
    """Deserialize a ``BatchChunk``. When its tokens field comes first (as tokenfeed's server
    writes it, see ``tokens_field``), the tokens stay a view of ``data`` and only the small rest
    is parsed: the payload is not copied again on its way to numpy."""
    if data[:1] == _TOKENS_TAG:
        size, pos, shift = 0, 1, 0
        while pos < min(len(data), 11):
            byte = data[pos]
            size |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if not byte & 0x80:
                end = pos + size
                if end <= len(data):
                    header = pb.BatchChunk.FromString(data[end:])
                    if not header.tokens:  # (a later tokens field would win, as protobuf merges)
                        return ReceivedChunk(header, memoryview(data)[pos:end])
                break
    return pb.BatchChunk.FromString(data)


def compress(payload: bytes | bytearray | memoryview, level: int = 1) -> bytes:
    """zstd-compress a token payload for the wire."""
    return zstandard.ZstdCompressor(level=level).compress(payload)


def decode_chunk(chunk: pb.BatchChunk | ReceivedChunk) -> np.ndarray:
    """The tokens of a chunk as a read-only array ``[num_batches, rows, seq_len + 1]``."""
    payload = chunk.tokens
    if chunk.compression == pb.COMPRESSION_ZSTD:
        payload = zstandard.ZstdDecompressor().decompress(payload)
    elif chunk.compression != pb.COMPRESSION_NONE:
        raise ValueError(f"unknown compression {chunk.compression}")
    shape = (chunk.num_batches, chunk.rows, chunk.seq_len + 1)
    arr = np.frombuffer(payload, dtype=numpy_dtype(chunk.dtype))
    if arr.size != shape[0] * shape[1] * shape[2]:
        raise ValueError(f"chunk holds {arr.size} tokens, expected {shape}")
    return arr.reshape(shape)


def decode_provenance(chunk: pb.BatchChunk) -> list[np.ndarray]:
    """Per batch of a chunk, its provenance records ``[n, 7]`` (int64)."""
    records = np.frombuffer(chunk.provenance, dtype="<i8").reshape(-1, len(PROVENANCE_FIELDS))
    bounds = np.cumsum([0, *chunk.provenance_counts])
    if bounds[-1] != len(records):
        raise ValueError(f"chunk carries {len(records)} provenance records, counts say {bounds[-1]}")
    return [records[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def decode_piece_starts(chunk: pb.BatchChunk) -> list[list[int]] | None:
    """Per batch, the columns where token-budget pieces start (None for row batches)."""
    if not chunk.piece_start_counts:
        return None
    starts, out, i = list(chunk.piece_starts), [], 0
    for n in chunk.piece_start_counts:
        out.append(starts[i : i + n])
        i += n
    return out
