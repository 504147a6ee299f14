"""The peers' own formats, written once from the shared token stream (runs in ``.venv-bench``).

    python -m benchmarks.compare.formats --corpus CORPUS_JSON --kind {mds_none,mds_zstd,litdata,hf}

Every format holds rows of ``seq_len + 1`` uint16 tokens (the extra one is the last label): MDS
and Arrow rows start every ``seq_len`` tokens, as the memmap baseline's do; LitData's
``TokensLoader`` cuts its own blocks of ``seq_len + 1`` tokens from the stream (its LLM recipe).
A directory is written next to a ``done.json`` naming the corpus it came from, so a rerun reuses it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.compare.procstat import emit

log = logging.getLogger(__name__)
SEQ = 2048
KINDS = ("mds_none", "mds_zstd", "litdata", "hf")


def rows(tokens_path: str) -> np.ndarray:
    """All rows ``[i * SEQ, i * SEQ + SEQ + 1)`` of the stream, as a read-only strided view."""
    stream = np.memmap(tokens_path, dtype="<u2", mode="r")
    n = (len(stream) - 1) // SEQ
    return np.lib.stride_tricks.as_strided(stream, shape=(n, SEQ + 1), strides=(SEQ * 2, 2), writeable=False)


def write_mds(tokens: str, out: Path, compression: str | None) -> None:
    from streaming import MDSWriter

    data = rows(tokens)
    with MDSWriter(out=str(out), columns={"tokens": f"ndarray:uint16:{SEQ + 1}"}, compression=compression,
                   size_limit=1 << 26) as writer:
        for row in data:
            writer.write({"tokens": np.ascontiguousarray(row)})


def _litdata_piece(piece: tuple[str, int, int]):
    """One input of LitData's ``optimize``: a stretch of the stream, as one uint16 array (a numpy
    array: LitData's tensor serializer has no uint16)."""
    path, start, stop = piece
    yield np.array(np.memmap(path, dtype="<u2", mode="r")[start:stop])


def write_litdata(tokens: str, out: Path) -> None:
    from litdata import optimize
    from litdata.streaming.item_loader import TokensLoader

    n = len(np.memmap(tokens, dtype="<u2", mode="r"))
    step = (SEQ + 1) * 4096  # whole blocks per input, so that no block straddles two inputs
    pieces = [(tokens, s, min(s + step, n)) for s in range(0, n, step)]
    optimize(fn=_litdata_piece, inputs=pieces, output_dir=str(out), chunk_size=(SEQ + 1) * 8192,
             item_loader=TokensLoader(), num_workers=2, reorder_files=False, verbose=False)


def write_hf(tokens: str, out: Path) -> None:
    """Built from a pyarrow array: ``Dataset.from_dict`` on a 2-D numpy array is pathological."""
    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()
    data = rows(tokens)
    flat = pa.array(np.ascontiguousarray(data).reshape(-1))
    table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(flat, SEQ + 1)})
    datasets.Dataset(table).save_to_disk(str(out))


def ensure(corpus: dict, kind: str) -> Path:
    """The directory of ``kind`` for ``corpus``, written if missing or made from another corpus."""
    out = Path(corpus["cache"]) / corpus["scale"] / kind
    marker = out / "done.json"
    identity = {"tokens": corpus["tokens"], "num_tokens": corpus["num_tokens"], "kind": kind}
    if marker.exists() and json.loads(marker.read_text()) == identity:
        return out
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    log.info("writing %s for %s", kind, out)
    if kind.startswith("mds"):
        write_mds(corpus["tokens"], out, None if kind == "mds_none" else "zstd")
    elif kind == "litdata":
        write_litdata(corpus["tokens"], out)
    elif kind == "hf":
        write_hf(corpus["tokens"], out)
    else:
        raise ValueError(f"--kind must be one of {KINDS}, got {kind!r}")
    marker.write_text(json.dumps(identity))
    log.info("wrote %s in %.1f s", kind, time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", required=True, help="corpus.json written by benchmarks.compare.corpus")
    parser.add_argument("--kind", required=True, choices=KINDS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    corpus = json.loads(Path(args.corpus).read_text())
    out = ensure(corpus, args.kind)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    emit({"kind": args.kind, "path": str(out), "bytes": size})


if __name__ == "__main__":
    main()
