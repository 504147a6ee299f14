"""Tokenizers: byte, a local tokenizer.json (trained here), a transformers directory, specials,
identity, tokenizer errors counted, and ``data-server tokenizer train``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from server.config import HfTokenizerConfig, TransformersTokenizerConfig, parse_config
from server.stages.dataset import Dataset
from server.errors import ConfigError
from server.stages.tokenizers import ByteTokenizer, build_tokenizer
from tests.conftest import ROOT, make_documents, write_jsonl

TEXTS = ["hello world", "def f(x):\n    return x + 1\n", "épée 日本 tokens stream", "a"]


def train_bpe(path: Path, vocab_size: int = 400, specials: tuple[str, ...] = ("<|endoftext|>", "<|pad|>")) -> Path:
    """A small byte-level BPE tokenizer.json, trained here on generated text (nothing downloaded)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_documents(200, seed=3, max_len=400) + TEXTS, trainer=trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def hf(path: Path, **options) -> object:
    return build_tokenizer(HfTokenizerConfig(type="hf", path=str(path), **options), "datasets.d.tokenizer")


def test_byte_tokenizer_contract():
    tok = ByteTokenizer()
    assert (tok.info.vocab_size, tok.info.eos_id, tok.info.pad_id, tok.info.bos_id) == (258, 256, 257, None)
    ids = tok.encode_batch(["é!"])[0]
    assert ids.tolist() == list("é!".encode())
    assert tok.decode(ids.tolist() + [256, 257]) == "é!"


def test_hf_tokenizer_encodes_like_the_tokenizers_package_and_finds_its_specials(bpe_file):
    tok = hf(bpe_file)
    backend = Tokenizer.from_file(str(bpe_file))
    got = tok.encode_batch(TEXTS)
    assert [g.tolist() for g in got] == [e.ids for e in backend.encode_batch(TEXTS, add_special_tokens=False)]
    assert all(g.dtype == np.uint32 for g in got)
    assert [tok.decode(g) for g in got] == TEXTS
    info = tok.info
    assert info.eos_id == backend.token_to_id("<|endoftext|>") and info.pad_id == backend.token_to_id("<|pad|>")
    assert info.vocab_size == backend.get_vocab_size() and info.extra == () and info.bos_id is None
    assert info.name == "hf:tokenizer.json"


def test_missing_specials_become_extra_ids_past_the_vocabulary(tmp_path):
    path = train_bpe(tmp_path / "bare.json", specials=())
    base = Tokenizer.from_file(str(path)).get_vocab_size()
    tok = hf(path, add_bos=True)
    assert (tok.info.eos_id, tok.info.pad_id, tok.info.bos_id) == (base, base + 1, base + 2)
    assert tok.info.vocab_size == base + 3 and tok.info.extra == ("eos", "pad", "bos")
    ids = tok.encode_batch(["hello"])[0]
    assert ids[0] == base + 2 and ids[1:].max() < base
    assert tok.decode(ids) == "hello"


