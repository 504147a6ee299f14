"""Packing modes: no token lost or duplicated, row shapes, document boundaries (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.stages.packing import PACKERS, known_rows, pack, tokenized_shard

EOS, PAD = 256, 257

docs_strategy = st.lists(st.integers(1, 300), min_size=0, max_size=40).map(
    lambda lengths: [np.arange(n, dtype=np.uint16) % 200 + (i % 50) for i, n in enumerate(lengths)])


def shard_of(docs: list[np.ndarray]):
    return tokenized_shard(docs, EOS, np.dtype(np.uint16))


def doc_tokens(shard, d: int) -> np.ndarray:
    return shard.tokens[shard.offsets[d] : shard.offsets[d + 1]]


def packed_case(mode: str, docs: list[np.ndarray], seq_len: int, seed: int):
    """A shard of ``docs``, a seeded document order, and the shard packed by ``mode``."""
    shard = shard_of(docs)
    order = np.random.default_rng(seed).permutation(shard.num_docs)
    return shard, order, pack(mode, shard, order, seq_len, PAD)


def check_segments(packed, shard) -> dict[int, list[tuple[int, int]]]:
    """Every segment holds exactly its document's tokens; returns doc -> [(offset, length)]."""
    pieces: dict[int, list[tuple[int, int]]] = {}
    rows = packed.row_view(0, packed.rows)
    for row, col, length, doc, off in packed.segments.tolist():
        assert 0 <= col and col + length <= packed.seq_len
        np.testing.assert_array_equal(rows[row, col : col + length], doc_tokens(shard, doc)[off : off + length])
        pieces.setdefault(doc, []).append((off, length))
    return pieces


@settings(max_examples=150, deadline=None)
@given(docs=docs_strategy, seq_len=st.integers(1, 64), seed=st.integers(0, 3))
def test_concat_tiles_the_stream(docs, seq_len, seed):
    shard, order, packed = packed_case("concat", docs, seq_len, seed)
    assert packed.rows == known_rows("concat", shard.num_tokens, shard.num_docs, seq_len)
    rows = packed.row_view(0, packed.rows)
    assert rows.shape == (packed.rows, seq_len + 1)
    stream = np.concatenate([doc_tokens(shard, d) for d in order]) if len(order) else np.empty(0, np.uint16)
    flat = rows[:, :-1].reshape(-1)
    np.testing.assert_array_equal(flat[: stream.size], stream)
    assert np.all(flat[stream.size :] == PAD) and flat.size - stream.size < seq_len
    np.testing.assert_array_equal(rows[:-1, -1], rows[1:, 0])  # the extra token is the next row's first
    pieces = check_segments(packed, shard)
    assert sum(length for p in pieces.values() for _, length in p) == shard.num_tokens


