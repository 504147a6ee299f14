"""The tokenizer travels with the model: a run on a BPE dataset fetches the tokenizer.json from the server
(Describe with tokenizer_files), keeps it in ``final/``, and ``trainer.generate`` encodes and decodes with it;
a SentencePiece export (with BOS) likewise; an export without its tokenizer file is refused by name."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import sentencepiece
import torch
from tokenizers import Tokenizer

from client import StreamingDataset
from tests.test_tokenizers import train_bpe
from tests.test_tracking import MLFLOW_ARGS, MlflowServer
from tests.test_trainer import ENV, ROOT, train
from trainer.config import ModelConfig
from trainer.export import load_exported, write_export
from trainer.generate import generate
from trainer.model import GPT

STDLIB_JSON = Path(sysconfig.get_paths()["stdlib"]) / "json"
PROMPT = "def decode(self, s):\n    "

pytestmark = pytest.mark.integration


def generate_cli(model: Path | str, *extra: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trainer.generate", "--model", str(model), *extra], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc


def greedy_ids(export: Path, prompt: list[int]) -> list[int]:
    model, config = load_exported(export)
    return generate(model, prompt, 12, top_k=1, eos_id=config["eos_id"])


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


@pytest.mark.slow  # (a run, and an mlflow server's start: about a minute on 2 busy cores)
def test_a_run_on_a_bpe_dataset_exports_and_samples_with_its_tokenizer(bpe: Path, start_server: Any,
                                                                       mlflow_booting: MlflowServer,
                                                                       tmp_path: Path) -> None:
    server = start_server({"datasets": {"py": {"source": {"type": "text", "paths": [str(STDLIB_JSON / "*.py")]},
                                               "tokenizer": {"type": "hf", "path": str(bpe)}}}})
    files = StreamingDataset(server.address, "py", seq_len=64, batch_size=4).tokenizer_files()
    assert files == {"tokenizer.json": bpe.read_bytes()}
    run_dir = tmp_path / "run"
    train(1, server.address, run_dir, "--max-steps", "3", "data.dataset=py", "eval.every=3", *MLFLOW_ARGS,
          f"tracking.uri={mlflow_booting.wait_ready().uri}")  # (a shared server; its start overlaps the above)
    final = run_dir / "final"
    config = json.loads((final / "config.json").read_text())
    assert (config["tokenizer"], config["tokenizer_file"], config["vocab_size"]) == ("hf:tokenizer.json",
                                                                                     "tokenizer.json", 400)
    assert (final / "tokenizer.json").read_bytes() == bpe.read_bytes()

    tok = Tokenizer.from_file(str(bpe))
    new = greedy_ids(final, tok.encode(PROMPT, add_special_tokens=False).ids)
    assert new and max(new) < 400
    out = generate_cli(final, "--prompt", PROMPT, "--greedy", "--max-new-tokens", "12").stdout
    assert out == PROMPT + tok.decode(new, skip_special_tokens=True) + "\n"
    # the tracker's model artifact is the same directory: fetched, it samples the same text
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    fetched = generate_cli(f"mlflow:runs:/{run_id}/model", "--tracking-uri", mlflow_booting.uri, "--cache-dir",
                           str(tmp_path / "cache"), "--prompt", PROMPT, "--greedy", "--max-new-tokens", "12")
    assert fetched.stdout == out


def test_sentencepiece_export_encodes_with_bos_and_decodes(tmp_path: Path) -> None:
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter((STDLIB_JSON / "decoder.py").read_text().splitlines()), model_writer=model_file,
        vocab_size=400, model_type="bpe", byte_fallback=True, pad_id=3, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model_file.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    cfg = ModelConfig(layers=1, width=32, heads=2, context=16)
    torch.manual_seed(0)
    meta = {"vocab_size": 400, "eos_id": 2, "pad_id": 3, "bos_id": 1, "tokenizer": "sentencepiece:py.model"}
    final = write_export(tmp_path / "final", GPT(cfg, 400).state_dict(), cfg, meta,
                         tmp_path / "tokenizer.model").parent
    assert (final / "tokenizer.model").read_bytes() == model_file.getvalue()
    new = greedy_ids(final, [1] + sp.Encode("x = 1", out_type=int))  # a document starts with BOS
    want = sp.Decode([i for i in new if i not in (1, 2, 3)])
    assert generate_cli(final, "--prompt", "x = 1", "--greedy", "--max-new-tokens", "12").stdout == \
        "x = 1" + want + "\n"


def test_an_export_without_its_tokenizer_is_refused(tmp_path: Path) -> None:
    cfg = ModelConfig(layers=1, width=32, heads=2, context=16)
    meta = {"vocab_size": 400, "eos_id": 0, "pad_id": 1, "tokenizer": "hf:tokenizer.json"}
    final = write_export(tmp_path / "final", GPT(cfg, 400).state_dict(), cfg, meta).parent
    err = generate_cli(final, ok=False).stderr
    assert "trained with tokenizer 'hf:tokenizer.json'" in err and "has no tokenizer.json" in err
