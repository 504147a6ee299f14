"""Tokenizers: text documents in, numpy token arrays out (the Dataset appends EOS to each).

``byte`` needs no files; ``hf`` reads a local ``tokenizer.json`` with the ``tokenizers`` package;
``transformers`` reads a local tokenizer directory (the package is imported only when used);
``sentencepiece`` reads a local SentencePiece model.
Special tokens (BOS/EOS/PAD) the vocabulary lacks become extra ids past it. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, Union

import numpy as np

from server.config import (ByteTokenizerConfig, HfTokenizerConfig, SentencePieceTokenizerConfig, TokenizerConfig,
                           TransformersTokenizerConfig)
from server.errors import ConfigError

if TYPE_CHECKING:
    import tokenizers

_SpecialConfig = Union[HfTokenizerConfig, TransformersTokenizerConfig, SentencePieceTokenizerConfig]

# Looked up, in order, when the config names no token and the tokenizer declares none.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


@dataclass(frozen=True)
class TokenizerInfo:
    """What a client needs to know about a tokenizer."""

    name: str
    vocab_size: int      # covers every id the tokenizer can produce, extra specials included
    eos_id: int
    pad_id: int
    bos_id: int | None   # the id that begins every document, or None when no BOS is added
    identity: str        # changes whenever the token ids it produces could change
    extra: tuple[str, ...] = ()  # specials defined past the tokenizer's own vocabulary ("eos", "pad", "bos")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (stored in prepared manifests)."""
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "bos_id": self.bos_id, "identity": self.identity, "extra": list(self.extra)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenizerInfo:
        return cls(name=str(data["name"]), vocab_size=int(data["vocab_size"]), eos_id=int(data["eos_id"]),
                   pad_id=int(data["pad_id"]), bos_id=None if data["bos_id"] is None else int(data["bos_id"]),
                   identity=str(data["identity"]), extra=tuple(data.get("extra", ())))


class Tokenizer(Protocol):
    """Encodes documents; ``encode_batch`` may run in several threads at once."""

    info: TokenizerInfo
    add_bos: bool
    files: tuple[str, ...]  # the local files it was built from (none for ``byte``)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids: np.ndarray | list[int]) -> str: ...


