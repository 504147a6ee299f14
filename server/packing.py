"""Packing: a shard's tokenized documents, in an epoch's order, cut into rows of seq_len + 1."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenizedShard:
    """A shard's documents as one flat token array; each document ends with EOS."""

    tokens: np.ndarray   # [num_tokens], the dataset's token dtype
    offsets: np.ndarray  # int64 [num_docs + 1]; document i is tokens[offsets[i]:offsets[i+1]]

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    @property
    def nbytes(self) -> int:
        return int(self.tokens.nbytes + self.offsets.nbytes)


def tokenized_shard(docs: list[np.ndarray], eos_id: int, dtype: np.dtype) -> TokenizedShard:
    """Concatenate token arrays of documents, appending EOS to each."""
    lengths = np.fromiter((d.size + 1 for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), dtype=dtype)
    for doc, start, end in zip(docs, offsets[:-1], offsets[1:]):
        tokens[start : end - 1] = doc
        tokens[end - 1] = eos_id
    return TokenizedShard(tokens=tokens, offsets=offsets)


@dataclass(frozen=True)
class PackedShard:
    """Rows of a shard for one epoch. Row i is ``stream[i*L : i*L + L + 1]``: its L input
    tokens plus the next token of the stream (the label of its last position)."""

    stream: np.ndarray  # [rows * seq_len + 1], PAD after the shard's last token
    seq_len: int
    rows: int

    def row_view(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a read-only strided view ``[stop - start, seq_len + 1]``."""
        assert 0 <= start <= stop <= self.rows, (start, stop, self.rows)
        item = self.stream.itemsize
        base = self.stream[start * self.seq_len :]
        return np.lib.stride_tricks.as_strided(
            base, shape=(stop - start, self.seq_len + 1), strides=(self.seq_len * item, item),
            writeable=False,
        )


def concat_rows(num_tokens: int, seq_len: int) -> int:
    """Rows that ``concat`` packing makes of a shard of ``num_tokens`` tokens."""
    return -(-num_tokens // seq_len)


def pack_concat(shard: TokenizedShard, order: np.ndarray, seq_len: int, pad_id: int) -> PackedShard:
    """Documents in ``order``, concatenated with no gap, cut into rows; only the last row pads."""
    rows = concat_rows(shard.num_tokens, seq_len)
    stream = np.full(rows * seq_len + 1, pad_id, dtype=shard.tokens.dtype)
    if rows:
        starts, ends = shard.offsets[order], shard.offsets[order + 1]
        pos = 0
        for start, end in zip(starts.tolist(), ends.tolist()):
            stream[pos : pos + end - start] = shard.tokens[start:end]
            pos += end - start
    return PackedShard(stream=stream, seq_len=seq_len, rows=rows)
