"""``StreamingDataLoader``: a DataLoader whose ``state_dict`` is exact with any ``num_workers``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from client.dataset import STATE_KEY, StreamingDataset


class StreamingDataLoader(DataLoader):
    """Iterates a ``StreamingDataset`` (one batch per item) and checkpoints what was consumed.

    Each batch travels from its worker with the state taken right after it, so batches still
    sitting in worker queues never count as consumed. ``num_workers`` may change between saving
    and loading: the state is per rank, not per worker.
    """

    def __init__(self, dataset: StreamingDataset, num_workers: int = 0, **kwargs: Any) -> None:
        if not isinstance(dataset, StreamingDataset):
            raise TypeError(f"StreamingDataLoader needs a StreamingDataset, got {type(dataset).__name__}")
        if kwargs.pop("batch_size", None) is not None:
            raise ValueError("StreamingDataLoader takes batch_size from the dataset; leave it unset")
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)
        self._state: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.dataset._attach_state = True  # pickled into the workers this iterator starts
        for batch in super().__iter__():
            self._state = batch.pop(STATE_KEY)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The rank's position after the last batch this loader yielded."""
        return self._state if self._state is not None else self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after the batch at which ``state`` was taken (before the next ``iter()``)."""
        self.dataset.load_state_dict(state)
        self._state = None
