"""One batch's tensors from its rows of ``seq_len + 1`` tokens: made all at once (``to_batch``), or
each when first asked for (``LazyBatch``: a consumer that reads two of four fields pays for two)."""

from __future__ import annotations

import functools
from collections.abc import Callable, ItemsView, Iterator, KeysView, Sequence, ValuesView
from typing import Any

import numpy as np
import torch

__all__ = ["DEFAULT_FIELDS", "FIELDS", "LazyBatch", "lazy_batch", "to_batch"]

#: The tensors a batch can hold (``StreamingDataset(fields=...)``), and those it holds by default.
FIELDS = ("input_ids", "labels", "position_ids", "cu_seqlens", "tokens")
DEFAULT_FIELDS = FIELDS[:4]


def _mask_cuts(labels: np.ndarray, ids: np.ndarray, eos_id: int, piece_starts: list[int]) -> None:
    """No loss at the last token of a piece cut mid-document (one not ending in EOS): a token-budget
    row holds pieces back to back, so the token after it in the row starts another piece, not its
    document's next token (that is in another piece, of this rank or another: the row does not
    say which, so a continuation that happens to follow is masked too, one label in a cut).
    Piece ends at EOS keep the next piece's first token, as a document's end does in every
    packing."""
    ends = np.asarray(piece_starts, dtype=np.int64) - 1
    ends = ends[ends >= 0]
    labels[ends[ids[ends] != eos_id]] = -100


@functools.lru_cache(maxsize=8)
def _arange(size: int) -> np.ndarray:
    out = np.arange(size, dtype=np.int64)
    out.flags.writeable = False
    return out


class _Rows:
    """The rows of one batch and what its fields are made from; the document starts are found once
    for ``position_ids`` and ``cu_seqlens`` together."""

    def __init__(self, tokens: np.ndarray, eos_id: int, pad_id: int, piece_starts: list[int] | None) -> None:
        self.tokens, self.eos_id, self.pad_id, self.piece_starts = tokens, eos_id, pad_id, piece_starts
        self._seg: np.ndarray | None = None

    def input_ids(self) -> torch.Tensor:
        return torch.from_numpy(self.tokens[:, :-1].astype(np.int64))

    def labels(self) -> torch.Tensor:
        ids, nxt = self.tokens[:, :-1], self.tokens[:, 1:]
        labels = nxt.astype(np.int64)
        padded = np.flatnonzero(nxt[:, -1] == self.pad_id)  # every packing pads only the end of a row
        if len(padded):
            labels[padded] = np.where(nxt[padded] == self.pad_id, -100, labels[padded])
        if self.piece_starts:
            _mask_cuts(labels[0], ids[0], self.eos_id, self.piece_starts)
        return torch.from_numpy(labels)

    def segments(self) -> np.ndarray:
        """Flat offsets where a segment starts: at each row start and after EOS (and piece starts)."""
        if self._seg is None:
            rows, width = self.tokens.shape
            ids = self.tokens[:, :-1]
            starts = np.empty((rows, width - 1), dtype=bool)
            starts[:, 0] = True
            np.equal(ids[:, :-1], self.eos_id, out=starts[:, 1:])
            if self.piece_starts:
                starts[0, self.piece_starts] = True
            self._seg = np.flatnonzero(starts)
        return self._seg

    def position_ids(self) -> torch.Tensor:
        rows, width = self.tokens.shape
        seg, size = self.segments(), rows * (width - 1)
        lengths = np.empty_like(seg)
        np.subtract(seg[1:], seg[:-1], out=lengths[:-1])
        lengths[-1] = size - seg[-1]
        return torch.from_numpy((_arange(size) - np.repeat(seg, lengths)).reshape(rows, width - 1))

    def cu_seqlens(self) -> torch.Tensor:
        """flash-attention's varlen layout: segment boundaries over the flattened batch."""
        seg = self.segments()
        out = np.empty(len(seg) + 1, dtype=np.int32)
        out[:-1] = seg
        out[-1] = self.tokens.shape[0] * (self.tokens.shape[1] - 1)
        return torch.from_numpy(out)

    def whole(self) -> torch.Tensor:
        return torch.from_numpy(self.tokens.astype(np.int64))

    def maker(self, field: str) -> Callable[[], torch.Tensor]:
        return self.whole if field == "tokens" else getattr(self, field)


def to_batch(tokens: np.ndarray, eos_id: int, pad_id: int, piece_starts: list[int] | None = None,
             fields: Sequence[str] = DEFAULT_FIELDS) -> dict[str, torch.Tensor]:
    """The ``fields`` of one batch from its rows of ``seq_len + 1`` tokens (contract 4 of DESIGN.md).
    ``piece_starts``: columns of row 0 where a token-budget piece starts; a piece cut mid-document
    gets no label at its last token (what follows it in the row starts another piece)."""
    rows = _Rows(tokens, eos_id, pad_id, piece_starts)
    return {f: rows.maker(f)() for f in FIELDS if f in fields}


