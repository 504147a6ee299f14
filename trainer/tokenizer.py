"""The tokenizer a model's data was made with: fetched from the data server at each launch, kept beside
the export (``final/tokenizer.json`` or ``final/tokenizer.model``), and used by ``trainer.generate``.

One file at the export's top level, not a directory: the tracker upload confirms each top-level file,
and one file is all decoding needs (a ``transformers`` directory's ``tokenizer.json`` holds the whole
fast tokenizer; BOS/EOS/PAD ids are in ``config.json``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

HF_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"
BYTE_VOCAB = 258  # ids 0-255 are bytes, 256 EOS, 257 PAD (DESIGN.md contract 1)


def kind_of(tokenizer: str) -> str:
    """``byte``, ``hf``, ``transformers`` or ``sentencepiece`` from a Describe ``tokenizer`` name."""
    return tokenizer.split(":", 1)[0]


def file_name(tokenizer: str) -> str | None:
    """The file a model keeps for ``tokenizer`` (a Describe name), or None for the byte tokenizer.

    Raises:
        ValueError: a tokenizer this trainer cannot keep (the message names it).
    """
    kind = kind_of(tokenizer)
    if kind == "byte":
        return None
    if kind in ("hf", "transformers"):
        return HF_FILE
    if kind == "sentencepiece":
        return SP_FILE
    raise ValueError(f"tokenizer {tokenizer!r}: unknown kind {kind!r}")


def _pick(tokenizer: str, files: dict[str, bytes]) -> bytes | None:
    """The one file decoding needs among those the server sent."""
    if kind_of(tokenizer) == "transformers":
        return files.get(HF_FILE)
    return next(iter(files.values())) if len(files) == 1 else None


def save_run_tokenizer(run_dir: Path, tokenizer: str, fetch: Callable[[], dict[str, bytes]]) -> Path | None:
    """Write the dataset's tokenizer file into ``run_dir`` (fetched anew at each launch: it is small, and
    always the one the server tokenizes with now); None for the byte tokenizer, or with a warning when
    the server has no file to send (a prepared directory in an object store)."""
    name = file_name(tokenizer)
    if name is None:
        return None
    data = _pick(tokenizer, fetch())
    if data is None:
        log.warning("the data server sent no file for tokenizer %r: the exported model will not carry its "
                    "tokenizer, and trainer.generate cannot sample from it", tokenizer)
        return None
    path = run_dir / name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


class Codec(Protocol):
    """Text to the ids a model was trained on, and back."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteCodec:
    """The byte tokenizer: a text's UTF-8 bytes."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Ids outside 0-255 (EOS, PAD) are dropped; broken UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class FileCodec:
    """A ``tokenizer.json`` (the ``tokenizers`` package) or a SentencePiece model, with the export's specials.

    Like the server: a document starts with BOS when the data had one; special ids and ids past the
    file's own vocabulary (specials the server added) are dropped when decoding.
    """

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        if path.name == SP_FILE:
            try:
                import sentencepiece
            except ImportError:
                raise ValueError("this model's tokenizer is a SentencePiece model: pip install sentencepiece") from None
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            self._encode: Callable[[str], list[int]] = lambda text: list(sp.Encode(text, out_type=int))
            self._decode: Callable[[list[int]], str] = lambda ids: str(sp.Decode(ids))
            self._base = int(sp.GetPieceSize())
        else:
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise ValueError("this model's tokenizer is a tokenizer.json: pip install tokenizers") from None
            tok = Tokenizer.from_file(str(path))
            self._encode = lambda text: list(tok.encode(text, add_special_tokens=False).ids)
            self._decode = lambda ids: str(tok.decode(ids, skip_special_tokens=True))
            self._base = int(tok.get_vocab_size(with_added_tokens=True))
        bos = config.get("bos_id")
        self._bos = [int(bos)] if bos is not None and int(bos) >= 0 else []
        self._special = {int(config["eos_id"]), int(config["pad_id"]), *self._bos}

    def encode(self, text: str) -> list[int]:
        return self._bos + self._encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._decode([i for i in ids if i < self._base and i not in self._special])


def load_codec(directory: Path, config: dict[str, Any]) -> Codec:
    """The codec of the export in ``directory`` whose ``config.json`` is ``config``.

    Raises:
        ValueError: the export lacks its tokenizer file (the message names what is missing).
    """
    tokenizer = str(config.get("tokenizer", "byte"))
    name = file_name(tokenizer)
    if name is None:
        if int(config["vocab_size"]) != BYTE_VOCAB:
            raise ValueError(f"byte tokenizer with vocabulary {config['vocab_size']} (expected {BYTE_VOCAB})")
        return ByteCodec()
    path = directory / name
    if not path.is_file():
        raise ValueError(f"the model was trained with tokenizer {tokenizer!r} but {directory} has no {name} "
                         "(exported by a trainer that did not keep it, or the data server sent none)")
    return FileCodec(path, config)
