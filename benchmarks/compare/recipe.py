"""The usual in-trainer recipe for raw text (runs in ``.venv-bench``): Hugging Face ``datasets``
streaming over the JSONL files, ``map`` with the BPE tokenizer (``tokenizers.encode_batch``), and
concat packing into batches of 8 rows of 2,049 tokens inside 2 DataLoader workers, which split the
files between them. Every epoch tokenizes again.

    python -m benchmarks.compare.recipe --corpus CORPUS_JSON [--workers 2] [--epochs 2] [--parts N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from benchmarks.compare.procstat import emit

SEQ, BATCH = 2048, 8


class PackedBatches(IterableDataset):
    """Concat packing of a tokenized HF ``IterableDataset`` (each worker packs its own files)."""

    def __init__(self, docs: Any, eos_id: int) -> None:
        super().__init__()
        self.docs, self.eos_id = docs, eos_id

    def __iter__(self):
        need = BATCH * SEQ + 1  # 8 rows of SEQ inputs, and the label after the last one
        buf: list[int] = []
        for doc in self.docs:  # HF streaming splits its shards (files) across DataLoader workers
            buf.extend(doc["ids"])
            buf.append(self.eos_id)
            while len(buf) >= need:
                flat = torch.tensor(buf[:need], dtype=torch.int64)
                yield flat.as_strided((BATCH, SEQ + 1), (SEQ, 1))
                del buf[:need - 1]


def make_loader(jsonl: list[str], tokenizer_path: str, eos_id: int, workers: int) -> DataLoader:
    import datasets
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    tok = Tokenizer.from_file(tokenizer_path)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return {"ids": [e.ids for e in tok.encode_batch(batch["text"])]}

    docs = datasets.load_dataset("json", data_files=jsonl, split="train", streaming=True)
    docs = docs.map(tokenize, batched=True, batch_size=64, remove_columns=["text"])
    return DataLoader(PackedBatches(docs, eos_id), batch_size=None, num_workers=workers)


def run(corpus: dict, workers: int, epochs: int, parts: int) -> dict:
    loader = make_loader(corpus["jsonl"][:parts], corpus["tokenizer"], corpus["eos_id"], workers)
    results = []
    for _ in range(epochs):
        t0, tokens = time.perf_counter(), 0
        for batch in loader:  # a new iteration: new workers, tokenizing again
            tokens += batch.shape[0] * SEQ
        seconds = time.perf_counter() - t0
        results.append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
    return {"workers": workers, "parts": parts, "epochs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--parts", type=int, default=8, help="JSONL files to read (of 8)")
    args = parser.parse_args()
    emit(run(json.loads(Path(args.corpus).read_text()), args.workers, args.epochs, args.parts))


if __name__ == "__main__":
    main()
