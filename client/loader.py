"""``StreamingDataLoader``: a DataLoader whose ``state_dict`` is exact with any ``num_workers``."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch.utils.data import DataLoader

from client.plan import Edit, Plan
from client.dataset import RAW_KEY, STATE_KEY, StreamingDataset, expand_raw
from tokenfeed import malloc

__all__ = ["StreamingDataLoader", "fork_safe_context"]


def fork_safe_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a clean server process: forking a process whose other threads are
    inside gRPC (any live stream) can deadlock the child. The server process preloads the client,
    so starting workers stays cheap after the first time."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["client"])
    return ctx


def _as_is(item: Any) -> Any:
    """The loader's collate_fn: a dataset's item is a batch of tensors as it is."""
    return item


class StreamingDataLoader(DataLoader[dict[str, Any]]):
    """Iterates a ``StreamingDataset`` (one batch per item) and checkpoints what was consumed.

    Each batch travels from its worker with the state taken right after it, so batches still
    sitting in worker queues never count as consumed. ``num_workers`` may change between saving
    and loading: the state is per rank, not per worker. Workers start from a ``forkserver`` (not
    a plain fork of a process that may hold live gRPC streams) unless ``multiprocessing_context``
    says otherwise.
    """

    def __init__(self, dataset: StreamingDataset, num_workers: int = 0, **kwargs: Any) -> None:
        if not isinstance(dataset, StreamingDataset):
            raise TypeError(f"StreamingDataLoader needs a StreamingDataset, got {type(dataset).__name__}")
        if kwargs.pop("batch_size", None) is not None:
            raise ValueError("StreamingDataLoader takes batch_size from the dataset; leave it unset")
        if num_workers > 0 and kwargs.get("multiprocessing_context") is None:
            kwargs["multiprocessing_context"] = fork_safe_context()
        if kwargs.get("collate_fn") is None:  # items are tensors already: converting them again only costs
            kwargs["collate_fn"] = _as_is   # (and would make every field of a batch that makes them on read)
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)
        self._state: dict[str, Any] | None = None

    @property
    def _stream(self) -> StreamingDataset:
        """``dataset``, which ``__init__`` checked is a ``StreamingDataset`` (torch types it ``Dataset``)."""
        return cast(StreamingDataset, self.dataset)

    # torch types DataLoader.__iter__ as returning its own iterator class; this one is a generator.
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        self._stream._attach_state = True  # pickled into the workers this iterator starts
        malloc.tune_for_client()  # this process makes the tensors of the workers' messages
        # Worker w's batches are the rank's steps w, w + workers, ...: yield them in step order (each
        # state's "steps" is its batch's step + 1). Messages are cut where the data plan skips, so
        # the workers' messages need not line up; what waits here is a message or two per worker.
        waiting: dict[int, tuple[dict[str, Any], int]] = {}
        upcoming = self._stream.steps_read + 1  # where the workers start: the dataset's own position
        for item in super().__iter__():
            bundle = item.get(RAW_KEY)
            if bundle is None:  # no workers: batches come whole, each with its state
                self._state = item.pop(STATE_KEY)
                yield item
                continue
            for j, state in enumerate(bundle["states"]):
                waiting[int(state["steps"])] = (bundle, j)
            while upcoming in waiting:
                b, j = waiting.pop(upcoming)
                upcoming += 1
                self._state = b["states"][j]
                batch = expand_raw(b, j)
                if self.pin_memory and torch.cuda.is_available():  # the workers pinned the wire form
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                yield batch

    def state_dict(self) -> dict[str, Any]:
        """The rank's position after the last batch this loader yielded. Before the first one, the
        dataset's own position (where it was made or loaded: current, even though workers iterate
        copies of it, which makes ``dataset.state_dict()`` refuse)."""
        return self._state if self._state is not None else self._stream._state()

    @property
    def plan(self) -> Plan:
        """The data plan of the dataset (as loaded or edited; the workers' copies share it)."""
        return self._stream.plan

    def skip_steps(self, n: int, at_step: int | None = None) -> None:
        """``StreamingDataset.skip_steps`` from this loader's position (before the next ``iter()``)."""
        self.apply(Edit.skip(int(self.state_dict()["steps"]) if at_step is None else at_step, n))

    def apply(self, edit: Edit) -> None:
        """Add ``edit`` to the data plan from this loader's position (before the next ``iter()``);
        ``ValueError`` for an edit at a step already read."""
        self._stream.load_state_dict(self.state_dict())  # workers iterate copies: bring this one up to date
        self._stream._plan = self._stream.plan.apply(self._stream._checked(edit), self._stream.steps_read)
        self._state = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after the batch at which ``state`` was taken (before the next ``iter()``)."""
        self._stream.load_state_dict(state)
        self._state = None