def lazy_batch(tokens: np.ndarray, eos_id: int, pad_id: int, piece_starts: list[int] | None = None,
               fields: Sequence[str] = DEFAULT_FIELDS) -> LazyBatch:
    """``to_batch``'s batch, each field made when first read. ``tokens`` must stay unchanged for the
    batch's life (pass a copy of a buffer that is reused)."""
    rows = _Rows(tokens, eos_id, pad_id, piece_starts)
    return LazyBatch.of({f: rows.maker(f) for f in FIELDS if f in fields})


class LazyBatch(dict[str, Any]):
    """A dict of a batch's tensors whose fields are made on first access, in the reading thread.

    Every key is there from the start (``in``, ``len``, ``keys()`` and iteration make nothing);
    reading a value makes that field. What reads every value (``items()``, ``values()``, ``copy()``,
    ``==``, ``repr``, pickling to another process, ``dict(batch)``, ``{**batch}``, ``model(**batch)``)
    makes them all, and pickling or copying gives a plain ``dict``. The values are the tensors
    ``to_batch`` makes, so a batch reads the same either way.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        """As ``dict(*args, **kw)``: values already made (``LazyBatch.of`` takes makers)."""
        super().__init__(*args, **kw)
        self._order: list[str] = list(super().keys())
        self._pending: dict[str, Callable[[], torch.Tensor]] = {}

    @classmethod
    def of(cls, makers: dict[str, Callable[[], torch.Tensor]]) -> LazyBatch:
        """A batch whose field ``k`` is ``makers[k]()``, made when first read."""
        batch = cls.__new__(cls)  # (an empty dict: ``__init__``'s copy of nothing skipped, once a batch)
        batch._order, batch._pending = list(makers), dict(makers)
        return batch

    # ---- per key: makes at most that field --------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        make = self._pending.pop(key, None)
        if make is not None:
            super().__setitem__(key, make())
        value: torch.Tensor = super().__getitem__(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __contains__(self, key: object) -> bool:
        return key in self._pending or super().__contains__(key)

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._order))

    def keys(self) -> KeysView[str]:  # type: ignore[override]
        return KeysView(self)

    def __setitem__(self, key: str, value: Any) -> None:
        self._pending.pop(key, None)
        if not super().__contains__(key):
            self._order.append(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._pending.pop(key, None)
        super().pop(key, None)
        self._order.remove(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        value = self[key]
        del self[key]
        return value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    # ---- whole batch: makes every field, then behaves as a plain dict ----------------------
    def _fill(self) -> None:
        if self._pending:
            values = [self[k] for k in self._order]
            super().clear()
            super().update(zip(self._order, values))

    def items(self) -> ItemsView[str, Any]:  # type: ignore[override]
        self._fill()
        return ItemsView(self)

    def values(self) -> ValuesView[Any]:  # type: ignore[override]
        self._fill()
        return ValuesView(self)

    def update(self, *args: Any, **kw: Any) -> None:
        for key, value in dict(*args, **kw).items():
            self[key] = value

    def clear(self) -> None:
        self._pending.clear()
        self._order.clear()
        super().clear()

    def popitem(self) -> tuple[str, Any]:
        if not self._order:
            raise KeyError("popitem(): dictionary is empty")
        key = self._order[-1]
        return key, self.pop(key)

    def copy(self) -> dict[str, Any]:
        return {k: self[k] for k in self._order}

    def __eq__(self, other: object) -> bool:
        return self.copy() == other

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None

    def __or__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]
        return {**self.copy(), **other}

    def __ror__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]
        return {**other, **self.copy()}

    def __ior__(self, other: Any) -> LazyBatch:  # type: ignore[override]
        self.update(other)
        return self

    def __repr__(self) -> str:
        return repr(self.copy())

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:
        return dict, (self.copy(),)

    def __copy__(self) -> dict[str, Any]:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        import copy

        return copy.deepcopy(self.copy(), memo)


def _register_pytree() -> None:
    """torch's pytree (``tree_map``, ``torch.compile``) treats unknown dict subclasses as leaves:
    flatten a ``LazyBatch`` as the dict it reads as (rebuilt as a plain dict)."""
    try:
        from torch.utils import _pytree as pytree

        pytree.register_pytree_node(
            LazyBatch, lambda b: (list(b.values()), list(b.keys())),
            lambda values, keys: dict(zip(keys, values)),
            serialized_type_name="client.batch.LazyBatch")
    except (ImportError, AttributeError, TypeError, ValueError):  # another torch: leaves, as before
        pass


_register_pytree()