def test_named_specials_and_bos(bpe_file):
    tok = hf(bpe_file, add_bos=True, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>")
    eos = Tokenizer.from_file(str(bpe_file)).token_to_id("<|endoftext|>")
    assert tok.info.bos_id == eos and tok.encode_batch(["x"])[0][0] == eos
    with pytest.raises(ConfigError, match=r"datasets\.d\.tokenizer\.eos_token: '</s>' is not in"):
        hf(bpe_file, eos_token="</s>")
    with pytest.raises(ConfigError, match=r"datasets\.d\.tokenizer\.pad_token: must differ"):
        hf(bpe_file, pad_token="<|endoftext|>")


def test_settings_inside_tokenizer_json_do_not_change_ids(bpe_file, tmp_path):
    """A tokenizer.json may add specials, truncate and pad; our ids ignore all of that."""
    tok = Tokenizer.from_file(str(bpe_file))
    tok.post_processor = processors.TemplateProcessing(single="<|pad|> $A <|endoftext|>",
                                                       special_tokens=[("<|pad|>", 1), ("<|endoftext|>", 0)])
    tok.enable_truncation(4)
    tok.enable_padding(length=64)
    tok.save(str(tmp_path / "fancy.json"))
    fancy, plain = hf(tmp_path / "fancy.json"), hf(bpe_file)
    assert [a.tolist() for a in fancy.encode_batch(TEXTS)] == [a.tolist() for a in plain.encode_batch(TEXTS)]


def test_identity_changes_with_the_file_and_the_options(bpe_file, tmp_path):
    same = hf(bpe_file).info.identity
    assert hf(bpe_file).info.identity == same
    assert hf(bpe_file, add_bos=True).info.identity != same
    other = train_bpe(tmp_path / "other.json", vocab_size=380)
    assert hf(other).info.identity != same
    assert len({same, ByteTokenizer.info.identity}) == 2


def test_bad_tokenizer_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"datasets\.d\.tokenizer\.path: .*nope\.json is not a file"):
        hf(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{not a tokenizer")
    with pytest.raises(ConfigError, match=r"datasets\.d\.tokenizer\.path: .*not a valid tokenizer\.json"):
        hf(tmp_path / "broken.json")


def test_transformers_directory(bpe_file, tmp_path):
    import transformers  # a dev dependency: missing, the run fails (never a silent skip)

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(bpe_file)),
                                                eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(str(tmp_path / "tok"))
    tok = build_tokenizer(TransformersTokenizerConfig(type="transformers", path=str(tmp_path / "tok")),
                          "datasets.d.tokenizer")
    plain = hf(bpe_file)
    assert [a.tolist() for a in tok.encode_batch(TEXTS)] == [a.tolist() for a in plain.encode_batch(TEXTS)]
    assert (tok.info.eos_id, tok.info.pad_id, tok.info.vocab_size) == (plain.info.eos_id, plain.info.pad_id,
                                                                       plain.info.vocab_size)
    assert tok.info.name == "transformers:tok" and tok.info.identity != plain.info.identity
    with pytest.raises(ConfigError, match=r"datasets\.d\.tokenizer\.path: .*not a directory"):
        build_tokenizer(TransformersTokenizerConfig(type="transformers", path=str(bpe_file)), "datasets.d.tokenizer")


def test_transformers_missing_gives_an_install_hint(tmp_path):
    """Without the package (blocked in a fresh interpreter) the error says how to get it."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from server.config import TransformersTokenizerConfig\n"
            "from server.stages.tokenizers import build_tokenizer\n"
            f"build_tokenizer(TransformersTokenizerConfig(type='transformers', path={str(tmp_path)!r}), 'x.tokenizer')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "ConfigError: x.tokenizer.type: 'transformers' needs the transformers package" in proc.stderr
    assert "pip install transformers" in proc.stderr


def test_dataset_counts_tokenizer_errors_and_keeps_going(bpe_file, tmp_path):
    """A lone surrogate (valid JSON, not encodable text) makes the tokenizer raise: that document
    alone is skipped and counted."""
    lines = ['{"text": "first document"}', '{"text": "bad \\ud800 text"}', '{"text": "third one"}']
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("\n".join(lines) + "\n")
    for tokenizer in ({"type": "byte"}, {"type": "hf", "path": str(bpe_file)}):
        config = parse_config({"datasets": {"d": {"source": {"type": "jsonl", "paths": [str(tmp_path / "d/*.jsonl")]},
                                                  "tokenizer": tokenizer}}})
        ds = Dataset("d", config.datasets["d"])
        shard = ds.tokenize_shard(0)
        docs = [ds.tokenizer.decode(shard.tokens[a:b - 1]) for a, b in zip(shard.offsets[:-1], shard.offsets[1:])]
        assert docs == ["first document", "third one"]
        assert (shard.tokens[shard.offsets[1:] - 1] == ds.info.eos_id).all()
        assert ds.bad.snapshot() == {"tokenizer_error": 1}
        assert "document 1" in ds.bad.sample_snapshot()["tokenizer_error"]


def test_tokenizer_train_command(tmp_path):
    docs = make_documents(300, seed=5, max_len=2000)
    write_jsonl(tmp_path / "data", docs, files=2)
    config = {"datasets": {"web": {"source": {"type": "jsonl", "paths": [str(tmp_path / "data/*.jsonl")]},
                                   "tokenizer": {"type": "hf", "path": str(tmp_path / "out/tok.json")}}}}
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    args = [sys.executable, "-m", "server", "tokenizer", "train", "--config", str(tmp_path / "c.yaml"),
            "--dataset", "web", "--vocab-size", "320", "--out", str(tmp_path / "out/tok.json")]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "trained a byte-level BPE of 320 tokens on 300 documents" in proc.stderr
    # The config that names the new file now loads: EOS and PAD are the trained specials.
    ds = Dataset("web", parse_config(config).datasets["web"])
    assert (ds.info.vocab_size, ds.info.eos_id, ds.info.pad_id, ds.info.extra) == (320, 0, 1, ())
    shard = ds.tokenize_shard(0)
    assert shard.num_docs == len(ds.source.read_shard(ds.shards[0], ds.bad))
    assert shard.num_tokens < sum(len(d.encode()) for d in docs) / 2  # it learned merges
    bad = subprocess.run(args[:-4] + ["--vocab-size", "100", "--out", str(tmp_path / "x.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--vocab-size: must be at least 258" in bad.stderr
