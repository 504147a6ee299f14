"""``data-server prepare``: token shards + manifest, served exactly like the raw dataset without
tokenizing, resumable after a limit or a kill, damaged shards skipped."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
import zstandard

from client import StreamingDataset
from server.config import parse_config
from server.stages.dataset import Dataset
from server.errors import ConfigError, DataLoss, Unavailable
from server.prepare import prepare, prepare_shard, train_tokenizer
from tests.conftest import ROOT, make_documents, write_jsonl
from tests.test_tokenizers import train_bpe

BAD_LINES = b'{"text": "ok"}\n{"text": 5}\nnot json\n{"text": "caf\xe9"}\n{"text": "x \\ud800"}\n'


def make_corpus(root: Path, docs: int = 240, max_len: int = 3000) -> dict:
    """JSONL files (plain, zstd, one truncated zstd, bad records), a BPE tokenizer and a config
    with the raw dataset ``raw`` and its prepared twin ``prep``; returns the config."""
    data = root / "data"
    texts = make_documents(docs, seed=11, max_len=max_len)
    write_jsonl(data, texts[: docs // 2], files=2)
    (data / "bad.jsonl").write_bytes(BAD_LINES)
    good = "".join(json.dumps({"text": t}) + "\n" for t in texts[docs // 2 :]).encode()
    (data / "more.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(good))
    cut = zstandard.ZstdCompressor().compress(good[:5000])
    (data / "truncated.jsonl.zst").write_bytes(cut[: len(cut) // 2])
    train_bpe(root / "tokenizer.json")
    config = {"datasets": {
        "raw": {"source": {"type": "jsonl", "paths": [str(data / "*")], "shard_bytes": 16 << 10},
                "tokenizer": {"type": "hf", "path": str(root / "tokenizer.json")}},
        "prep": {"source": {"type": "tokens", "path": str(root / "prepared")}},
    }}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return config


def run_prepare(root: Path, out: Path, *extra: str, dataset: str = "raw") -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "server", "prepare", "--config", str(root / "config.yaml"), "--dataset", dataset,
            "--out", str(out), *extra]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=240)


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A corpus prepared in one uninterrupted run with two worker processes."""
    root = tmp_path_factory.mktemp("prepared")
    config = make_corpus(root)
    proc = run_prepare(root, root / "prepared", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "shards (done)" in proc.stderr and "MB/s of input" in proc.stderr and "M tokens/s" in proc.stderr
    return root, config


def test_manifest_and_shards_hold_the_raw_datasets_tokens(prepared):
    root, config = prepared
    manifest = json.loads((root / "prepared/manifest.json").read_text())
    parsed = parse_config(config)
    raw, prep = Dataset("raw", parsed.datasets["raw"]), Dataset("prep", parsed.datasets["prep"])
    assert prep.tokenizer is None  # nothing to tokenize with
    assert manifest["tokenizer"] == raw.info.to_json() and prep.info == raw.info
    assert manifest["tokenizer_file"] == "tokenizer.json" and (root / "prepared/tokenizer.json").exists()
    assert manifest["dtype"] == "<u2" and len(manifest["shards"]) == raw.num_shards == prep.num_shards > 4
    for i, entry in enumerate(manifest["shards"]):
        assert set(entry) >= {"file", "docs", "tokens", "checksum", "bad"}
        a, b = raw.tokenize_shard(i), prep.tokenize_shard(i)
        assert (a.tokens == b.tokens).all() and (a.offsets == b.offsets).all()
        assert (entry["docs"], entry["tokens"]) == (a.num_docs, a.num_tokens)
    assert raw.bad.snapshot() == prep.bad.snapshot() == manifest["totals"]["bad"] == {
        "not_a_string": 1, "invalid_json": 1, "invalid_utf8": 1, "tokenizer_error": 1, "broken_shard": 1}
    assert not (root / "prepared/plan.json").exists() and not (root / "prepared/progress.jsonl").exists()


@pytest.mark.integration
def test_prepared_dataset_is_served_like_the_raw_one_without_corpus_or_tokenizer(tmp_path, start_server):
    config = make_corpus(tmp_path, docs=120)
    assert run_prepare(tmp_path, tmp_path / "prepared", "--workers", "1").returncode == 0

    def batches(server, name: str) -> list[dict[str, torch.Tensor]]:
        ds = StreamingDataset(server.address, name, seq_len=96, batch_size=4, seed=7)
        return list(itertools.islice(iter(ds), 120))  # more than one epoch

    raw_server = start_server({"datasets": {"raw": config["datasets"]["raw"]}})
    expected = batches(raw_server, "raw")
    raw_server.stop()
    # Without the text and the tokenizer, only the prepared shards can produce the tokens.
    shutil.rmtree(tmp_path / "data")
    (tmp_path / "tokenizer.json").unlink()
    got = batches(start_server({"datasets": {"prep": config["datasets"]["prep"]}}), "prep")
    assert {int(b["input_ids"].max()) for b in expected} != {257}  # real BPE ids, not padding
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prepare_resumes_after_a_limit_with_identical_output(prepared, tmp_path):
    root, _ = prepared
    out = tmp_path / "out"
    first = run_prepare(root, out, "--max-shards", "3", "--workers", "1")
    assert first.returncode == 0 and "prepared 3 shard(s) of" in first.stderr
    assert not (out / "manifest.json").exists()
    with pytest.raises(ConfigError, match="has no manifest.json.*did not finish"):
        Dataset("p", parse_config({"datasets": {"p": {"source": {"type": "tokens", "path": str(out)}}}}).datasets["p"])
    assert run_prepare(root, out, "--max-shards", "2", "--workers", "2").returncode == 0
    last = run_prepare(root, out)
    assert last.returncode == 0 and "5 already done" in last.stderr
    assert files_of(out) == files_of(root / "prepared")
    again = run_prepare(root, out)
    assert again.returncode == 0 and "already a complete preparation" in again.stderr


@pytest.mark.slow
def test_prepare_resumes_after_being_killed(tmp_path):
    config = make_corpus(tmp_path, docs=1500, max_len=6000)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    whole = run_prepare(tmp_path, tmp_path / "whole", "--workers", "1")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "server", "prepare", "--config", str(tmp_path / "config.yaml"), "--dataset", "raw",
            "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "progress.jsonl"
    deadline = time.monotonic() + 120
    while not (progress.exists() and progress.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)  # polling a file another process writes: there is no event to await
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (out / "manifest.json").exists(), "prepare finished before it could be killed"
    rerun = run_prepare(tmp_path, out, "--workers", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert files_of(out) == files_of(tmp_path / "whole")


def test_prepare_refuses_mismatches(prepared, tmp_path):
    root, config = prepared
    out = tmp_path / "out"
    assert run_prepare(root, out, "--max-shards", "1").returncode == 0
    other = dict(config["datasets"]["raw"], tokenizer={"type": "byte"})
    (root / "other.yaml").write_text(yaml.safe_dump({"datasets": {"raw": other}}))
    args = [sys.executable, "-m", "server", "prepare", "--config", str(root / "other.yaml"), "--dataset", "raw",
            "--out", str(out)]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--out: " in proc.stderr and "another tokenizer" in proc.stderr
    nope = run_prepare(root, tmp_path / "x", dataset="web")
    assert nope.returncode == 2 and "--dataset: the config has no dataset 'web' (it has: prep, raw)" in nope.stderr
    tokens = run_prepare(root, tmp_path / "y", dataset="prep")
    assert tokens.returncode == 2 and "datasets.prep.source: already tokens" in tokens.stderr


def test_a_mixture_is_refused_naming_its_components(tmp_path):
    """A mixture has no source of its own: prepare and train-tokenizer refuse it with a config
    error naming its components (they crashed on the missing source before)."""
    (tmp_path / "a.txt").write_text("some text")
    config = parse_config({"datasets": {"a": {"source": {"type": "text", "paths": [str(tmp_path / "*.txt")]}},
                                        "mix": {"mixture": {"a": 1.0}}}})
    with pytest.raises(ConfigError, match=r"--dataset: 'mix' is a mixture; name one of its components instead \(a\)"):
        prepare(config, "mix", str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="'mix' is a mixture"):
        train_tokenizer(config, "mix", 300, str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="datasets.mix: a mixture, not a dataset with a source"):
        Dataset("mix", config.datasets["mix"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "tokenizer.json").exists()


def test_damaged_shard_is_data_loss_and_a_wrong_tokenizer_is_refused(prepared, tmp_path):
    root, config = prepared
    copy = tmp_path / "prepared"
    shutil.copytree(root / "prepared", copy)
    shard = copy / "shard-000001.tft"
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    source = {"type": "tokens", "path": str(copy)}
    ds = Dataset("p", parse_config({"datasets": {"p": {"source": source}}}).datasets["p"])
    counted = (ds.shard_docs[1], ds.shard_tokens[1])
    assert ds.tokenize_shard(0).num_docs > 0
    # The manifest's counts are already in the global order: a damaged shard is refused, never empty.
    with pytest.raises(DataLoss, match=r"shard 1 \(shard-000001\.tft\) is damaged: checksum mismatch"):
        ds.tokenize_shard(1)
    assert (ds.shard_docs[1], ds.shard_tokens[1]) == counted and "broken_shard" not in ds.bad.snapshot()
    same = {"source": source, "tokenizer": config["datasets"]["raw"]["tokenizer"]}
    assert Dataset("p", parse_config({"datasets": {"p": same}}).datasets["p"]).info == ds.info
    with pytest.raises(ConfigError, match=r"datasets\.p\.tokenizer: the prepared data .* was tokenized with hf:"):
        Dataset("p", parse_config({"datasets": {"p": {"source": source, "tokenizer": {"type": "byte"}}}}).datasets["p"])
    (copy / "shard-000002.tft").unlink()
    with pytest.raises(ConfigError, match=r"datasets\.p\.source\.path: shard file .*shard-000002\.tft is missing"):
        Dataset("p", parse_config({"datasets": {"p": {"source": source}}}).datasets["p"])


def test_an_io_error_stops_a_shard_and_is_never_recorded_as_empty(tmp_path):
    """A file that cannot be read for a while is an environment fault: prepare retries, then stops
    with an error (a rerun continues), and never writes the shard as 0 documents."""
    data = tmp_path / "data"
    write_jsonl(data, make_documents(20, seed=2), files=1)
    config = parse_config({"datasets": {"raw": {
        "source": {"type": "jsonl", "paths": [str(data / "*.jsonl")]},
        "retry": {"attempts": 2, "backoff_s": 0.01, "deadline_s": 1}}}})
    ds = Dataset("raw", config.datasets["raw"])
    out = tmp_path / "out"
    out.mkdir()
    (data / "part-000.jsonl").rename(data / "away")
    with pytest.raises(Unavailable, match=r"cannot read part-000\.jsonl: FileNotFoundError"):
        prepare_shard(ds, 0, str(out))
    assert list(out.iterdir()) == [] and ds.shard_docs == {}
    (data / "away").rename(data / "part-000.jsonl")
    assert prepare_shard(ds, 0, str(out))["docs"] == 20
