"""The peers as a trainer process sees them (runs in ``.venv-bench``, one fresh interpreter per call).

    python -m benchmarks.compare.peers throughput --corpus C --loader L --workers N [--seconds S --repeats R]
    python -m benchmarks.compare.peers resume --corpus C --loader L --fraction F

Every loader delivers batches of 8 rows of 2,049 tokens (2,048 inputs and the last label) as a
torch tensor, made int64 in the trainer loop (timed), read in order (no shuffle: each peer's
fastest path). ``tokens`` counted per batch: 8 x 2,048. Loaders:

* ``memmap``: a map-style dataset over a ``np.memmap`` of the stream, one batch per item (the floor).
* ``litdata``: ``optimize`` output read with ``StreamingDataset(item_loader=TokensLoader(2049))``
  and ``StreamingDataLoader``.
* ``hf``: ``load_from_disk(...).with_format("torch")`` (Arrow) in a torch ``DataLoader``.
* ``mds_none`` / ``mds_zstd``: MosaicML ``StreamingDataset`` on local MDS shards, ``StreamingDataLoader``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.compare.procstat import emit, measure

SEQ, BATCH = 2048, 8
LOADERS = ("memmap", "litdata", "hf", "mds_none", "mds_zstd")


class MemmapBatches(Dataset):
    """Batch ``b`` = rows ``[8b, 8b + 8)`` of the stream; the memmap opens lazily in each worker."""

    def __init__(self, path: str, start_row: int = 0) -> None:
        self.path, self.start_row = path, start_row
        n = Path(path).stat().st_size // 2
        self.rows = (n - 1) // SEQ
        self._view: np.ndarray | None = None

    def __len__(self) -> int:
        return (self.rows - self.start_row) // BATCH

    def __getitem__(self, b: int) -> torch.Tensor:
        if self._view is None:
            stream = np.memmap(self.path, dtype="<u2", mode="r")
            self._view = np.lib.stride_tricks.as_strided(stream, shape=(self.rows, SEQ + 1), strides=(SEQ * 2, 2))
        r = self.start_row + b * BATCH
        return torch.from_numpy(self._view[r:r + BATCH].astype(np.int64))


def _dir(corpus: dict, kind: str) -> str:
    return str(Path(corpus["cache"]) / corpus["scale"] / kind)


def make_loader(corpus: dict, loader: str, workers: int) -> tuple[Any, int]:
    """(an iterable of batches, batches per epoch)."""
    if loader == "memmap":
        ds = MemmapBatches(corpus["tokens"])
        return DataLoader(ds, batch_size=None, num_workers=workers), len(ds)
    if loader == "litdata":
        import litdata
        from litdata.streaming.item_loader import TokensLoader

        ds = litdata.StreamingDataset(_dir(corpus, "litdata"), item_loader=TokensLoader(block_size=SEQ + 1),
                                      shuffle=False, drop_last=True)
        return litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers, drop_last=True), len(ds) // BATCH
    if loader == "hf":
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_from_disk(_dir(corpus, "hf")).with_format("torch")
        return DataLoader(ds, batch_size=BATCH, num_workers=workers, drop_last=True), len(ds) // BATCH
    if loader in ("mds_none", "mds_zstd"):
        from streaming import StreamingDataLoader, StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        ds = StreamingDataset(local=_dir(corpus, loader), batch_size=BATCH, shuffle=False)
        return StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers, drop_last=True), ds.num_samples // BATCH
    raise ValueError(f"--loader must be one of {LOADERS}, got {loader!r}")


def to_trainer(batch: Any) -> torch.Tensor:
    """The int64 ``[8, 2049]`` tensor a trainer slices ``input_ids`` and ``labels`` from."""
    if isinstance(batch, dict):
        batch = batch.get("input_ids", batch.get("tokens"))
    return batch.to(torch.int64)


def tokens_of(batch: Any) -> int:
    return to_trainer(batch).shape[0] * SEQ


def data_files(corpus: dict, loader: str) -> list[Path]:
    """The files a loader reads."""
    if loader == "memmap":
        return [Path(corpus["tokens"])]
    return sorted(p for p in Path(_dir(corpus, loader)).rglob("*") if p.is_file())


def page_in(paths: list[Path]) -> int:
    """Read ``paths`` once so that they are in the page cache: "warm" for a loader of local files.
    These machines reclaim idle page cache within tens of seconds (a file read twice 20 s apart
    came from disk again), which would charge the peers disk reads that tokenfeed's in-process
    cache never pays. Returns the bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                total += len(chunk)
    return total


