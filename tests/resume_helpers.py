"""One save/load/resume helper for every stateful piece: take k, save, reload, compare."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from typing import Any

import torch

MakeLoader = Callable[[], Any]  # a fresh dataset or loader (something with state_dict/load_state_dict)


def take(loader: Iterable, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(loader, n))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def save_after(make: MakeLoader, k: int) -> tuple[list[dict], dict]:
    """Consume ``k`` batches from a fresh loader; return them and the state taken right after."""
    loader = make()
    it = iter(loader)
    consumed = [next(it) for _ in range(k)]
    state = loader.state_dict()
    del it
    state = json.loads(json.dumps(state))  # what a checkpoint stores: plain JSON
    return consumed, state


def resume(make: MakeLoader, state: dict, n: int) -> list[dict]:
    """A fresh loader that loads ``state`` and yields ``n`` batches."""
    loader = make()
    loader.load_state_dict(state)
    return take(loader, n)


def check_resume(make_save: MakeLoader, make_load: MakeLoader, reference: list[dict], k: int, n: int = 4) -> dict:
    """Save after ``k`` batches and resume: batches k, k+1, ... must equal the reference exactly."""
    assert len(reference) >= k + n, "the reference run is too short for this check"
    consumed, state = save_after(make_save, k)
    assert same_batches(consumed, reference[:k]), "batches before the save differ from the reference"
    resumed = resume(make_load, state, n)
    assert same_batches(resumed, reference[k : k + n]), f"resume after {k} batches is not exact"
    return state
