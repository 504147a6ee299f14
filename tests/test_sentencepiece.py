"""The ``sentencepiece`` tokenizer: trained here by ``data-server tokenizer train --type sentencepiece`` on
Python standard library sources, served by a real server, the batches decoded back to the files' text;
its special ids (the model's own, configured, or extra) and its errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch

from client import StreamingDataset
from server.config import SentencePieceTokenizerConfig, parse_config
from server.errors import ConfigError
from server.prepare import prepare
from server.stages.tokenizers import build_tokenizer
from tests.conftest import ROOT

STDLIB_JSON = Path(sysconfig.get_paths()["stdlib"]) / "json"
FIELD = "datasets.py.tokenizer"


def corpus_config(model: Path) -> dict:
    """One dataset: the ``json`` package's sources, one document per file, tokenized by ``model``."""
    return {"datasets": {"py": {"source": {"type": "text", "paths": [str(STDLIB_JSON / "*.py")]},
                                "tokenizer": {"type": "sentencepiece", "path": str(model)}}}}


def train_command(tmp_path: Path, model: Path, vocab_size: int) -> subprocess.CompletedProcess:
    (tmp_path / "c.yaml").write_text(json.dumps(corpus_config(model)))
    args = [sys.executable, "-m", "server", "tokenizer", "train", "--type", "sentencepiece", "--config",
            str(tmp_path / "c.yaml"), "--dataset", "py", "--vocab-size", str(vocab_size), "--out", str(model)]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sp")
    proc = train_command(tmp, tmp / "out" / "py.model", 600)
    assert proc.returncode == 0, proc.stderr
    assert "trained a SentencePiece bpe of 600 pieces" in proc.stderr
    return tmp / "out" / "py.model"


def train_model(path: Path, **specials: int) -> Path:
    """A small model with the given special ids (e.g. ``pad_id=-1``: the model has no PAD)."""
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter((STDLIB_JSON / "decoder.py").read_text().splitlines()), model_writer=out,
        vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2, **specials)
    path.write_bytes(out.getvalue())
    return path


def sp_tokenizer(path: Path, **options: object):  # noqa: ANN201 -- the server's Tokenizer protocol
    return build_tokenizer(SentencePieceTokenizerConfig(type="sentencepiece", path=str(path), **options), FIELD)


def test_served_batches_decode_back_to_the_sources(model, start_server, tmp_path):
    docs = sorted(p.read_text() for p in STDLIB_JSON.glob("*.py"))
    config = corpus_config(model)
    prepare(parse_config(config), "py", str(tmp_path / "prep"), workers=1)  # keeps a copy of the model
    config["datasets"]["prep"] = {"source": {"type": "tokens", "path": str(tmp_path / "prep")}}
    server = start_server(config)
    ds = StreamingDataset(server.address, "py", seq_len=256, batch_size=8)
    prep = StreamingDataset(server.address, "prep", seq_len=256, batch_size=8)
    assert ds.tokenizer_files() == prep.tokenizer_files() == {"py.model": model.read_bytes()}  # for trainers
    first = [next(iter(StreamingDataset(server.address, name, seq_len=256, batch_size=8))) for name in ("py", "prep")]
    assert torch.equal(first[0]["input_ids"], first[1]["input_ids"])  # the prepared data serves the same rows
    info = ds.describe()
    assert (info.tokenizer, info.vocab_size, info.eos_id, info.pad_id) == ("sentencepiece:py.model", 600, 2, 3)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    tokens: list[np.ndarray] = []
    for batch in ds:  # concat packing: the rows tile the epoch's token stream, documents ended by EOS
        tokens.append(batch["input_ids"].numpy().reshape(-1))
        if int(sum((t == info.eos_id).sum() for t in tokens)) >= len(docs):
            break
    stream = np.concatenate(tokens)
    ends = np.flatnonzero(stream == info.eos_id)[:len(docs)]
    pieces = np.split(stream[:ends[-1]], ends[:-1] + 1)
    decoded = sorted(sp.Decode([int(i) for i in p if i != info.eos_id]) for p in pieces)
    assert decoded == docs  # lossless: indentation, newlines and non-ASCII text come back exactly
    assert len(stream) < sum(len(d.encode()) for d in docs) / 2  # it learned merges


def test_model_specials_are_used_else_extra_ids(tmp_path):
    declared = sp_tokenizer(train_model(tmp_path / "a.model", pad_id=3), add_bos=True)
    assert (declared.info.eos_id, declared.info.pad_id, declared.info.bos_id, declared.info.extra) == (2, 3, 1, ())
    assert declared.encode_batch(["x = 1"])[0][0] == 1  # BOS first
    no_pad = sp_tokenizer(train_model(tmp_path / "b.model"))  # sentencepiece's default: no PAD piece
    info = no_pad.info
    assert (info.vocab_size, info.eos_id, info.pad_id, info.extra) == (401, 2, 400, ("pad",))
    ids = no_pad.encode_batch(["def f(x):\n    return x"])[0]
    assert no_pad.decode(ids.tolist() + [2, 400]) == "def f(x): return x"  # (this model normalizes whitespace)
    assert declared.info.identity != sp_tokenizer(tmp_path / "a.model").info.identity  # add_bos changes ids


def test_errors_name_the_field(tmp_path, model):
    with pytest.raises(ConfigError, match=f"{FIELD}.eos_token: '<nope>' is not in the tokenizer's vocabulary"):
        sp_tokenizer(model, eos_token="<nope>")
    with pytest.raises(ConfigError, match=f"{FIELD}.pad_token: must differ from the EOS token"):
        sp_tokenizer(model, pad_token="</s>")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=f"{FIELD}.path: .*bad.model is not a valid SentencePiece model"):
        sp_tokenizer(tmp_path / "bad.model")
    with pytest.raises(ConfigError, match=f"{FIELD}.path: .*missing.model is not a file"):
        sp_tokenizer(tmp_path / "missing.model")
    too_small = train_command(tmp_path, tmp_path / "x.model", 200)
    assert too_small.returncode == 2 and "--vocab-size: must be more than 261" in too_small.stderr
    too_big = train_command(tmp_path, tmp_path / "x.model", 50000)
    assert too_big.returncode == 2 and "--vocab-size: SentencePiece cannot train 50000 pieces" in too_big.stderr
