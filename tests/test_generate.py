"""``trainer.generate``: greedy decoding is deterministic, sampling stays inside the top k."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import ModelConfig
from trainer.export import load_exported, write_export
from trainer.generate import decode, encode, generate, sample_next
from trainer.model import GPT

ROOT = Path(__file__).resolve().parents[1]
BYTES = {"vocab_size": 258, "eos_id": 256, "pad_id": 257, "tokenizer": "byte"}


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    """A small random model in the export format (context 16)."""
    cfg = ModelConfig(layers=1, width=32, heads=2, context=16)
    torch.manual_seed(0)
    return write_export(tmp_path / "final", GPT(cfg, 258).state_dict(), cfg, {**BYTES, "step": 1})


def test_byte_tokenization_matches_the_server() -> None:
    assert encode("hé") == [104, 195, 169]
    assert decode([104, 195, 169, 256, 257]) == "hé"


def test_greedy_is_argmax_and_sampling_respects_top_k() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        logits = torch.randn(258, generator=gen) * 3
        assert sample_next(logits, top_k=1, temperature=1.0, generator=gen) == int(logits.argmax())
        assert sample_next(logits, top_k=50, temperature=0.0, generator=gen) == int(logits.argmax())
        allowed = set(torch.topk(logits, 5).indices.tolist())
        assert sample_next(logits, top_k=5, temperature=2.0, generator=gen) in allowed
    # with every token allowed, sampling does leave the top 5 sometimes: the filter is what held it
    logits = torch.zeros(258)
    draws = {sample_next(logits, top_k=0, temperature=1.0, generator=gen) for _ in range(50)}
    assert len(draws) > 5


def test_generate_is_deterministic_and_truncates_the_prompt(exported: Path) -> None:
    model, config = load_exported(exported)
    long_prompt = encode("x" * 100)  # longer than the context of 16
    greedy = [generate(model, long_prompt, 20, top_k=1, eos_id=256) for _ in range(2)]
    assert greedy[0] == greedy[1] and 0 < len(greedy[0]) <= 20
    a = generate(model, encode("def "), 30, top_k=8, temperature=1.0, seed=1, eos_id=256)
    b = generate(model, encode("def "), 30, top_k=8, temperature=1.0, seed=1, eos_id=256)
    c = generate(model, encode("def "), 30, top_k=8, temperature=1.0, seed=2, eos_id=256)
    assert a == b and a != c


def test_cli_greedy_twice_prints_the_same_text(exported: Path) -> None:
    args = [sys.executable, "-m", "trainer.generate", "--model", str(exported), "--prompt", "def f(",
            "--greedy", "--max-new-tokens", "24"]
    runs = [subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("def f(")


def test_cli_refuses_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    torch.save({"weights": 1}, junk)
    r = subprocess.run([sys.executable, "-m", "trainer.generate", "--model", str(junk), "--prompt", "x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a tokenfeed model export" in r.stderr
