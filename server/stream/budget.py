"""Token-budget batches: each step takes the next document pieces of the global order that fit
``max_tokens`` per rank, and balances them across ranks by longest-processing-time (LPT).

The global unit is the ``split`` sequence (documents cut into pieces of at most ``seq_len``
tokens, one per row). A step is a run of consecutive pieces; its end is a cursor, so resume and
elastic resume start a new step exactly at the first piece not yet consumed. Every rank computes
every step (it needs the whole step to know its share) and keeps its own part."""

from __future__ import annotations

import heapq
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.stages.order import Locator, lpt
from server.stream.params import TURN, Chunk, Dealt, Offload, Request, StreamParams
from server.stream.walk import take
from server.stream.walker import PROVENANCE_WIDTH, make_walker
from server.supply.store import ShardStore

#: Pieces planned between two turns given to the event loop.
YIELD_EVERY = 256


@dataclass
class Piece:
    tokens: np.ndarray       # the piece's tokens (no PAD)
    records: np.ndarray | None  # provenance records (row 0, columns within the piece)
    epoch: int


class StepPlanner:
    """Cuts the piece sequence into steps that fit ``ranks * budget`` tokens."""

    def __init__(self, store: ShardStore, p: StreamParams) -> None:
        self.p, self.store = p, store
        self.walker = make_walker(store, p.dataset, p.seed, p.seq_len, "split", p.start)
        self.pad = p.dataset.info.pad_id
        self._next: tuple[Piece, Locator] | None = None  # read but not consumed: starts the next step
        self._row = np.empty((1, p.seq_len + 1), dtype=p.dataset.dtype)

    def _read(self) -> Generator[Request, None, tuple[Piece, Locator]]:
        """The next piece and the cursor just before it."""
        if self._next is not None:
            held, self._next = self._next, None
            return held
        before = self.walker.locator()
        records: list[np.ndarray] | None = [] if self.p.provenance else None
        epoch = yield from take(self.walker, self._row, records)
        row = self._row[0, :-1]
        pads = np.flatnonzero(row == self.pad)
        length = int(pads[0]) if len(pads) else len(row)
        rec = np.concatenate(records) if records else None
        return Piece(row[:length].copy(), rec, epoch), before

    def step(self) -> Generator[Request, Any, tuple[list[Piece], list[int], Locator]]:
        """The next step's pieces, each piece's rank, and the cursor after the step.

        A step of a large job holds many pieces (at least one per rank), and every rank plans
        the whole step: the least-loaded rank comes from a heap, and the loop gets a turn every
        ``YIELD_EVERY`` pieces, so one stream's planning never stalls the others."""
        ranks, budget = self.p.world_size, self.p.max_tokens
        pieces: list[Piece] = []
        heap = [(0, k) for k in range(ranks)]  # (load, rank): the online assignment that fits
        online: list[int] = []
        while True:
            piece, before = yield from self._read()
            load, r = heap[0]
            if pieces and load + len(piece.tokens) > budget:
                self._next = (piece, before)  # does not fit: it opens the next step
                break
            pieces.append(piece)
            online.append(r)
            heapq.heapreplace(heap, (load + len(piece.tokens), r))
            if len(pieces) % YIELD_EVERY == 0:
                yield TURN
        lengths = [len(p.tokens) for p in pieces]
        # About 3.5 us a piece: a large job's step (8,192 pieces, 29 ms) goes to a thread, so
        # that the loop serving every other stream keeps its turns (bench_load: 47 ms of lag).
        if len(lengths) < YIELD_EVERY * 4:
            owner = lpt(lengths, ranks)
        else:
            owner = yield Offload(lpt, (lengths, ranks))
        if max(np.bincount(owner, weights=lengths, minlength=ranks)) > budget:
            owner = online  # LPT overshot the budget: keep the assignment that fits
        return pieces, owner, before


def assemble(pieces: list[Piece], owner: list[int], rank: int, out: np.ndarray,
             pad_id: int) -> tuple[np.ndarray, list[int]]:
    """Rank ``rank``'s pieces, in sequence order, back to back in ``out`` ([1, budget + 1]);
    returns its provenance records and the columns where pieces start."""
    out.fill(pad_id)
    col, starts, recs = 0, [], []
    for piece, r in zip(pieces, owner):
        if r != rank:
            continue
        out[0, col : col + len(piece.tokens)] = piece.tokens
        if piece.records is not None:
            rec = piece.records.copy()
            rec[:, 1] += col
            recs.append(rec)
        starts.append(col)
        col += len(piece.tokens)
    prov = np.concatenate(recs) if recs else np.empty((0, PROVENANCE_WIDTH), dtype=np.int64)
    return prov, starts


def budget_chunks(params: StreamParams, store: ShardStore) -> Dealt:
    """Token-budget batches ``[1, max_tokens]`` of the rank's steps first_step, +stride, ..."""
    p = params
    planner = StepPlanner(store, p)
    step, wanted = 0, p.first_step
    try:
        while True:
            batch_starts: list[list[int]] = []
            chunk = Chunk(tokens=np.empty((p.batches_per_message, 1, p.max_tokens + 1), dtype=p.dataset.dtype),
                          cursors=[], steps=[], epochs=[], provenance=[] if p.provenance else None,
                          starts=batch_starts)
            while len(chunk.steps) < p.batches_per_message:
                pieces, owner, after = yield from planner.step()
                if step == wanted:
                    i = len(chunk.steps)
                    prov, starts = assemble(pieces, owner, p.rank, chunk.tokens[i], p.dataset.info.pad_id)
                    chunk.cursors.append(after)
                    chunk.steps.append(step)
                    chunk.epochs.append(pieces[0].epoch)
                    batch_starts.append(starts)
                    if chunk.provenance is not None:
                        chunk.provenance.append(prov)
                    wanted += p.step_stride
                step += 1
            yield chunk
    finally:
        planner.walker.close()  # unregister from the cache's future index and the prefetcher
