"""A served dataset: its source, tokenizer, shards and content fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np

from server.config import DatasetConfig
from server.packing import TokenizedShard, tokenized_shard
from server.sources import BadRecords, ShardSpec, build_source
from server.tokenizers import build_tokenizer
from tokenfeed import wire

log = logging.getLogger(__name__)


class Dataset:
    """Everything the server knows about one dataset; ``tokenize_shard`` is pure, blocking work."""

    def __init__(self, name: str, config: DatasetConfig) -> None:
        field = f"datasets.{name}"
        self.name = name
        self.config = config
        self.source = build_source(config.source, f"{field}.source")
        self.tokenizer = build_tokenizer(config.tokenizer)
        self.info = self.tokenizer.info
        self.shards: list[ShardSpec] = self.source.shards()
        self.wire_dtype = wire.wire_dtype(self.info.vocab_size)
        self.dtype = wire.numpy_dtype(self.wire_dtype)
        self.bad = BadRecords()
        self.shard_docs: dict[int, int] = {}
        self.shard_tokens: dict[int, int] = {}
        self.fingerprint = self._fingerprint()

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def _fingerprint(self) -> str:
        """Changes whenever the tokens this dataset serves could change."""
        h = hashlib.sha256()
        h.update(self.config.model_dump_json().encode())
        h.update(self.info.identity.encode())
        for shard in self.shards:
            for part in shard.parts:
                st = os.stat(part.path)
                h.update(json.dumps([part.path, part.start, part.end, st.st_size, st.st_mtime_ns]).encode())
        return h.hexdigest()[:16]

    def tokenize_shard(self, index: int) -> TokenizedShard:
        """Read and tokenize one shard (blocking; call it off the event loop)."""
        t0 = time.perf_counter()
        shard = self.shards[index]
        try:
            docs = self.source.read_shard(shard, self.bad)
        except (OSError, EOFError, ValueError) as err:
            # A whole unreadable shard is skipped, deterministically: it yields no rows.
            self.bad.add("broken_shard")
            log.warning("skipping unreadable shard %s of %s: %s", shard.name, self.name, err)
            docs = []
        tokens = self.tokenizer.encode_batch(docs)
        kept = [t for t in tokens if t.size]
        if len(kept) < len(tokens):
            self.bad.add("empty_document", len(tokens) - len(kept))
        result = tokenized_shard(kept, self.info.eos_id, self.dtype) if kept else empty_tokenized(self.dtype)
        self.shard_docs[index] = result.num_docs
        self.shard_tokens[index] = result.num_tokens
        log.debug("tokenized %s: %d docs, %d tokens in %.3fs", shard.name, result.num_docs,
                  result.num_tokens, time.perf_counter() - t0)
        return result

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
