"""The cost of a data plan edit: time to the first batch after it, against a plain resume.

A job reads ``STEPS`` steps, saves its state, and a new dataset loads it, applies the edit at the
next step and iterates: the first batch comes from a stream that starts with the edit in effect
(a skip: a ``locate``; an exclusion: the shard it starts in is packed and its kept rows counted; a
weights edit: a mixture with another schedule). Median of ``REPEAT`` positions; prints and writes JSON.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import ServerProcess, make_documents, write_jsonl
from client import Edit, StreamingDataset

SEQ, BATCH, REPEAT = 512, 8, 7


def config(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"datasets": {}}
    for name, seed in (("web", 1), ("books", 2)):
        write_jsonl(root / name, make_documents(1500, seed=seed, max_len=4000), files=4)
        out["datasets"][name] = {"source": {"type": "jsonl", "paths": [str(root / name / "*.jsonl")],
                                            "shard_bytes": 256 << 10}}
    out["datasets"]["mix"] = {"mixture": {"web": 0.7, "books": 0.3}}
    return out


def first_batch(address: str, name: str, steps: int, edit: Edit | None) -> float:
    ds = StreamingDataset(address, name, seq_len=SEQ, batch_size=BATCH, provenance=edit is not None)
    state = None
    it = iter(ds)
    batches = list(itertools.islice(it, steps))
    state = ds.state_dict()
    del it
    fresh = StreamingDataset(address, name, seq_len=SEQ, batch_size=BATCH)
    fresh.load_state_dict(state)
    if edit is not None:  # at the next step: what the last batch read, excluded from here on
        prov = batches[-1]["provenance"].numpy() if edit.op == "exclude" else None
        if prov is not None:
            _, _, _, _, shard, doc, _ = prov[-1].tolist()
            edit = Edit.exclude(steps, shard, doc if edit.document >= 0 else None, dataset=edit.dataset)
        else:
            edit = Edit.from_json({**edit.to_json(), "at_step": steps})
        fresh.apply(edit)
    start = time.perf_counter()
    next(iter(fresh))
    return time.perf_counter() - start


def main() -> None:
    cases = {"resume (no edit)": ("web", None), "skip 1,000 steps": ("web", Edit.skip(0, 1000)),
             "exclude a document": ("web", Edit.exclude(0, 0, 0)), "exclude a shard": ("web", Edit.exclude(0, 0)),
             "mixture resume (no edit)": ("mix", None),
             "weights": ("mix", Edit.mixture_weights(0, {"web": 0.2, "books": 0.8}))}
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(config(Path(tmp) / "data"), Path(tmp)).start()
        try:
            results = {}
            for label, (name, edit) in cases.items():
                times = [first_batch(server.address, name, 5 + 37 * i, edit) for i in range(REPEAT)]
                results[label] = {"median_s": statistics.median(times), "max_s": max(times)}
                print(f"{label:28s} median {results[label]['median_s'] * 1e3:7.1f} ms   "
                      f"max {results[label]['max_s'] * 1e3:7.1f} ms", flush=True)
        finally:
            server.stop()
    json.dump(results, sys.stdout if len(sys.argv) < 2 else open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
