"""Tokenizers: text documents in, numpy token arrays out (each document ended by EOS)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from server.config import ByteTokenizerConfig


@dataclass(frozen=True)
class TokenizerInfo:
    """What a client needs to know about a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    identity: str  # changes whenever the token ids it produces could change


class ByteTokenizer:
    """Contract 1 of DESIGN.md: id = byte value 0-255, EOS = 256, PAD = 257, vocab 258."""

    info = TokenizerInfo(
        name="byte", vocab_size=258, eos_id=256, pad_id=257, bos_id=None,
        identity=hashlib.sha256(b"tokenfeed-byte-v1").hexdigest()[:16],
    )

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (without EOS), as uint16 arrays."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of token ids; special tokens are dropped."""
        data = bytes(int(i) for i in ids if int(i) < 256)
        return data.decode("utf-8", errors="replace")


Tokenizer = ByteTokenizer


def build_tokenizer(config: ByteTokenizerConfig) -> Tokenizer:
    """The tokenizer a dataset config names."""
    if config.type == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer type {config.type!r}")
