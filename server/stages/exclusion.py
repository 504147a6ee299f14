"""A data plan's exclusions as arithmetic on packed shards: which rows of a shard a job passes over
because they hold a token of an excluded shard or document, and the shard's rows without them.

The contract (README, "Data plan"): rows are never re-packed. From the job row an exclusion begins
at, every packed row that holds a token of an excluded document (or any row of an excluded shard)
is passed over; every other row is read as it was packed. A position inside a shard is counted in
the rows kept (``KeptRows``), so a cursor taken with an exclusion in effect means the same row to
every replica that applies the same exclusion."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from server.stages.packing import PackedShard

__all__ = ["Exclusion", "KeptRows", "Stages", "absolute_row", "relative_row", "stages_of"]


@dataclass(frozen=True)
class Exclusion:
    """What one dataset's walk excludes: whole shards, and documents of shards (by shard index)."""

    shards: frozenset[int] = frozenset()
    docs: dict[int, frozenset[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, items: Iterable[tuple[int, int]]) -> Exclusion:
        """From ``(shard, document)`` pairs; document -1 is the whole shard."""
        pairs = list(items)
        shards = frozenset(s for s, d in pairs if d < 0)
        docs: dict[int, set[int]] = {}
        for s, d in pairs:
            if d >= 0 and s not in shards:
                docs.setdefault(s, set()).add(d)
        return cls(shards, {s: frozenset(d) for s, d in docs.items()})

    def __bool__(self) -> bool:
        return bool(self.shards or self.docs)

    def touches(self, shard: int) -> bool:
        """Whether shard index ``shard`` loses rows to this exclusion."""
        return shard in self.shards or shard in self.docs


class KeptRows:
    """A packed shard's rows that hold no token of ``docs``: quacks like ``PackedShard`` for a walk
    (``rows``, ``row_view``, ``copy_rows``, ``row_segments``; row numbers count kept rows). A kept row whose label
    column (the first token of the next packed row) belongs to an excluded document gets PAD there
    instead, so no token of an excluded document is even a label."""

    def __init__(self, packed: PackedShard, docs: frozenset[int], pad_id: int) -> None:
        seg = packed.segments
        bad = np.isin(seg[:, 3], np.fromiter(docs, dtype=np.int64, count=len(docs)))
        keep = np.ones(packed.rows, dtype=bool)
        keep[seg[bad, 0]] = False
        self.kept = np.flatnonzero(keep)
        self.rows = len(self.kept)
        self.seq_len = packed.seq_len
        self._packed, self._pad = packed, pad_id
        starts = seg[(seg[:, 1] == 0) & bad, 0]  # packed rows that begin with an excluded document
        self._label_pad = np.isin(self.kept + 1, starts)
        renumbered = np.searchsorted(self.kept, seg[:, 0])
        on = keep[seg[:, 0]]
        self.segments = np.column_stack([renumbered[on], seg[on, 1:]])

    def row_view(self, start: int, stop: int) -> np.ndarray:
        """Kept rows ``[start, stop)`` (a copy)."""
        assert 0 <= start <= stop <= self.rows, (start, stop, self.rows)
        out = np.array(self._packed.row_view(0, self._packed.rows)[self.kept[start:stop]])
        out[self._label_pad[start:stop], -1] = self._pad
        return out

    def copy_rows(self, start: int, stop: int, out: np.ndarray) -> None:
        out[...] = self.row_view(start, stop)

    def row_segments(self, start: int, stop: int) -> np.ndarray:
        rows = self.segments[:, 0]
        return self.segments[np.searchsorted(rows, start) : np.searchsorted(rows, stop)]


def absolute_row(kept: KeptRows | None, shard_excluded: bool, row: int, packed_rows: int) -> int:
    """The packed row that kept row ``row`` is (``row`` may equal the kept count: the shard's end)."""
    if shard_excluded:
        return 0 if row == 0 else packed_rows
    if kept is None:
        return row
    return int(kept.kept[row]) if row < kept.rows else packed_rows


def relative_row(kept: KeptRows | None, shard_excluded: bool, absolute: int) -> int:
    """The kept rows before packed row ``absolute``."""
    if shard_excluded:
        return 0
    if kept is None:
        return absolute
    return int(np.searchsorted(kept.kept, absolute))


#: A data plan's exclusions of one walk: ``(from_row, exclusion)`` stages in row order, each
#: exclusion holding the ones before it; a walk at row ``from_row`` exactly is before that stage.
Stages = tuple[tuple[int, Exclusion], ...]


def stages_of(edits: Iterable[tuple[int, str, int, int]]) -> dict[str, Stages]:
    """Each dataset's stages from exclude edits ``(from_row, dataset, shard, document)``."""
    by_name: dict[str, list[tuple[int, int, int]]] = {}
    for row, name, shard, doc in edits:
        by_name.setdefault(name, []).append((row, shard, doc))
    out: dict[str, Stages] = {}
    for name, items in by_name.items():
        items.sort()
        rows = sorted({r for r, _, _ in items})
        out[name] = tuple((r, Exclusion.of((s, d) for rr, s, d in items if rr <= r)) for r in rows)
    return out
