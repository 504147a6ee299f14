"""Resume is exact for every kind of source (the cursor tests' helper, through a real server)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from client import StreamingDataLoader, StreamingDataset
from tests.conftest import ROOT, make_documents
from tests.resume_helpers import check_resume, take

DOCS = make_documents(120, seed=11)


def write_source(kind: str, root) -> dict:
    """Write the corpus in the given format; return its source config."""
    root.mkdir(parents=True, exist_ok=True)
    lines = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in DOCS)
    if kind == "jsonl":
        (root / "a.jsonl").write_bytes(lines)
        return {"type": "jsonl", "paths": [str(root / "*.jsonl")], "shard_bytes": 8192}
    if kind == "jsonl.gz":
        for i in range(3):
            (root / f"{i}.jsonl.gz").write_bytes(gzip.compress(b"".join(lines.splitlines(True)[i::3])))
        return {"type": "jsonl", "paths": [str(root / "*.jsonl.gz")]}
    if kind == "jsonl.zst":
        for i in range(3):
            (root / f"{i}.jsonl.zst").write_bytes(
                zstandard.ZstdCompressor().compress(b"".join(lines.splitlines(True)[i::3])))
        return {"type": "jsonl", "paths": [str(root / "*.jsonl.zst")]}
    if kind == "text":
        for i, d in enumerate(DOCS):
            (root / f"{i}.txt").write_text(d)
        return {"type": "text", "paths": [str(root / "*.txt")], "shard_bytes": 8192}
    if kind == "parquet":
        pq.write_table(pa.table({"text": DOCS}), root / "a.parquet", row_group_size=15)
        return {"type": "parquet", "paths": [str(root / "*.parquet")]}
    if kind == "hf":
        import datasets

        datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(root / "saved"))
        return {"type": "hf", "path": str(root / "saved"), "rows_per_shard": 20}
    raise ValueError(kind)


@pytest.fixture(scope="module")
def server(module_servers, tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    config = {"datasets": {kind.replace(".", "_"): {"source": write_source(kind, root / kind)}
                           for kind in ("jsonl", "jsonl.gz", "jsonl.zst", "text", "parquet", "hf")}}
    raw = root / "raw.yaml"
    raw.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run([sys.executable, "-m", "server", "prepare", "--config", str(raw), "--dataset", "parquet",
                    "--out", str(root / "prepared"), "--workers", "1"], cwd=ROOT, check=True, capture_output=True)
    config["datasets"]["tokens"] = {"source": {"type": "tokens", "path": str(root / "prepared")}}
    return module_servers(config)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["jsonl", "jsonl_gz", "jsonl_zst", "text", "parquet", "hf", "tokens"])
def test_resume_is_exact_for_every_source(server, name):
    def make(workers: int = 0):
        ds = StreamingDataset(server.address, name, seq_len=64, batch_size=4, seed=5, rank=1, world_size=2)
        return StreamingDataLoader(ds, num_workers=workers) if workers else ds

    reference = take(make(), 30)
    for k in (0, 9, 26):
        check_resume(lambda: make(1), make, reference, k)