@settings(max_examples=150, deadline=None)
@given(docs=docs_strategy, seq_len=st.integers(1, 64), seed=st.integers(0, 3))
def test_bfd_keeps_documents_whole_when_they_fit(docs, seq_len, seed):
    shard, order, packed = packed_case("bfd", docs, seq_len, seed)
    rows = packed.row_view(0, packed.rows)
    assert rows.shape == (packed.rows, seq_len + 1)
    assert np.all(rows[:, -1] == PAD)
    assert packed.rows >= -(-shard.num_tokens // seq_len)
    pieces = check_segments(packed, shard)
    for d in range(shard.num_docs):  # every token exactly once, in pieces of whole rows at most
        length = int(shard.offsets[d + 1] - shard.offsets[d])
        got = sorted(pieces.get(d, []))
        expected = [(off, min(seq_len, length - off)) for off in range(0, length, seq_len)]
        assert got == expected
    assert int(np.sum(rows[:, :-1] != PAD)) == shard.num_tokens


@settings(max_examples=150, deadline=None)
@given(docs=docs_strategy, seq_len=st.integers(1, 64), seed=st.integers(0, 3))
def test_pad_one_document_per_row(docs, seq_len, seed):
    shard, order, packed = packed_case("pad", docs, seq_len, seed)
    assert packed.rows == shard.num_docs == known_rows("pad", shard.num_tokens, shard.num_docs, seq_len)
    rows = packed.row_view(0, packed.rows)
    for r, d in enumerate(order.tolist()):
        tokens = doc_tokens(shard, d)[:seq_len]
        np.testing.assert_array_equal(rows[r, : tokens.size], tokens)
        assert np.all(rows[r, tokens.size :] == PAD)
    check_segments(packed, shard)


def first_fit_rows(lengths: list[int], seq_len: int) -> int:
    """Rows that first-fit in the given order (the alternative to BFD) fills: each document goes
    into the first row with room for it, else into a new row."""
    free: list[int] = []
    for n in lengths:
        for r, space in enumerate(free):
            if space >= n:
                free[r] -= n
                break
        else:
            free.append(seq_len - n)
    return len(free)


def doc_lengths(shard) -> list[int]:
    return np.diff(shard.offsets).tolist()  # EOS included


def test_bfd_beats_first_fit_order_where_they_differ():
    """Documents of 3, 3, 5 and 5 tokens (4, 4, 6, 6 with EOS) into rows of 10: first-fit in this
    order puts both short ones in row 0, and each long one then needs a row of its own (3 rows);
    best-fit-decreasing pairs each long one with a short one (2 full rows)."""
    shard = shard_of([np.full(n, 7, np.uint16) for n in (3, 3, 5, 5)])
    assert doc_lengths(shard) == [4, 4, 6, 6] and first_fit_rows(doc_lengths(shard), 10) == 3
    bfd = pack("bfd", shard, np.arange(shard.num_docs), 10, PAD)
    assert bfd.rows == 2
    rows = bfd.row_view(0, bfd.rows)
    assert not np.any(rows[:, :-1] == PAD)  # both rows full
    per_row = [sorted(doc_lengths(shard)[doc] for row, _, _, doc, _ in bfd.segments.tolist() if row == r)
               for r in range(bfd.rows)]
    assert per_row == [[4, 6], [4, 6]]  # each long document with a short one
    check_segments(bfd, shard)


def test_bfd_beats_first_fit_order_on_mixed_lengths():
    rng = np.random.default_rng(0)
    docs = [np.ones(int(n), np.uint16) for n in rng.integers(1, 1500, size=2000)]
    shard = shard_of(docs)
    order = np.arange(shard.num_docs)
    bfd = pack("bfd", shard, order, 2048, PAD)
    first_fit = first_fit_rows(doc_lengths(shard), 2048)
    efficiency, baseline = (shard.num_tokens / (rows * 2048) for rows in (bfd.rows, first_fit))
    assert bfd.rows < first_fit, (bfd.rows, first_fit)
    assert efficiency > 0.99 and efficiency - baseline > 0.02, (efficiency, baseline)


@pytest.mark.parametrize("mode", sorted(PACKERS))
def test_empty_shard(mode):
    shard = shard_of([])
    packed = pack(mode, shard, np.arange(0), 16, PAD)
    assert packed.rows == 0 and packed.row_view(0, 0).shape == (0, 17)


@settings(max_examples=100, deadline=None)
@given(docs=docs_strategy, seq_len=st.integers(1, 64), seed=st.integers(0, 3), mode=st.sampled_from(sorted(PACKERS)),
       wide=st.booleans(), data=st.data())
def test_copy_rows_matches_row_view(docs, seq_len, seed, mode, wide, data):
    """``copy_rows`` (byte copies that keep the GIL) writes exactly ``row_view``'s rows, for every
    packing and token width, into a slice of a larger buffer as the walker does, and into an array
    it cannot copy bytes into (not contiguous: numpy's copy)."""
    dtype = np.dtype(np.uint32 if wide else np.uint16)
    shard = tokenized_shard([d.astype(dtype) + 70000 * wide for d in docs], EOS, dtype)
    order = np.random.default_rng(seed).permutation(shard.num_docs)
    packed = pack(mode, shard, order, seq_len, PAD)
    start = data.draw(st.integers(0, packed.rows))
    stop = data.draw(st.integers(start, packed.rows))
    want = packed.row_view(start, stop)
    buffer = np.full((3, stop - start + 2, seq_len + 1), 7, dtype=dtype)
    packed.copy_rows(start, stop, buffer[1, 1 : 1 + stop - start])
    np.testing.assert_array_equal(buffer[1, 1 : 1 + stop - start], want)
    assert (buffer[0] == 7).all() and (buffer[2] == 7).all() and (buffer[1, 0] == 7).all()  # nothing else written
    assert (buffer[1, 1 + stop - start :] == 7).all()
    strided = np.zeros((stop - start, 2 * (seq_len + 1)), dtype=dtype)[:, ::2]
    packed.copy_rows(start, stop, strided)
    np.testing.assert_array_equal(strided, want)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 700), max_size=12),
       kinds=st.lists(st.sampled_from(["u2", "u4", "i8"]), min_size=1), wide=st.booleans())
def test_tokenized_shard_is_documents_then_eos(lengths, kinds, wide):
    """The joined-bytes path (every document of one dtype) and the copy-per-document path (mixed
    dtypes, or an EOS the documents' dtype cannot hold) give the same tokens and offsets."""
    dtype = np.dtype(np.uint32 if wide else np.uint16)
    eos = 70000 if wide else EOS
    docs = [(np.arange(n) % 250).astype(kinds[i % len(kinds)]) for i, n in enumerate(lengths)]
    shard = tokenized_shard(docs, eos, dtype)
    want = np.concatenate([np.append(d.astype(np.int64), eos) for d in docs]) if docs else np.empty(0, np.int64)
    assert shard.tokens.dtype == dtype and shard.tokens.flags.writeable
    np.testing.assert_array_equal(shard.tokens, want)
    np.testing.assert_array_equal(shard.offsets, np.concatenate([[0], np.cumsum([n + 1 for n in lengths])]))
