"""A plain ``DataLoader(ds, batch_size=None, num_workers>0)`` iterates copies of the dataset in its
worker processes, so the main process's ``ds.state_dict()`` never advances (issue 16). It must say
so (a ``RuntimeError`` naming the loaders whose state is exact) instead of handing the trainer a
checkpoint that silently replays data; the exact loaders and main-process iteration still work."""

from __future__ import annotations

import itertools
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from client import StreamingDataLoader, StreamingDataset
from client.loader import fork_safe_context
from tests.conftest import ROOT, jsonl_config, make_documents, write_jsonl
from tests.resume_helpers import check_resume, same_batches, take

pytestmark = pytest.mark.integration

SEQ, BATCH, SEED = 64, 4, 1
#: What the error must name: the two ways to an exact state with workers.
FIXES = ("StreamingDataLoader", "StatefulDataLoader")


@pytest.fixture(scope="module")
def address(module_servers, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("stale") / "data"
    write_jsonl(path, make_documents(120, seed=8, max_len=3000), files=2)
    return module_servers(jsonl_config(path, shard_bytes=16 << 10)).address


@pytest.fixture(scope="module")
def reference(address) -> list[dict[str, torch.Tensor]]:
    """The rank's first batches, iterated in this process."""
    return take(dataset(address), 12)


def dataset(address: str) -> StreamingDataset:
    return StreamingDataset(address, "docs", seq_len=SEQ, batch_size=BATCH, seed=SEED, rank=1, world_size=2)


def assert_refused(ds: StreamingDataset) -> None:
    with pytest.raises(RuntimeError, match="DataLoader worker processes") as err:
        ds.state_dict()
    assert all(fix in str(err.value) for fix in FIXES), str(err.value)


def test_plain_dataloader_with_workers_refuses_the_stale_state(address, reference):
    """Workers started by forkserver (as a process holding gRPC channels must): the dataset goes
    to them pickled; the main process's copy stays where it was made."""
    ds = dataset(address)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=fork_safe_context())
    it = iter(loader)
    batches = [next(it) for _ in range(5)]
    assert same_batches(batches, reference[:5])  # the rank's sequence (contract 3)
    assert_refused(ds)  # before the fix: the state at batch 0, with 5 batches trained on
    del it


def test_plain_dataloader_with_forked_workers_refuses_the_stale_state(address):
    """Linux's default start method: forked workers share memory with nothing of the parent's
    but what they inherit, and pickle nothing. In a fresh interpreter (no gRPC thread to fork)."""
    script = textwrap.dedent(f"""
        import itertools
        from torch.utils.data import DataLoader
        from client import StreamingDataset
        ds = StreamingDataset({address!r}, "docs", seq_len={SEQ}, batch_size={BATCH}, seed={SEED})
        loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
        assert len(list(itertools.islice(loader, 5))) == 5
        try:
            state = ds.state_dict()
        except RuntimeError as err:
            print("refused:", err)
        else:
            print("state at row", state["position"]["row"])
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("refused:"), done.stdout
    assert all(fix in done.stdout for fix in FIXES), done.stdout


def test_main_process_iteration_keeps_an_exact_state(address, reference):
    """``num_workers=0`` iterates this very object: its state is exact, and a pickled copy (not
    a worker's) does not count as one handed to workers."""
    ds = dataset(address)
    pickle.loads(pickle.dumps(ds))
    consumed = list(itertools.islice(DataLoader(ds, batch_size=None, num_workers=0), 5))
    assert same_batches(consumed, reference[:5])
    resumed = dataset(address)
    resumed.load_state_dict(ds.state_dict())
    assert same_batches(take(resumed, 3), reference[5:8])


def test_streaming_dataloader_state_is_exact_and_the_dataset_one_refused(address, reference):
    for k in (0, 3):
        check_resume(lambda: StreamingDataLoader(dataset(address), num_workers=2), lambda: dataset(address),
                     reference, k)
    ds = dataset(address)
    loader = StreamingDataLoader(ds, num_workers=2)
    assert loader.state_dict() == dataset(address).state_dict()  # before any batch: where it was made
    it = iter(loader)
    assert same_batches([next(it) for _ in range(3)], reference[:3])
    state = loader.state_dict()
    assert_refused(ds)  # the loader's state is the one to save: the dataset's own never moved
    del it
    loader.load_state_dict(state)
    assert loader.state_dict()["position"] == state["position"]  # loaded, before the next batch
    assert same_batches(take(loader, 2), reference[3:5])


def test_stateful_dataloader_state_is_exact_and_the_dataset_one_refused(address, reference):
    def make() -> StatefulDataLoader:
        return StatefulDataLoader(dataset(address), batch_size=None, num_workers=2,
                                  multiprocessing_context=fork_safe_context())

    check_resume(make, make, reference, 4)
    loader = make()
    it = iter(loader)
    next(it)
    assert loader.state_dict()  # from the workers' copies: exact
    assert_refused(loader.dataset)
    del it
