"""A served dataset: its source, tokenizer, shards and content identity, and the one rule for
reading a shard: a content fault (a record or a file that does not decode, a checksum that fails)
is decided from the bytes alone, the same on every replica and restart; an environment fault (an
I/O error, a timeout) is retried and then surfaces as ``Unavailable``, never cached as a broken or
empty shard; a file that changed since start-up is refused, never served as a mix of versions."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import time
from json.encoder import encode_basestring_ascii as _encode_str
from typing import Any

import numpy as np

from server import metrics
from server.config import DatasetConfig, SourceConfig
from server.errors import ConfigError, DataLoss, FailedPrecondition, Unavailable
from server.stages.files import (FileChanged, OutsideDataRoots, common_root, is_url, listing_stats, relative,
                                 relative_all)
from server.stages.identity import (DigestCache, FileIdentity, FileStat, check_unchanged, default_cache_dir,
                                    identify_all, remembering)
from server.stages.packing import TokenizedShard, tokenized_shard
from server.stages.sources import BadRecords, BrokenShard, ShardSpec, TokensSource, build_source
from server.stages.storage import ObjectStat, Storage
from server.stages.tokenizers import Tokenizer, build_tokenizer
from tokenfeed.constants import token_dtype

log = logging.getLogger(__name__)

#: Source settings that say where files are, not what they hold: copies of a corpus at other
#: paths are the same dataset (their files' content identities pin what is read).
LOCATION_FIELDS = {"paths", "exclude", "path", "data_files", "cache_dir", "storage_options"}
_IDENTITY_VERSION = "tokenfeed-dataset-v2"


class Dataset:
    """Everything the server knows about one dataset; ``tokenize_shard`` is pure, blocking work."""

    def __init__(self, name: str, config: DatasetConfig, *, digest_cache_dir: str | None = None) -> None:
        field = f"datasets.{name}"
        self.name = name
        self.config = config
        if config.source is None:
            raise ConfigError(f"{field}: a mixture, not a dataset with a source of its own")
        self.source_config: SourceConfig = config.source
        digests = DigestCache(digest_cache_dir if digest_cache_dir is not None else default_cache_dir())
        self._rel: dict[str, str] = {}  # each local file's path relative to the root (``relpath``)
        with listing_stats():  # each local file stat'ed once, by the listing
            self._build(field, digests)
        self.fingerprint = self._fingerprint()

    def _build(self, field: str, digests: DigestCache) -> None:
        """Source, tokenizer, shards and the files' identities (start-up work)."""
        config = self.config
        with remembering(digests):  # the formats sources sniff: a restart opens no file for them
            self.source = build_source(self.source_config, f"{field}.source")
        # A prepared (tokens) source carries its tokenizer: serving it tokenizes nothing.
        self.tokenizer: Tokenizer | None = None
        if isinstance(self.source, TokensSource):
            self.info = self.source.info
            if "tokenizer" in config.model_fields_set:
                self._check_prepared_tokenizer(self.source, field)
        else:
            self.tokenizer = build_tokenizer(config.tokenizer, f"{field}.tokenizer")
            self.info = self.tokenizer.info
        self.shards: list[ShardSpec] = self.source.shards()
        self.dtype = token_dtype(self.info.vocab_size)
        self.bad = BadRecords()
        self.shard_docs: dict[int, int] = {}
        self.shard_tokens: dict[int, int] = {}
        self.counts_version = 0  # bumped whenever a shard's counts are learned
        if isinstance(self.source, TokensSource):  # row counts known up front: seeks read nothing
            for i, (docs, tokens) in enumerate(self.source.counts()):
                self.shard_docs[i], self.shard_tokens[i] = docs, tokens
        # Prepared shards are identified by the manifest's checksums (verified as each is read);
        # other files by their size and a digest of their bytes, taken now.
        files = [] if isinstance(self.source, TokensSource) else self.source.files()
        self.root = self.source.path if isinstance(self.source, TokensSource) else common_root(files)
        self.storage: Storage = self.source.storage
        local = [p for p in files if not is_url(p)]
        remote = [p for p in files if is_url(p)] if len(local) < len(files) else []
        try:
            self._files: dict[str, FileIdentity] = identify_all(local, cache=digests)
        except FileChanged:
            raise  # outside server.data_roots: a ConfigError of its own
        except OSError as err:
            raise ConfigError(f"{field}.source: cannot read {err.filename or 'a file'} to identify its content: "
                              f"{err.strerror or err}") from None
        # Objects in a store: their size and version (ETag, generation) from the start-up listing.
        for path in remote:
            seen = self.storage.listed(path)
            self._files[path] = FileIdentity(seen.size, seen.version, FileStat(seen.size, 0, 0))
        self._rel = relative_all(local, self.root)

    #: A dataset is no mixture: no components (``Served``), and it reads only its own shards.
    components: tuple[()] = ()

    @property
    def parts(self) -> tuple[Dataset]:
        return (self,)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def _check_prepared_tokenizer(self, source: TokensSource, field: str) -> None:
        """A tokenizer named next to a tokens source must be the one the data was prepared with."""
        configured = build_tokenizer(self.config.tokenizer, f"{field}.tokenizer").info
        if configured.identity != self.info.identity:
            raise ConfigError(
                f"{field}.tokenizer: the prepared data at {source.path} was tokenized with "
                f"{self.info.name} (identity {self.info.identity}), not {configured.name} (identity "
                f"{configured.identity}); remove the tokenizer entry or prepare the data again")

    def relpath(self, path: str) -> str:
        """``path`` relative to the dataset's root (what identities and messages name)."""
        rel = self._rel.get(path)
        if rel is not None:
            return rel
        if is_url(path):
            return relative(path, self.root)
        return relative(path, self.root) if self.root and os.path.isabs(path) else path

    def shard_label(self, shard: ShardSpec) -> str:
        """A shard's name for clients (Describe, error messages): relative to the dataset's root,
        never an absolute server path (a prepared shard: its file in the prepared directory)."""
        if isinstance(self.source, TokensSource):
            return self.relpath(shard.parts[0].path)
        sep = "/" if is_url(self.root) else os.sep
        inside = self.root and shard.name.startswith(self.root.rstrip(sep) + sep)
        return self.relpath(shard.name) if inside else os.path.basename(shard.name.split(":", 1)[-1])

    @functools.cached_property
    def _all_files(self) -> str:
        """A digest of every file's relative path, size and digest: the content of a shard whose
        parts are not files of their own (computed when first needed: none is for plain files)."""
        return hashlib.sha256(json.dumps(
            sorted([self.relpath(p), *i.content()] for p, i in self._files.items())).encode()).hexdigest()

    def shard_content(self, index: int) -> list[Any]:
        """What shard ``index`` holds, as JSON-able values that depend on content only: its
        files' relative paths, ranges, sizes and digests (or, prepared, the manifest's checksum)."""
        if isinstance(self.source, TokensSource):
            return self.source.content(index)
        out: list[Any] = []
        for part in self.shards[index].parts:
            ident = self._files.get(part.path)
            content = ident.content() if ident is not None else ["all files", self._all_files]
            out.append([self.relpath(part.path), part.start, part.end, *content])
        return out

    def document_settings(self) -> str:
        """The source settings that shape documents (not where the files are), as JSON."""
        return self.source_config.model_dump_json(exclude=LOCATION_FIELDS)

    def _fingerprint(self) -> str:
        """Changes whenever the tokens this dataset serves, or their order, could change: the
        document settings, the tokenizer, and every shard's content. Not paths, mtimes or inodes:
        replicas with their own copies agree (contract 7)."""
        h = hashlib.sha256(_IDENTITY_VERSION.encode())
        h.update(self.document_settings().encode())
        h.update(self.info.identity.encode())
        lines: list[str] = []
        files, rel = self._files, self._rel
        plain = not isinstance(self.source, TokensSource)
        for shard in self.shards:
            if len(lines) >= 4096:  # hashed in pieces: the same digest as one update a shard
                h.update("".join(lines).encode())
                lines.clear()
            parts = shard.parts
            if plain and len(parts) == 1:  # one local file or a range of it: written here, as dumps_flat would
                path, start, end = parts[0]
                ident, name = files.get(path), rel.get(path)
                if ident is not None and name is not None and type(start) is int and type(end) is int:
                    lines.append(f"[[{_encode_str(name)}, {start}, {end}, {ident.size}, {_encode_str(ident.digest)}]]")
                    continue
            lines.append(dumps_flat(self.shard_content(shard.index)))
        h.update("".join(lines).encode())
        return h.hexdigest()[:16]

    def _shard_files(self, shard: ShardSpec) -> list[str]:
        """The files whose content a shard's tokens come from."""
        paths = [p.path for p in shard.parts if p.path in self._files]
        return paths if len(paths) == len(shard.parts) else list(self._files)

    def _check_files(self, shard: ShardSpec) -> None:
        """Raise ``FileChanged`` if a file of ``shard`` no longer holds what start-up saw."""
        for path in self._shard_files(shard):
            ident = self._files[path]
            if is_url(path):  # one metadata request: size and version as at start-up
                self.storage.check_unchanged(path, ObjectStat(ident.size, ident.digest))
            else:
                self._files[path] = check_unchanged(path, ident)

    def tokenize_shard(self, index: int) -> TokenizedShard:
        """Read and tokenize one shard (blocking; call it off the event loop). Bad records are
        skipped and counted; a raw shard whose content does not decode yields no documents, on
        every replica alike. Raises ``DataLoss`` for a damaged prepared shard (its rows are
        already counted in the global order), ``FailedPrecondition`` for a file changed since
        start-up, ``Unavailable`` when an environment fault outlasts its retries."""
        t0 = time.perf_counter()
        shard = self.shards[index]
        try:
            result, bad = self._read_retrying(shard)
        except BrokenShard as err:
            if isinstance(self.source, TokensSource):
                raise DataLoss(f"dataset {self.name!r}: shard {index} ({self.shard_label(shard)}) is damaged: {err}; "
                               "restore the file, or run `data-server prepare` into a new directory and serve "
                               "that (cursors of this preparation stay valid only with its intact copy)") from None
            # A content fault, decided from the bytes alone: the shard yields no rows in every
            # epoch, on every replica.
            bad = BadRecords()
            bad.add("broken_shard", sample=f"{self.shard_label(shard)}: {err}")
            metrics.count_broken_shard(self.name, self.source_config.type, err)
            result = empty_tokenized(self.dtype)
        self.bad.merge(bad)
        counts = bad.snapshot()
        if counts:
            reason = next(iter(counts))
            log.warning("%s: skipped %s in %s; e.g. %s: %s", self.name, counts, shard.name, reason,
                        bad.sample_snapshot().get(reason, "?"))
        metrics.observe_shard(self.name, self.source_config.type, self.info.name if self.tokenizer else None,
                              shard.bytes, result.num_docs, result.num_tokens, time.perf_counter() - t0)
        known = (self.shard_docs.get(index), self.shard_tokens.get(index))
        if known != (result.num_docs, result.num_tokens):
            # Learned once (raw sources): content identity guarantees that a count never changes.
            assert known == (None, None), (self.name, index, known, result.num_docs, result.num_tokens)
            self.shard_docs[index] = result.num_docs
            self.shard_tokens[index] = result.num_tokens
            self.counts_version += 1
        log.debug("tokenized %s: %d docs, %d tokens in %.3fs", shard.name, result.num_docs,
                  result.num_tokens, time.perf_counter() - t0)
        return result

    def _read_retrying(self, shard: ShardSpec) -> tuple[TokenizedShard, BadRecords]:
        """Read a shard, retrying environment faults (``OSError``: EMFILE, EIO, a timeout, a file
        renamed away for a moment) with jittered exponential backoff within the dataset's
        ``retry`` settings. The files are checked against start-up before and after reading."""
        retry = self.config.retry
        deadline = time.monotonic() + retry.deadline_s
        for attempt in range(1, retry.attempts + 1):
            bad = BadRecords()  # a failed attempt's records are not counted twice
            try:
                self._check_files(shard)
                result = self._read(shard, bad)
                self._check_files(shard)
                return result, bad
            except OutsideDataRoots as err:  # a symlink swapped in since start-up: refused, never retried
                raise FailedPrecondition(f"dataset {self.name!r}: {self.relpath(err.path)} resolves outside "
                                         "server.data_roots; restore the file inside the roots") from None
            except FileChanged as err:
                raise FailedPrecondition(
                    f"dataset {self.name!r}: {self.relpath(err.path)} {str(err)[len(err.path) + 1:]} since the "
                    "server started; restore it, or restart the server to serve the new content (cursors of "
                    "the old content are then refused)") from None
            except OSError as err:
                delay = min(retry.max_backoff_s, retry.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                what = f"{self.shard_label(shard)}: {type(err).__name__}: {err}"
                if attempt == retry.attempts or time.monotonic() + delay > deadline:
                    metrics.count_source_unavailable(self.name, self.source_config.type)
                    log.error("%s: reading %s failed %d time(s); giving up (UNAVAILABLE)", self.name, what, attempt)
                    raise Unavailable(f"dataset {self.name!r}: cannot read {what} (after {attempt} attempt(s) in "
                                      f"{retry.deadline_s:g} s); reconnect from the cursor") from None
                metrics.count_source_retry(self.name, self.source_config.type, err)
                log.warning("%s: reading %s failed; retry %d of %d in %.2f s", self.name, what, attempt,
                            retry.attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _read(self, shard: ShardSpec, bad: BadRecords) -> TokenizedShard:
        if isinstance(self.source, TokensSource):  # (exactly the datasets without a tokenizer)
            return self.source.read_tokens(shard, bad, self.dtype)
        return self._tokenize(shard, self.source.read_shard(shard, bad), bad)

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

    def sources(self) -> list[dict[str, Any]]:
        """Itself as the one source of its rows (``Served.sources``)."""
        return [{"name": self.name, "weight": 1.0, "tokens": self.total_tokens(), "rows_served": 0}]

    def total_tokens(self) -> int:
        """Tokens of every shard, or -1 while a shard's count is not known yet."""
        return sum(self.shard_tokens.values()) if len(self.shard_tokens) == self.num_shards else -1

    def describe(self) -> dict[str, Any]:
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
                {"name": self.shard_label(s), "bytes": s.bytes, "documents": self.shard_docs.get(s.index, -1),
                 "tokens": self.shard_tokens.get(s.index, -1)}
                for s in self.shards
            ],
            "bad_records": self.bad.snapshot(),
        }


def dumps_flat(parts: list[Any]) -> str:
    """``json.dumps(parts)`` for a list of lists of strings and ints (what ``shard_content``
    returns), written directly: a third of the time, which a 100,000-shard start-up feels
    (measured 0.4 s of 3 s). Anything else goes through ``json.dumps``."""
    out = []
    for part in parts:
        if not isinstance(part, list):
            return json.dumps(parts)
        items = []
        for v in part:
            if isinstance(v, str):
                items.append(_encode_str(v))
            elif type(v) is int:
                items.append(int.__repr__(v))
            else:
                return json.dumps(parts)
        out.append("[" + ", ".join(items) + "]")
    return "[" + ", ".join(out) + "]"


def empty_tokenized(dtype: np.dtype) -> TokenizedShard:
    return TokenizedShard(tokens=np.empty(0, dtype=dtype), offsets=np.zeros(1, dtype=np.int64))
