"""Token-budget labels (issue 16): a ``max_tokens`` row holds document pieces back to back, so
the last token of a piece cut mid-document is followed in the row by another piece, mostly of an
unrelated document. Its label must be -100 (its next token is in another piece, a new segment
that the row cannot tie to this one), never the first token of whatever piece follows; every
other label is the document's true next token."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from client import StreamingDataset
from client.dataset import to_batch
from tests.conftest import ServerProcess, jsonl_config, write_jsonl

EOS, PAD = 256, 257
#: (source, shard, document) of a piece: which document a provenance record's tokens come from.
DocKey = tuple[int, int, int]
#: A document's token at an offset, or None where it is not known.
TokenAt = Callable[[DocKey, int], int | None]


def check_labels(input_ids: np.ndarray, labels: np.ndarray, records: np.ndarray, token_at: TokenAt) -> int:
    """Check one budget row against its provenance; returns the number of cut points seen.

    Inside a piece the label is the document's next token. At a piece's last token: after EOS the
    label is the next column's token (the next document's start, the packing convention) or -100
    before PAD; a piece cut mid-document gets -100, since its next token is in another piece."""
    width = len(input_ids)
    covered = np.zeros(width, dtype=bool)
    cuts = 0
    for _, col, length, source, shard, doc, offset in records.tolist():
        key = (source, shard, doc)
        covered[col : col + length] = True
        for j in range(length):
            c = col + j
            assert input_ids[c] == token_at(key, offset + j), f"column {c} is not its document's token"
            if j + 1 < length:  # the next token is in this piece
                assert labels[c] == token_at(key, offset + j + 1), f"column {c}: wrong label inside a piece"
            elif input_ids[c] == EOS:  # the document ends here
                nxt = int(input_ids[c + 1]) if c + 1 < width else PAD
                assert labels[c] == (-100 if nxt == PAD else nxt), f"column {c}: wrong label after EOS"
            else:  # cut mid-document: the continuation is another piece
                cuts += 1
                assert token_at(key, offset + j + 1) is not None, f"column {c}: a document ends without EOS"
                assert labels[c] == -100, (f"column {c}: a piece cut mid-document is labelled "
                                           f"{int(labels[c])} (the next piece's first token), not -100")
    assert (input_ids[~covered] == PAD).all() and (labels[~covered] == -100).all(), "uncovered columns not PAD"
    return cuts


# ---- to_batch alone ------------------------------------------------------------------------

def test_to_batch_masks_the_label_at_a_cut_and_nowhere_else():
    # pieces: [1 2 3] cut mid-document, [4 5 EOS] a document's end, [7 8] cut, then PAD
    row = np.array([[1, 2, 3, 4, 5, EOS, 7, 8, PAD, PAD, PAD]], dtype=np.uint16)
    batch = to_batch(row, EOS, PAD, [0, 3, 6])
    assert batch["labels"].tolist() == [[2, 3, -100, 5, EOS, 7, 8, -100, -100, -100]]
    # unchanged by the fix: segments restart at each piece and after each EOS (PAD ends the last)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 6, 10]
    assert batch["input_ids"].tolist() == [row[0, :-1].tolist()]


def test_to_batch_without_piece_starts_is_unchanged():
    """Row batches (no piece starts): only PAD is masked, EOS is labelled with what follows."""
    rows = np.array([[1, 2, EOS, 4, 5], [6, EOS, PAD, PAD, PAD]], dtype=np.uint16)
    assert to_batch(rows, EOS, PAD)["labels"].tolist() == [[2, EOS, 4, 5], [EOS, -100, -100, -100]]


@st.composite
def budget_rows(draw: st.DrawFn) -> tuple[np.ndarray, list[int], np.ndarray, list[list[int]]]:
    """A rank's budget row as ``server.stream.budget.assemble`` lays it out: pieces (documents cut every
    ``seq_len`` tokens), a subset of them in sequence order, back to back, then PAD."""
    seq_len = draw(st.integers(1, 12))
    budget = draw(st.integers(seq_len, 5 * seq_len))
    docs = [[*draw(st.lists(st.integers(0, 255), max_size=3 * seq_len)), EOS]
            for _ in range(draw(st.integers(1, 6)))]
    pieces = [(d, o, doc[o : o + seq_len]) for d, doc in enumerate(docs) for o in range(0, len(doc), seq_len)]
    row = np.full((1, budget + 1), PAD, dtype=np.uint16)
    starts, records, col = [], [], 0
    for d, o, piece in pieces:
        if col + len(piece) > budget or not draw(st.booleans()):
            continue
        row[0, col : col + len(piece)] = piece
        starts.append(col)
        records.append((0, col, len(piece), 0, 0, d, o))
        col += len(piece)
    return row, starts, np.array(records, dtype=np.int64).reshape(-1, 7), docs


@settings(max_examples=300, deadline=None)
@given(budget_rows())
def test_to_batch_labels_are_each_pieces_next_tokens(case):
    row, starts, records, docs = case
    batch = to_batch(row, EOS, PAD, starts)

    def token_at(key: DocKey, offset: int) -> int | None:
        doc = docs[key[2]]
        return doc[offset] if offset < len(doc) else None

    check_labels(batch["input_ids"][0].numpy(), batch["labels"][0].numpy(), records, token_at)
    position = batch["position_ids"][0].numpy()
    for s in starts:  # every piece is its own segment
        assert position[s] == 0


# ---- end to end, through a real server -----------------------------------------------------

TEXT = st.text(st.sampled_from("abcdefghij klmnopqrstuvwxyz.,é日"), min_size=1, max_size=120).filter(str.strip)


@pytest.mark.integration
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(TEXT, min_size=1, max_size=25), seq_len=st.integers(4, 40), extra=st.integers(0, 3 * 40),
       world=st.integers(1, 3), seed=st.integers(0, 3))
# One document in two files: an empty shard, and orders where the finished shard, the empty one and
# the next epoch's empty one come in a row (the synchronous walker once counted the finished one).
@example(docs=["a"], seq_len=4, extra=0, world=1, seed=0)
def test_served_budget_labels_are_the_true_next_tokens(tmp_path_factory, docs, seq_len, extra, world, seed):
    """Random documents (many longer than ``seq_len``, so cut into pieces), served; over a whole
    epoch of every rank, each label is checked against the documents rebuilt from provenance,
    and the rebuilt documents are exactly the corpus."""
    work = tmp_path_factory.mktemp("labels")
    write_jsonl(work / "data", docs, files=2)
    server = ServerProcess(jsonl_config(work / "data", shard_bytes=512), work).start()
    try:
        # each step takes at least one piece: this many steps cover all of epoch 0
        steps = sum(-(-(len(d.encode()) + 1) // seq_len) for d in docs)
        rows = [stream(server.address, seq_len, seq_len + extra, seed, r, world, steps) for r in range(world)]
    finally:
        server.stop()
    tokens: dict[DocKey, dict[int, int]] = {}
    for ids, _, records in (row for rank in rows for row in rank):
        for _, col, length, source, shard, doc, offset in records.tolist():
            known = tokens.setdefault((source, shard, doc), {})
            for j in range(length):
                assert known.setdefault(offset + j, int(ids[col + j])) == ids[col + j], "a document changed"
    rebuilt = []
    for known in tokens.values():
        assert sorted(known) == list(range(len(known))) and known[len(known) - 1] == EOS, "an incomplete document"
        rebuilt.append(bytes(known[i] for i in range(len(known) - 1)).decode())
    assert sorted(rebuilt) == sorted(docs)

    def token_at(key: DocKey, offset: int) -> int | None:
        return tokens[key].get(offset)

    cuts = sum(check_labels(ids, labels, records, token_at) for rank in rows for ids, labels, records in rank)
    assert cuts or all(len(d.encode()) + 1 <= seq_len for d in docs)


def stream(address: str, seq_len: int, max_tokens: int, seed: int, rank: int, world: int,
           steps: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A rank's first ``steps`` budget rows: (input_ids, labels, provenance records)."""
    ds = StreamingDataset(address, "docs", seq_len=seq_len, max_tokens=max_tokens, seed=seed, rank=rank,
                          world_size=world, provenance=True, reconnect_deadline_s=10)
    it = iter(ds)
    try:
        out = []
        for _ in range(steps):
            batch: dict[str, torch.Tensor] = next(it)
            out.append((batch["input_ids"][0].numpy(), batch["labels"][0].numpy(), batch["provenance"].numpy()))
        return out
    finally:
        it.close()  # type: ignore[attr-defined]
        ds.close()
