"""Packing: a shard's tokenized documents, in an epoch's order, cut into rows of seq_len + 1."""

from __future__ import annotations

import bisect
import functools
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


def _holds(kind: np.dtype, value: int) -> bool:
    info = np.iinfo(kind) if kind.kind in "iu" else None
    return info is not None and info.min <= value <= info.max


def tokenized_shard(docs: list[np.ndarray], eos_id: int, dtype: np.dtype) -> TokenizedShard:
    """Concatenate token arrays of documents, appending EOS to each."""
    lengths = np.fromiter((d.size + 1 for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Byte copies where the documents' dtype allows: a numpy copy a document would let the GIL go
    # for each document of over 500 tokens (see ``gather``).
    kind = docs[0].dtype if docs else None
    if kind is not None and all(d.dtype == kind and d.flags.c_contiguous for d in docs) and _holds(kind, eos_id):
        eos = np.array([eos_id], dtype=kind).tobytes()
        if kind == dtype:  # straight into the shard's array
            tokens = np.empty(int(offsets[-1]), dtype=dtype)
            dst, at, step = tokens.data.cast("B"), 0, len(eos)
            for d in docs:
                if d.size:
                    dst[at : at + d.nbytes] = d.data.cast("B")
                    at += d.nbytes
                dst[at : at + step] = eos
                at += step
            return TokenizedShard(tokens=tokens, offsets=offsets)
        joined = np.frombuffer(b"".join([part for d in docs for part in (d.data, eos)]), dtype=kind)
        return TokenizedShard(tokens=joined.astype(dtype), offsets=offsets)  # then one conversion
    tokens = np.empty(int(offsets[-1]), dtype=dtype)
    for doc, start, end in zip(docs, offsets[:-1], offsets[1:]):
        tokens[start : end - 1] = doc
        tokens[end - 1] = eos_id
    return TokenizedShard(tokens=tokens, offsets=offsets)


@dataclass(frozen=True)
class PackedShard:
    """A shard's rows for one epoch; each row holds ``seq_len + 1`` tokens, the last being the
    label of the row's last position. ``concat`` keeps one flat ``stream`` (row i is
    ``stream[i*L : i*L + L + 1]``, a view); ``bfd`` and ``pad`` keep a ``table`` of rows.
    ``segments`` say which document each run of a row comes from (for provenance)."""

    seq_len: int
    rows: int
    segments: np.ndarray  # int64 [n, 5]: row, column, length, document (in shard), offset in document
    stream: np.ndarray | None = None  # concat: [rows * seq_len + 1]
    table: np.ndarray | None = None   # bfd/pad: [rows, seq_len + 1]

    @property
    def nbytes(self) -> int:
        rows = self.table if self.table is not None else self.stream
        assert rows is not None  # every packing keeps one of them
        return int(rows.nbytes + self.segments.nbytes)

    def row_view(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a read-only array ``[stop - start, seq_len + 1]``."""
        assert 0 <= start <= stop <= self.rows, (start, stop, self.rows)
        return self._row_table[start:stop]

    def copy_rows(self, start: int, stop: int, out: np.ndarray) -> None:
        """``out[:] = row_view(start, stop)``: one copy however many rows (a Python loop of one
        slice a row cost 2.6 us for a batch of 4 rows of 1,025 tokens against 1.0, 107 against 16
        for 200 rows). Called on the event loop, where no packing thread competes for the GIL that
        numpy lets go of for the copy (small shards are packed there: ``ShardStore._pack_here``)."""
        assert 0 <= start <= stop <= self.rows, (start, stop, self.rows)
        out[...] = self._row_table[start:stop]

    @functools.cached_property
    def _row_table(self) -> np.ndarray:
        """Every row: ``table``, or for concat a read-only view of ``stream`` with overlapping
        rows (built once: ``as_strided`` costs microseconds, a slice of it does not)."""
        if self.table is not None:
            return self.table
        assert self.stream is not None
        item = self.stream.itemsize
        return np.lib.stride_tricks.as_strided(
            self.stream, shape=(self.rows, self.seq_len + 1), strides=(self.seq_len * item, item), writeable=False)

    def row_segments(self, start: int, stop: int) -> np.ndarray:
        """The segments of rows ``[start, stop)`` (row numbers stay the shard's)."""
        rows = self.segments[:, 0]
        return self.segments[np.searchsorted(rows, start) : np.searchsorted(rows, stop)]


def concat_rows(num_tokens: int, seq_len: int) -> int:
    """Rows that ``concat`` packing makes of a shard of ``num_tokens`` tokens."""
    return -(-num_tokens // seq_len)


def known_rows(packing: str, num_tokens: int, num_docs: int, seq_len: int) -> int | None:
    """Rows a shard packs into, when they follow from its counts alone (``bfd`` must pack)."""
    if packing == "concat":
        return concat_rows(num_tokens, seq_len)
    if packing == "pad":
        return num_docs
    return None


def _segments(rows: list[int], cols: list[int], lens: list[int], docs: list[int], offs: list[int]) -> np.ndarray:
    out = np.array([rows, cols, lens, docs, offs], dtype=np.int64).T.reshape(-1, 5)
    ordered: np.ndarray = out[np.lexsort((out[:, 1], out[:, 0]))] if len(out) else out
    return ordered


def gather(out: np.ndarray, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    """``out`` = ``tokens[starts[0]:ends[0]]``, then ``tokens[starts[1]:ends[1]]``, ... (1-D arrays of
    one dtype; ``out`` holds exactly the pieces), as byte copies that keep the GIL.

    Numpy releases the GIL for each copy of over 500 elements (``np.concatenate`` included, piece
    by piece); while the event loop wants it back, every release costs a hand-over each way. The
    copy of a 1M-token shard of a few hundred documents took 14 ms of its packing thread's CPU
    beside a 64-rank job's loop (3 ms beside one stream's), against 0.3 ms alone; these copies
    take the 0.3 ms either way (and less than numpy's for short documents)."""
    if not len(starts):
        return
    item = tokens.itemsize
    dst, src = out.data.cast("B"), np.ascontiguousarray(tokens).data.cast("B")
    at = 0
    for a, b in zip((starts * item).tolist(), (ends * item).tolist()):
        dst[at : at + b - a] = src[a:b]
        at += b - a
    assert at == dst.nbytes, (at, dst.nbytes)


def pack_concat(shard: TokenizedShard, order: np.ndarray, seq_len: int, pad_id: int) -> PackedShard:
    """Documents in ``order``, concatenated with no gap, cut into rows; only the last row pads."""
    rows = concat_rows(shard.num_tokens, seq_len)
    stream = np.empty(rows * seq_len + 1, dtype=shard.tokens.dtype)
    stream[shard.num_tokens :] = pad_id
    starts, ends = shard.offsets[order], shard.offsets[order + 1]
    gather(stream[: shard.num_tokens], shard.tokens, starts, ends)
    # one segment per (document, row it touches), computed without a Python loop
    lengths = ends - starts
    pos = np.cumsum(lengths) - lengths
    first = pos // seq_len
    counts = (pos + lengths - 1) // seq_len - first + 1
    nth = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    row = np.repeat(first, counts) + nth
    doc_pos, doc_len = np.repeat(pos, counts), np.repeat(lengths, counts)
    begin = np.maximum(doc_pos, row * seq_len)
    end = np.minimum(doc_pos + doc_len, (row + 1) * seq_len)
    segments = np.stack([row, begin - row * seq_len, end - begin, np.repeat(order, counts), begin - doc_pos], axis=1)
    return PackedShard(seq_len=seq_len, rows=rows, segments=segments.astype(np.int64), stream=stream)


def _pieces(shard: TokenizedShard, order: np.ndarray, seq_len: int) -> list[tuple[int, int, int]]:
    """(document, offset, length) pieces of at most ``seq_len`` tokens, in ``order``."""
    out: list[tuple[int, int, int]] = []
    for doc in order.tolist():
        length = int(shard.offsets[doc + 1] - shard.offsets[doc])
        out.extend((doc, off, min(seq_len, length - off)) for off in range(0, length, seq_len))
    return out


def _fill(shard: TokenizedShard, rows: list[list[tuple[int, int, int]]], seq_len: int, pad_id: int) -> PackedShard:
    table = np.full((len(rows), seq_len + 1), pad_id, dtype=shard.tokens.dtype)
    seg: tuple[list[int], ...] = ([], [], [], [], [])
    if not table.size:
        return PackedShard(seq_len=seq_len, rows=0, segments=_segments(*seg), table=table)
    item, offsets = shard.tokens.itemsize, shard.offsets.tolist()
    dst, src = table.data.cast("B"), np.ascontiguousarray(shard.tokens).data.cast("B")  # (see gather)
    for r, pieces in enumerate(rows):
        col = 0
        for doc, off, length in pieces:
            a, at = (offsets[doc] + off) * item, (r * (seq_len + 1) + col) * item
            dst[at : at + length * item] = src[a : a + length * item]
            for lst, v in zip(seg, (r, col, length, doc, off)):
                lst.append(v)
            col += length
    return PackedShard(seq_len=seq_len, rows=len(rows), segments=_segments(*seg), table=table)


def pack_pad(shard: TokenizedShard, order: np.ndarray, seq_len: int, pad_id: int) -> PackedShard:
    """One document per row: its first ``seq_len`` tokens (the rest is dropped), then PAD."""
    rows = []
    for doc in order.tolist():
        length = int(shard.offsets[doc + 1] - shard.offsets[doc])
        rows.append([(doc, 0, min(length, seq_len))])
    return _fill(shard, rows, seq_len, pad_id)


def pack_bfd(shard: TokenizedShard, order: np.ndarray, seq_len: int, pad_id: int, window: int = 1024) -> PackedShard:
    """Best-fit-decreasing bin packing of whole documents, window by window of ``window``
    documents in ``order``. Documents longer than a row are split into row-sized pieces, so no
    token is lost; the rest of each row is PAD."""
    rows: list[list[tuple[int, int, int]]] = []
    pieces = _pieces(shard, order, seq_len)
    for w in range(0, len(pieces), window):
        chunk = sorted(pieces[w : w + window], key=lambda p: -p[2])  # stable: ties keep order
        free: list[tuple[int, int]] = []  # (space left, row), sorted
        for piece in chunk:
            i = bisect.bisect_left(free, (piece[2], -1))
            if i == len(free):
                rows.append([piece])
                space, row = seq_len - piece[2], len(rows) - 1
            else:
                space, row = free.pop(i)
                rows[row].append(piece)
                space -= piece[2]
            if space > 0:
                bisect.insort(free, (space, row))
    return _fill(shard, rows, seq_len, pad_id)


def pack_split(shard: TokenizedShard, order: np.ndarray, seq_len: int, pad_id: int) -> PackedShard:
    """One piece per row: documents in ``order`` cut into pieces of at most ``seq_len`` tokens
    (the unit that token-budget batches are made of)."""
    return _fill(shard, [[piece] for piece in _pieces(shard, order, seq_len)], seq_len, pad_id)


PACKERS = {"concat": pack_concat, "bfd": pack_bfd, "pad": pack_pad, "split": pack_split}


def pack(packing: str, shard: TokenizedShard, order: np.ndarray, seq_len: int, pad_id: int) -> PackedShard:
    """Pack a shard's documents, in ``order``, with the named mode."""
    return PACKERS[packing](shard, order, seq_len, pad_id)
