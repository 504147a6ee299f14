"""A served dataset: its source, tokenizer, shards and content fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np

from server import metrics
from server.config import DatasetConfig
from server.errors import ConfigError
from server.packing import TokenizedShard, tokenized_shard
from server.sources import BadRecords, BrokenShard, ShardSpec, TokensSource, build_source
from server.tokenizers import Tokenizer, build_tokenizer
from tokenfeed import wire

log = logging.getLogger(__name__)

# What reading a whole unreadable shard raises; the shard is then skipped (counted "broken_shard").
BROKEN = (BrokenShard, OSError, EOFError, ValueError)


class Dataset:
    """Everything the server knows about one dataset; ``tokenize_shard`` is pure, blocking work."""

    def __init__(self, name: str, config: DatasetConfig) -> None:
        field = f"datasets.{name}"
        self.name = name
        self.config = config
        self.source = build_source(config.source, f"{field}.source")
        # A prepared (tokens) source carries its tokenizer: serving it tokenizes nothing.
        self.tokenizer: Tokenizer | None = None
        if isinstance(self.source, TokensSource):
            self.info = self.source.info
            if "tokenizer" in config.model_fields_set:
                self._check_prepared_tokenizer(field)
        else:
            self.tokenizer = build_tokenizer(config.tokenizer, f"{field}.tokenizer")
            self.info = self.tokenizer.info
        self.shards: list[ShardSpec] = self.source.shards()
        self.wire_dtype = wire.wire_dtype(self.info.vocab_size)
        self.dtype = wire.numpy_dtype(self.wire_dtype)
        self.bad = BadRecords()
        self.shard_docs: dict[int, int] = {}
        self.shard_tokens: dict[int, int] = {}
        self.counts_version = 0  # bumped whenever a shard's counts are learned or change
        if isinstance(self.source, TokensSource):  # row counts known up front: seeks read nothing
            for i, (docs, tokens) in enumerate(self.source.counts()):
                self.shard_docs[i], self.shard_tokens[i] = docs, tokens
        self.fingerprint = self._fingerprint()

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def _check_prepared_tokenizer(self, field: str) -> None:
        """A tokenizer named next to a tokens source must be the one the data was prepared with."""
        configured = build_tokenizer(self.config.tokenizer, f"{field}.tokenizer").info
        if configured.identity != self.info.identity:
            raise ConfigError(
                f"{field}.tokenizer: the prepared data at {self.source.path} was tokenized with "
                f"{self.info.name} (identity {self.info.identity}), not {configured.name} (identity "
                f"{configured.identity}); remove the tokenizer entry or prepare the data again")

    def _fingerprint(self) -> str:
        """Changes whenever the tokens this dataset serves could change: the config, the
        tokenizer, the shard list, and the size and mtime of every input file."""
        h = hashlib.sha256()
        h.update(self.config.model_dump_json().encode())
        h.update(self.info.identity.encode())
        for shard in self.shards:
            h.update(json.dumps([shard.name, [[p.path, p.start, p.end] for p in shard.parts]]).encode())
        for path in self.source.files():
            st = os.stat(path)
            h.update(json.dumps([path, st.st_size, st.st_mtime_ns]).encode())
        return h.hexdigest()[:16]

    def tokenize_shard(self, index: int) -> TokenizedShard:
        """Read and tokenize one shard (blocking; call it off the event loop). Bad records are
        skipped and counted; a whole unreadable shard yields no documents."""
        t0 = time.perf_counter()
        shard = self.shards[index]
        bad = BadRecords()
        try:
            if self.tokenizer is None:
                result = self.source.read_tokens(shard, bad, self.dtype)
            else:
                result = self._tokenize(shard, self.source.read_shard(shard, bad), bad)
        except BROKEN as err:
            # Deterministic: the shard yields no rows in every epoch, on every replica.
            bad.add("broken_shard", sample=f"{shard.name}: {type(err).__name__}: {err}")
            metrics.count_broken_shard(self.name, self.config.source.type, err)
            result = empty_tokenized(self.dtype)
        self.bad.merge(bad)
        counts = bad.snapshot()
        if counts:
            reason = next(iter(counts))
            log.warning("%s: skipped %s in %s; e.g. %s: %s", self.name, counts, shard.name, reason,
                        bad.sample_snapshot().get(reason, "?"))
        metrics.observe_shard(self.name, self.config.source.type, self.info.name if self.tokenizer else None,
                              shard.bytes, result.num_docs, result.num_tokens, time.perf_counter() - t0)
        if (self.shard_docs.get(index), self.shard_tokens.get(index)) != (result.num_docs, result.num_tokens):
            self.shard_docs[index] = result.num_docs
            self.shard_tokens[index] = result.num_tokens
            self.counts_version += 1
        log.debug("tokenized %s: %d docs, %d tokens in %.3fs", shard.name, result.num_docs,
                  result.num_tokens, time.perf_counter() - t0)
        return result

    def _tokenize(self, shard: ShardSpec, docs: list[str], bad: BadRecords) -> TokenizedShard:
        assert self.tokenizer is not None
        try:
            tokens = self.tokenizer.encode_batch(docs)
        except Exception:  # noqa: BLE001 - one bad document must not sink the shard: retry one by one
            tokens = []
            for i, doc in enumerate(docs):
                try:
                    tokens.extend(self.tokenizer.encode_batch([doc]))
                except Exception as err:  # noqa: BLE001
                    bad.add("tokenizer_error", sample=f"{shard.name} document {i}: {type(err).__name__}: {err}")
        floor = 1 if self.tokenizer.add_bos else 0
        kept = [t for t in tokens if t.size > floor]
        if len(kept) < len(tokens):
            bad.add("empty_document", len(tokens) - len(kept), sample=f"{shard.name}: a document has no tokens")
        return tokenized_shard(kept, self.info.eos_id, self.dtype) if kept else empty_tokenized(self.dtype)

    def describe(self) -> dict:
        """A plain summary (also the source of the Describe RPC)."""
        known = len(self.shard_tokens) == self.num_shards
        return {
            "name": self.name,
            "tokenizer": self.info.name,
            "vocab_size": self.info.vocab_size,
            "eos_id": self.info.eos_id,
            "pad_id": self.info.pad_id,
            "bos_id": -1 if self.info.bos_id is None else self.info.bos_id,
            "fingerprint": self.fingerprint,
            "num_shards": self.num_shards,
            "documents": sum(self.shard_docs.values()) if known else -1,
            "tokens": sum(self.shard_tokens.values()) if known else -1,
            "shards": [
                {"name": s.name, "bytes": s.bytes, "documents": self.shard_docs.get(s.index, -1),
                 "tokens": self.shard_tokens.get(s.index, -1)}
                for s in self.shards
            ],
            "bad_records": self.bad.snapshot(),
            "dtype": self.wire_dtype,
        }


def empty_tokenized(dtype: np.dtype) -> TokenizedShard:
    return TokenizedShard(tokens=np.empty(0, dtype=dtype), offsets=np.zeros(1, dtype=np.int64))