def throughput(corpus: dict, loader: str, workers: int, seconds: float, repeats: int, warmup: int) -> dict:
    batches, per_epoch = make_loader(corpus, loader, workers)
    files = data_files(corpus, loader)
    runs = []
    for _ in range(repeats):  # each repeat is a new iteration: a new epoch, new workers
        page_in(files)
        it: Iterator[Any] = iter(batches)
        runs.append(measure(it, tokens_of, warmup=warmup, seconds=seconds, max_batches=per_epoch - warmup).as_dict())
        del it
    med = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "cpu_s_per_m_tokens")}
    return {"loader": loader, "workers": workers, "batches_per_epoch": per_epoch, **med, "runs": runs}


def expected_batch(corpus: dict, loader: str, k: int) -> np.ndarray:
    """Batch ``k`` of an uninterrupted in-order epoch of rows ``[i * SEQ, i * SEQ + SEQ + 1)``,
    straight from the token stream."""
    stream = np.memmap(corpus["tokens"], dtype="<u2", mode="r")
    return np.stack([np.asarray(stream[r * SEQ:r * SEQ + SEQ + 1], dtype=np.int64)
                     for r in range(k * BATCH, (k + 1) * BATCH)])


def resume(corpus: dict, loader: str, fraction: float) -> dict:
    """Seconds from ``load_state_dict`` to the first batch, resuming after batch ``k - 1``, with
    ``num_workers=0`` in a fresh process (the loader is built before the clock starts)."""
    batches, per_epoch = make_loader(corpus, loader, 0)
    k = int(fraction * per_epoch)
    if loader.startswith("mds"):
        # What StreamingDataLoader.state_dict() holds after k batches of epoch 0 (1 node, no shuffle).
        state = {"epoch": 0, "sample_in_epoch": k * BATCH, "num_canonical_nodes": 1,
                 "shuffle_seed": batches.dataset.shuffle_seed, "initial_physical_nodes": 1}
        expected = expected_batch(corpus, loader, k)  # in order: verified against the stream
    elif loader == "litdata":
        it = iter(batches)  # LitData's state is the loader's own after consuming k batches
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(batches.state_dict()))
        # Batch k of the uninterrupted run: optimize's workers lay chunks out in their own order.
        expected = to_trainer(next(it)).numpy()
        del it
        batches, _ = make_loader(corpus, loader, 0)
    else:
        raise ValueError(f"resume is measured for litdata and mds_*, not {loader!r}")
    t0 = time.perf_counter()
    batches.load_state_dict(state)
    first = to_trainer(next(iter(batches)))
    seconds = time.perf_counter() - t0
    exact = bool(np.array_equal(first.numpy(), expected))
    digest = hashlib.blake2b(first.numpy().tobytes(), digest_size=8).hexdigest()
    return {"loader": loader, "fraction": fraction, "batch": k, "batches_per_epoch": per_epoch,
            "seconds": seconds, "exact": exact, "digest": digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["throughput", "resume"])
    parser.add_argument("--corpus", required=True, help="corpus.json")
    parser.add_argument("--loader", required=True, choices=LOADERS)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")  # read-only memmap views, deprecation notices: not measured
    corpus = json.loads(Path(args.corpus).read_text())
    if args.command == "throughput":
        emit(throughput(corpus, args.loader, args.workers, args.seconds, args.repeats, args.warmup))
    else:
        emit(resume(corpus, args.loader, args.fraction))


if __name__ == "__main__":
    main()