class ByteTokenizer:
    """Contract 1 of DESIGN.md: id = byte value 0-255, EOS = 256, PAD = 257, vocab 258."""

    info = TokenizerInfo(
        name="byte", vocab_size=258, eos_id=256, pad_id=257, bos_id=None,
        identity=hashlib.sha256(b"tokenfeed-byte-v1").hexdigest()[:16],
    )
    add_bos = False
    files: tuple[str, ...] = ()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (without EOS), as uint16 arrays."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of token ids; special tokens are dropped."""
        data = bytes(int(i) for i in ids if int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HfTokenizer:
    """A ``tokenizers.Tokenizer`` with resolved specials; ``encode_batch`` releases the GIL.

    Args:
        backend: the loaded tokenizer (its truncation and padding settings are switched off).
        config: special-token options; ``field`` is its config path, used in errors.
        name: shown to clients (``hf:tokenizer.json``); ``digest``: hash of the tokenizer's files.
        declared: special token names the tokenizer itself declares (transformers), tried first.
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: HfTokenizerConfig | TransformersTokenizerConfig,
                 field: str, name: str, digest: str, declared: dict[str, str | None] | None = None,
                 files: tuple[str, ...] = ()) -> None:
        backend.no_truncation()  # a tokenizer.json may carry truncation/padding settings: ids must
        backend.no_padding()     # not depend on them
        self._tok = backend
        self.add_bos = config.add_bos
        self.files: tuple[str, ...] = files
        base = backend.get_vocab_size(with_added_tokens=True)
        specials, extra = resolve_specials(backend.token_to_id, base, config, field, declared or {})
        self._base = base
        self._special_ids = {i for i in specials.values() if i is not None}
        self.info = make_info(name, digest, config.add_bos, base, specials, extra)
        self._bos = np.array([specials["bos"]] if config.add_bos else [], dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (BOS first when configured, no EOS), as uint32 arrays.
        ``encode_batch_fast`` (tokenizers >= 0.20) gives the same ids without computing offsets."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(texts, add_special_tokens=False)
        if self.add_bos:
            return [np.concatenate([self._bos, np.asarray(e.ids, dtype=np.uint32)]) for e in encodings]
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of token ids; special and extra ids are dropped."""
        keep = [int(i) for i in ids if int(i) < self._base and int(i) not in self._special_ids]
        return self._tok.decode(keep, skip_special_tokens=True)


def resolve_specials(token_to_id: Callable[[str], int | None], base: int, config: _SpecialConfig, field: str,
                     declared: dict[str, str | None]) -> tuple[dict[str, int | None], list[str]]:
    """The EOS/PAD/BOS ids of a tokenizer of ``base`` ids, and the kinds that became extra ids past it.

    Each is the configured token, else the one the tokenizer declares, else a common name, else a new id.
    """
    specials: dict[str, int | None] = {}
    extra: list[str] = []
    for kind, names in (("eos", EOS_NAMES), ("pad", PAD_NAMES), ("bos", BOS_NAMES)):
        if kind == "bos" and not config.add_bos:
            specials[kind] = None
            continue
        found = _special(token_to_id, kind, getattr(config, f"{kind}_token"), declared.get(kind), names, field)
        if kind == "pad" and found is not None and found == specials["eos"]:
            if config.pad_token is not None:
                raise ConfigError(f"{field}.pad_token: must differ from the EOS token (labels at PAD are ignored)")
            found = None  # PAD positions get no loss: PAD must not be the EOS id
        if found is None:
            found = base + len(extra)
            extra.append(kind)
        specials[kind] = found
    return specials, extra


def _special(token_to_id: Callable[[str], int | None], kind: str, configured: str | None, declared: str | None,
             names: tuple[str, ...], field: str) -> int | None:
    if configured is not None:
        found = token_to_id(configured)
        if found is None:
            raise ConfigError(f"{field}.{kind}_token: {configured!r} is not in the tokenizer's vocabulary")
        return found
    for name in ((declared,) if declared else ()) + names:
        found = token_to_id(name)
        if found is not None:
            return found
    return None


def make_info(name: str, digest: str, add_bos: bool, base: int, specials: dict[str, int | None],
              extra: list[str]) -> TokenizerInfo:
    """A file-based tokenizer's info; its identity covers the files (``digest``) and every option that changes ids."""
    options = {"add_bos": add_bos, "specials": specials, "base": base, "v": 1}
    identity = hashlib.sha256(f"{name}|{digest}|{json.dumps(options, sort_keys=True)}".encode()).hexdigest()
    eos_id, pad_id = specials["eos"], specials["pad"]
    assert eos_id is not None and pad_id is not None  # (found, or given an id past the vocabulary)
    return TokenizerInfo(name=name, vocab_size=base + len(extra), eos_id=eos_id, pad_id=pad_id,
                         bos_id=specials["bos"], identity=identity[:16], extra=tuple(extra))


class SentencePieceTokenizer:
    """A SentencePiece model with resolved specials (the model's own EOS/PAD/BOS pieces first)."""

    def __init__(self, path: str, config: SentencePieceTokenizerConfig, field: str) -> None:
        import sentencepiece

        self._sp = sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(path)
        except (OSError, RuntimeError) as err:
            raise ConfigError(f"{field}.path: {path} is not a valid SentencePiece model: {err}") from None
        self.add_bos = config.add_bos
        self.files: tuple[str, ...] = (path,)
        base = sp.GetPieceSize()
        unk = sp.unk_id()

        def token_to_id(piece: str) -> int | None:
            found = int(sp.PieceToId(piece))  # an unknown piece maps to the UNK id
            return None if found == unk and piece != sp.IdToPiece(unk) else found

        # A model trained with eos_id/pad_id/bos_id declares those pieces (-1: none).
        declared = {kind: sp.IdToPiece(i) if (i := getattr(sp, f"{kind}_id")()) >= 0 else None
                    for kind in ("eos", "pad", "bos")}
        specials, extra = resolve_specials(token_to_id, base, config, field, declared)
        self._base = base
        self._special_ids = {i for i in specials.values() if i is not None}
        self.info = make_info(f"sentencepiece:{os.path.basename(path)}", file_digest([path]), config.add_bos, base,
                              specials, extra)
        self._bos = [specials["bos"]] if config.add_bos else []

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (BOS first when configured, no EOS), as uint32 arrays."""
        return [np.asarray(self._bos + ids, dtype=np.uint32) for ids in self._sp.Encode(texts, out_type=int)]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of token ids; special and extra ids are dropped."""
        return str(self._sp.Decode([int(i) for i in ids if int(i) < self._base and int(i) not in self._special_ids]))


def file_digest(paths: list[str]) -> str:
    """SHA-256 of the names and contents of files (a tokenizer's identity starts from it)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _hf(config: HfTokenizerConfig, field: str) -> HfTokenizer:
    from tokenizers import Tokenizer as Backend

    path = os.path.expanduser(config.path)
    if not os.path.isfile(path):
        raise ConfigError(f"{field}.path: {path} is not a file (expected a tokenizer.json)")
    try:
        backend = Backend.from_file(path)
    except Exception as err:  # the Rust side raises plain Exception for a malformed file
        raise ConfigError(f"{field}.path: {path} is not a valid tokenizer.json: {err}") from None
    return HfTokenizer(backend, config, field, f"hf:{os.path.basename(path)}", file_digest([path]), files=(path,))


def _transformers(config: TransformersTokenizerConfig, field: str) -> HfTokenizer:
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{field}.type: 'transformers' needs the transformers package, which is not "
                          "installed: pip install transformers (or use type: hf with the tokenizer.json)") from None
    path = os.path.expanduser(config.path)
    if not os.path.isdir(path):
        raise ConfigError(f"{field}.path: {path} is not a directory (expected one written by save_pretrained)")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for a bad directory
        raise ConfigError(f"{field}.path: cannot load a tokenizer from {path}: {err}") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"{field}.path: {path} holds a slow (Python) tokenizer; only fast tokenizers "
                          "are supported (save one with a tokenizer.json)")
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    declared = {"eos": tok.eos_token, "pad": tok.pad_token, "bos": tok.bos_token}
    return HfTokenizer(tok.backend_tokenizer, config, field, f"transformers:{os.path.basename(os.path.abspath(path))}",
                       file_digest(files), declared, tuple(files))


def _sentencepiece(config: SentencePieceTokenizerConfig, field: str) -> SentencePieceTokenizer:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        raise ConfigError(f"{field}.type: 'sentencepiece' needs the sentencepiece package, which is not "
                          "installed: pip install sentencepiece (it is in tokenfeed[server])") from None
    path = os.path.expanduser(config.path)
    if not os.path.isfile(path):
        raise ConfigError(f"{field}.path: {path} is not a file (expected a SentencePiece .model)")
    return SentencePieceTokenizer(path, config, field)


def build_tokenizer(config: TokenizerConfig, field: str = "tokenizer") -> Tokenizer:
    """The tokenizer a dataset config names; ``field`` is its config path, used in errors."""
    if isinstance(config, ByteTokenizerConfig):
        return ByteTokenizer()
    if isinstance(config, HfTokenizerConfig):
        return _hf(config, field)
    if isinstance(config, TransformersTokenizerConfig):
        return _transformers(config, field)
    if isinstance(config, SentencePieceTokenizerConfig):
        return _sentencepiece(config, field)
    raise ValueError(f"{field}.type: unknown tokenizer type {config.type!r}")
