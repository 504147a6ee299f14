"""Pre-tokenized shards in tokenfeed's own format (written by ``data-server prepare``), served
without tokenizing.

A prepared directory holds ``manifest.json`` and one zstd-compressed file per shard. A shard file
decompresses to: magic ``TFTOK001``, then little-endian u64 ``num_docs``, u64 ``num_tokens``, u64
dtype itemsize; the documents' lengths (u32 each, EOS included); the tokens (u16 or u32).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

import numpy as np
import zstandard

from server.config import TokensSourceConfig
from server.errors import ConfigError
from server.stages.packing import TokenizedShard
from server.stages.sources.base import BadRecords, BrokenShard, FilePart, ShardSpec
from server.stages.storage import Storage, is_url, join
from server.stages.tokenizers import TokenizerInfo

MANIFEST = "manifest.json"
FORMAT = "tokenfeed-tokens"
VERSION = 1
_MAGIC = b"TFTOK001"
_HEADER = struct.Struct("<8sQQQ")


def checksum(data: bytes) -> str:
    """The checksum recorded for a shard file (of its compressed bytes)."""
    return "blake2b-128:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def encode_shard(shard: TokenizedShard, level: int = 3) -> bytes:
    """A shard file's bytes."""
    lengths = np.diff(shard.offsets).astype("<u4")
    tokens = shard.tokens.astype(shard.tokens.dtype.newbyteorder("<"), copy=False)
    header = _HEADER.pack(_MAGIC, shard.num_docs, shard.num_tokens, tokens.itemsize)
    return zstandard.ZstdCompressor(level=level).compress(b"".join([header, lengths.tobytes(), tokens.tobytes()]))


def decode_shard(data: bytes, dtype: np.dtype) -> TokenizedShard:
    """Parse a shard file's bytes; raises ``BrokenShard`` when they do not hold a valid shard."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as err:
        raise BrokenShard(f"cannot decompress: {err}") from err
    if len(raw) < _HEADER.size:
        raise BrokenShard("shorter than its header")
    magic, docs, tokens, itemsize = _HEADER.unpack_from(raw)
    want = _HEADER.size + 4 * docs + itemsize * tokens
    if magic != _MAGIC or itemsize not in (2, 4) or len(raw) != want:
        raise BrokenShard(f"not a tokenfeed token shard (magic {magic!r}, {len(raw)} bytes, expected {want})")
    lengths = np.frombuffer(raw, dtype="<u4", count=docs, offset=_HEADER.size)
    offsets = np.zeros(docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.frombuffer(raw, dtype=np.dtype(f"<u{itemsize}"), count=tokens, offset=_HEADER.size + 4 * docs)
    if offsets[-1] != tokens:
        raise BrokenShard(f"document lengths add up to {offsets[-1]} tokens, the shard holds {tokens}")
    return TokenizedShard(tokens=ids.astype(dtype, copy=False), offsets=offsets)


def read_manifest(path: str, field: str, storage: Storage | None = None) -> dict[str, Any]:
    """The manifest of a prepared directory (local or a URL); ``ConfigError`` naming ``field``
    when there is none."""
    storage = storage or Storage()
    manifest = join(path, MANIFEST)
    if not is_url(path) and not os.path.isdir(path):
        raise ConfigError(f"{field}: {path} is not a directory")
    try:
        present = storage.isfile(manifest)
    except Exception as err:  # noqa: BLE001 - an object store's client errors (denied, no bucket, ...)
        raise ConfigError(f"{field}: cannot read {manifest}: {type(err).__name__}: {err}") from None
    if not present:
        raise ConfigError(f"{field}: {path} has no {MANIFEST}: not made by `data-server prepare`, "
                          "or its preparation did not finish (run prepare again to complete it)")
    try:
        data = json.loads(storage.read(manifest))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{field}: cannot read {manifest}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{field}: {manifest} is not a tokenfeed token manifest")
    if data.get("version") != VERSION:
        raise ConfigError(f"{field}: {manifest} has version {data.get('version')}, this server reads {VERSION}")
    return data


class TokensSource:
    """The shards of a prepared directory, read as ``TokenizedShard`` directly."""

    def __init__(self, config: TokensSourceConfig, field: str) -> None:
        self.config = config
        self.storage = Storage(config.storage_options)
        self.path = config.path.rstrip("/") if is_url(config.path) else os.path.abspath(os.path.expanduser(config.path))
        manifest = read_manifest(self.path, f"{field}.path", self.storage)
        try:
            self.info = TokenizerInfo.from_json(manifest["tokenizer"])
            entries = manifest["shards"]
            self._shards = [ShardSpec(i, e["name"], (FilePart(join(self.path, e["file"])),), int(e["bytes"]))
                            for i, e in enumerate(entries)]
            self._meta = [(str(e["checksum"]), int(e["docs"]), int(e["tokens"]), dict(e.get("bad", {})))
                          for e in entries]
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{field}.path: {self.path}/{MANIFEST} is incomplete or damaged: {err!r}") from None
        present = set(self.storage.glob(join(self.path, "*"), []))  # one listing, not a request per shard
        for shard in self._shards:
            if shard.parts[0].path not in present:
                raise ConfigError(f"{field}.path: shard file {shard.parts[0].path} is missing")

    def shards(self) -> list[ShardSpec]:
        return list(self._shards)

    def files(self) -> list[str]:
        return [join(self.path, MANIFEST)] + [s.parts[0].path for s in self._shards]

    def content(self, index: int) -> list[Any]:
        """Shard ``index``'s content identity: the manifest's checksum and counts (the same in
        every copy of the directory, wherever it lies)."""
        digest, docs, tokens, _ = self._meta[index]
        return [digest, docs, tokens]

    def counts(self) -> list[tuple[int, int]]:
        """(documents, tokens) of every shard, from the manifest."""
        return [(docs, tokens) for _, docs, tokens, _ in self._meta]

    def read_shard(self, shard: ShardSpec, bad: BadRecords) -> list[str]:
        raise TypeError(f"{self.path} holds tokens, not text")

    def read_tokens(self, shard: ShardSpec, bad: BadRecords, dtype: np.dtype) -> TokenizedShard:
        """A shard's tokens and document offsets, checked against the manifest. The records that
        ``prepare`` skipped are counted again here, so a prepared dataset reports what the raw one did."""
        digest, docs, tokens, skipped = self._meta[shard.index]
        for reason, n in skipped.items():
            bad.add(reason, n, sample=f"{shard.name}: skipped by prepare")
        data = self.storage.read(shard.parts[0].path)
        if checksum(data) != digest:
            raise BrokenShard("checksum mismatch: the file is not what the manifest the server loaded at start "
                              "records (damaged, or rewritten by another prepare since)")
        result = decode_shard(data, dtype)
        if (result.num_docs, result.num_tokens) != (docs, tokens):
            raise BrokenShard(f"holds {result.num_docs} docs / {result.num_tokens} tokens, "
                              f"manifest says {docs} / {tokens}")
        return result
