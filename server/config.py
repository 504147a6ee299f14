"""Validated server configuration (YAML), with errors that name the offending field."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator

from server.errors import ConfigError

__all__ = ["Config", "DatasetConfig", "ServerSettings", "CacheSettings", "DiskCacheSettings", "PrefetchSettings",
           "MixtureConfig", "SourceConfig", "TokenizerConfig", "default_config", "load_config", "parse_config",
           "format_validation_error"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ByteTokenizerConfig(_Strict):
    """Token id = byte value (0-255), EOS 256, PAD 257; needs no files."""

    type: Literal["byte"] = "byte"


class _SpecialTokens(_Strict):
    """BOS/EOS/PAD handling shared by the file-based tokenizers."""

    add_bos: bool = Field(default=False, description="Begin every document with the BOS token.")
    bos_token: str | None = Field(
        default=None, description="BOS token name; default: the tokenizer's own or a common name.")
    eos_token: str | None = Field(
        default=None, description="EOS token name; default: the tokenizer's own or a common name.")
    pad_token: str | None = Field(
        default=None, description="PAD token name; default: the tokenizer's own or a common name.")


class HfTokenizerConfig(_SpecialTokens):
    """A local Hugging Face ``tokenizer.json`` (the ``tokenizers`` package); specials missing from
    its vocabulary become extra ids past it."""

    type: Literal["hf"]
    path: str = Field(min_length=1, description="Path of the tokenizer.json file.")


class TransformersTokenizerConfig(_SpecialTokens):
    """A local ``transformers`` tokenizer directory (needs ``pip install transformers``)."""

    type: Literal["transformers"]
    path: str = Field(min_length=1, description="Directory written by ``save_pretrained``.")


class SentencePieceTokenizerConfig(_SpecialTokens):
    """A local SentencePiece model (the ``sentencepiece`` package); the model's own EOS/PAD/BOS pieces
    are used unless named here, and specials it lacks become extra ids past its vocabulary."""

    type: Literal["sentencepiece"]
    path: str = Field(min_length=1, description="Path of the SentencePiece model file (``*.model``).")


TokenizerConfig = Annotated[
    Union[ByteTokenizerConfig, HfTokenizerConfig, TransformersTokenizerConfig, SentencePieceTokenizerConfig],
    Field(discriminator="type"),
]


class TextSourceConfig(_Strict):
    """Plain text files: one document per file, or documents split by a delimiter."""

    type: Literal["text"]
    paths: list[str] = Field(min_length=1, description="Globs of files or URLs to read (`**` recurses).")
    exclude: list[str] = Field(default_factory=list, description="Globs of paths to leave out.")
    delimiter: str | None = Field(default=None, min_length=1, description="Split files into documents on this string.")
    shard_bytes: ByteSize = Field(default=ByteSize(1 << 20), gt=0, description="Target shard size.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for URL paths (endpoint_url, anon, profile, ...).")


class JsonlSourceConfig(_Strict):
    """JSON Lines files (plain, ``.gz`` or ``.zst``), one document per line, text from a (dotted)
    field. Plain files are split into byte ranges; a compressed file is one shard."""

    type: Literal["jsonl"]
    paths: list[str] = Field(min_length=1, description="Globs of files or URLs to read (`**` recurses).")
    exclude: list[str] = Field(default_factory=list, description="Globs of paths to leave out.")
    text_field: str = Field(default="text", min_length=1, description="Field holding the text; dots for nesting.")
    shard_bytes: ByteSize = Field(default=ByteSize(1 << 20), gt=0, description="Target shard size.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for URL paths (endpoint_url, anon, profile, ...).")


class ParquetSourceConfig(_Strict):
    """Parquet files read with pyarrow; each row group is a shard."""

    type: Literal["parquet"]
    paths: list[str] = Field(min_length=1, description="Globs of files or URLs to read (`**` recurses).")
    exclude: list[str] = Field(default_factory=list, description="Globs of paths to leave out.")
    text_field: str = Field(default="text", min_length=1, description="Text column; dots for struct fields.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for URL paths (endpoint_url, anon, profile, ...).")


class HfSourceConfig(_Strict):
    """A Hugging Face ``datasets`` corpus, offline: a ``save_to_disk`` directory (``path``) or local
    data files (``format`` + ``data_files``); shards are contiguous row ranges."""

    type: Literal["hf"]
    path: str | None = Field(default=None, min_length=1,
                             description="Directory (or URL) written by ``save_to_disk``.")
    format: Literal["json", "csv", "parquet", "text"] | None = Field(
        default=None, description="``load_dataset`` builder for ``data_files``.")
    data_files: list[str] | None = Field(default=None, min_length=1, description="Globs of local data files.")
    split: str = Field(default="train", min_length=1, description="Split to read (of a DatasetDict).")
    text_field: str = Field(default="text", min_length=1, description="Text column; dots for struct fields.")
    rows_per_shard: int = Field(default=10_000, gt=0, description="Rows in each shard.")
    cache_dir: str | None = Field(default=None, description="Where ``load_dataset`` keeps its Arrow cache.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for a URL path (endpoint_url, anon, profile, ...).")

    @model_validator(mode="after")
    def _one_origin(self) -> HfSourceConfig:
        if (self.path is None) == (self.format is None and self.data_files is None):
            raise ValueError("give either `path` (a save_to_disk directory) or `format` and `data_files`")
        if self.path is None and (self.format is None or self.data_files is None):
            raise ValueError("`format` and `data_files` go together")
        return self


class TokensSourceConfig(_Strict):
    """Token shards made by ``data-server prepare``; served without tokenizing."""

    type: Literal["tokens"]
    path: str = Field(min_length=1, description="Directory (or URL) holding manifest.json and the shards.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for URL paths (endpoint_url, anon, profile, ...).")


SourceConfig = Annotated[
    Union[TextSourceConfig, JsonlSourceConfig, ParquetSourceConfig, HfSourceConfig, TokensSourceConfig],
    Field(discriminator="type"),
]


class SchedulePoint(_Strict):
    """Mixture weights from a given mixture row on."""

    at_row: int = Field(ge=0, description="Mixture row at which these weights apply.")
    weights: dict[str, float] = Field(min_length=1, description="Weight per component (normalised).")


class MixtureConfig(_Strict):
    """A weighted mixture of other configured datasets, optionally on a curriculum schedule."""

    weights: dict[str, float] = Field(min_length=1, description="Weight per component dataset.")
    schedule: list[SchedulePoint] = Field(default_factory=list, description="Weights that change with the row.")
    interpolation: Literal["step", "linear"] = Field(default="step", description="Between schedule points.")

    @model_validator(mode="after")
    def _check(self) -> MixtureConfig:
        for where, weights in [("weights", self.weights)] + [
                (f"schedule[{i}].weights", p.weights) for i, p in enumerate(self.schedule)]:
            if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise ValueError(f"{where}: weights must be >= 0 with a positive sum")
            if set(weights) - set(self.weights):
                raise ValueError(f"{where}: {sorted(set(weights) - set(self.weights))} not in the mixture's weights")
        rows = [p.at_row for p in self.schedule]
        if rows != sorted(set(rows)):
            raise ValueError("schedule: at_row must increase strictly")
        return self

    def points(self) -> list[tuple[int, dict[str, float]]]:
        """(row, weights) points, the plain weights applying from row 0 unless scheduled."""
        points = [(p.at_row, p.weights) for p in self.schedule]
        return points if points and points[0][0] == 0 else [(0, self.weights)] + points


class ReadRetrySettings(_Strict):
    """How reading a shard rides out environment faults (an I/O error, a timeout, too many open
    files, a file renamed away for a moment): retried with jittered exponential backoff, never
    cached as a broken or empty shard. When ``attempts`` or ``deadline_s`` run out, the stream
    fails with UNAVAILABLE and the client resumes from its cursor (here or on another replica)."""

    attempts: int = Field(default=6, ge=1, le=100, description="Reads of a shard before giving up.")
    backoff_s: float = Field(default=0.1, gt=0, le=60, description="Wait before the first retry; doubles each time.")
    max_backoff_s: float = Field(default=2.0, gt=0, le=600, description="Longest wait between two reads.")
    deadline_s: float = Field(default=10.0, gt=0, le=3600, description="Give up once retrying would pass this.")


class DatasetConfig(_Strict):
    """One served dataset: a source and its tokenizer, or a mixture of other datasets.

    ``mixture`` takes ``{name: weight, ...}`` or ``{weights: {...}, schedule: [...],
    interpolation: step|linear}``."""

    source: SourceConfig | None = None
    tokenizer: TokenizerConfig = Field(default_factory=ByteTokenizerConfig)
    mixture: MixtureConfig | None = None
    retry: ReadRetrySettings = Field(default_factory=ReadRetrySettings,
                                     description="Retries of environment faults while reading shards.")

    @model_validator(mode="before")
    @classmethod
    def _mixture_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("mixture"), dict) and "weights" not in data["mixture"]:
            data = {**data, "mixture": {"weights": data["mixture"]}}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> DatasetConfig:
        if (self.source is None) == (self.mixture is None):
            raise ValueError("give exactly one of `source` or `mixture`")
        return self


#: gRPC's message limits are C ints.
GRPC_MAX_MESSAGE_BYTES = (1 << 31) - 1
#: Room in a message for everything but tokens: cursors, steps, headers.
MESSAGE_OVERHEAD_BYTES = 1 << 20


def largest_batch_bytes(max_seq_len: int, max_batch_size: int) -> int:
    """Token bytes of one batch of the largest allowed shape, at the widest wire dtype (4 bytes)."""
    return max_batch_size * (max_seq_len + 1) * 4


class ServerSettings(_Strict):
    """Network and limits of the server process."""

    host: str = Field(default="127.0.0.1", description="Address to listen on (0.0.0.0 for all).")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="Prometheus /metrics port.")
    max_seq_len: int = Field(default=65536, gt=0, description="Largest seq_len a stream may ask for.")
    max_batch_size: int = Field(default=1024, gt=0, description="Largest batch_size a stream may ask for.")
    max_message_bytes: ByteSize = Field(
        default=ByteSize(largest_batch_bytes(65536, 1024) + MESSAGE_OVERHEAD_BYTES), gt=0, le=GRPC_MAX_MESSAGE_BYTES,
        description="gRPC message limit; unset: what one batch of the largest allowed shape needs.")
    shutdown_grace_s: float = Field(default=5.0, ge=0, description="Time in-flight streams get on shutdown.")
    workers: int = Field(default=2, gt=0, description="Threads that read and tokenize shards.")
    # ---- access (issue 8; README "Security") ----
    auth_tokens_file: str | None = Field(
        default=None, min_length=1, description="Bearer tokens, one per line: `TOKEN [dataset1,dataset2]`.")
    auth_tokens_env: str | None = Field(
        default=None, min_length=1, description="Name of an environment variable holding tokens (same lines, or "
        "`;`-separated).")
    metrics_token_file: str | None = Field(
        default=None, min_length=1, description="File holding the one bearer token /metrics requires (Prometheus: "
        "`authorization: {credentials_file: ...}`); unset: /metrics is open.")
    metrics_token_env: str | None = Field(
        default=None, min_length=1, description="Name of an environment variable holding the /metrics bearer token "
        "(instead of metrics_token_file).")
    tls_cert: str | None = Field(
        default=None, min_length=1, description="PEM server certificate (chain); enables TLS.")
    tls_key: str | None = Field(default=None, min_length=1, description="PEM private key of tls_cert.")
    tls_client_ca: str | None = Field(
        default=None, min_length=1, description="PEM CA bundle; when set, clients must present a certificate it "
        "signed (mTLS).")
    data_roots: list[str] | None = Field(
        default=None, min_length=1, description="When set, every file a dataset reads must resolve (symlinks too) "
        "under one of these.")
    shared_memory: bool = Field(
        default=True, description="Write tokens into the shared-memory ring a client on this host offers (gRPC "
        "carries the rest).")
    shared_memory_dir: str | None = Field(
        default=None, min_length=1, description="Where clients' rings must be; unset: $TOKENFEED_SHM_DIR, else "
        "/dev/shm.")
    paced_gap_s: float = Field(
        default=0.03, gt=0, le=10, description="While many streams share the server, the wait between two "
        "messages of a rank it aims for, for clients that leave their batches a message to it (the default): "
        "longer gives larger messages and more tokens/s in all, shorter makes a many-rank job's batches come more "
        "evenly.")
    paced_min_tokens: int = Field(
        default=32_768, ge=0, description="The fewest tokens a paced message carries (whole batches; at most the "
        "client's ceiling), however long the round: a message costs the server about as much as this many tokens "
        "of batches, so smaller ones spend most of a loaded server on messages. 0: follow the round alone.")
    # ---- limits ----
    max_streams: int = Field(
        default=1024, gt=0, description="Concurrent batch streams; more get RESOURCE_EXHAUSTED (with a retry "
        "key: clients retry). Headroom above ranks / replicas: a rank that fails over or reconnects before its old "
        "stream closed holds two slots for a moment; stream_memory_bytes bounds their memory.")
    stream_memory_bytes: ByteSize = Field(
        default=ByteSize(1 << 30), gt=0, description="Budget of what all open streams may hold (each is charged "
        "its largest message, token-budget step and padded packed shard); resident memory stays within about 3x.")
    max_rows_per_step: int = Field(
        default=1 << 20, gt=0, description="Largest world_size x batch_size x step_stride a stream may ask for "
        "(bounds skipping).")
    max_budget_pieces_per_message: int = Field(
        default=32768, gt=0, description="Largest world_size x (max_tokens / seq_len) x step_stride x "
        "batches_per_message a token-budget stream may ask for: every rank plans every step's pieces (about 20 us "
        "each), the steps of other workers included, so this bounds a message's planning work.")
    keepalive_time_s: float = Field(
        default=30.0, gt=0, description="Ping each client connection this often (finds dead clients).")
    keepalive_timeout_s: float = Field(
        default=10.0, gt=0, description="Close a connection whose ping is unanswered this long.")
    min_client_ping_interval_s: float = Field(
        default=5.0, ge=0, description="Clients may ping this often without a too_many_pings GOAWAY (client "
        "default: 10 s).")
    # ---- connections and probes (issue 17; README "Security and limits") ----
    max_connections: int = Field(
        default=4096, gt=0, description="Open client connections; more are closed at accept (lowered to fit the "
        "open-file limit).")
    handshake_timeout_s: float = Field(
        default=10.0, gt=0, le=3600, description="Close a connection that has not finished its TLS and HTTP/2 "
        "handshake by then.")
    connection_idle_s: float = Field(
        default=300.0, gt=0, le=7 * 86400, description="Close a connection with no open call this long (pings do "
        "not count; clients reconnect on their next call).")
    max_health_watches: int = Field(
        default=64, gt=0, description="Concurrent health Watch and reflection streams (open to all, no token); more "
        "get RESOURCE_EXHAUSTED.")

    @model_validator(mode="before")
    @classmethod
    def _message_limit(cls, data: Any) -> Any:
        """Unset ``max_message_bytes`` becomes what one batch of the largest allowed shape needs."""
        if isinstance(data, dict) and data.get("max_message_bytes") is None:
            fields = cls.model_fields
            try:
                need = largest_batch_bytes(int(data.get("max_seq_len", fields["max_seq_len"].default)),
                                           int(data.get("max_batch_size", fields["max_batch_size"].default)))
            except (TypeError, ValueError):
                return data  # the fields' own validation names the bad value
            data = {**data, "max_message_bytes": min(need + MESSAGE_OVERHEAD_BYTES, GRPC_MAX_MESSAGE_BYTES)}
        return data

    @model_validator(mode="after")
    def _check_limits(self) -> ServerSettings:
        need = largest_batch_bytes(self.max_seq_len, self.max_batch_size) + MESSAGE_OVERHEAD_BYTES
        if need > self.max_message_bytes:
            raise ValueError(
                f"max_message_bytes ({int(self.max_message_bytes)}) cannot hold the largest batch a request may ask "
                f"for: max_batch_size={self.max_batch_size} rows x (max_seq_len={self.max_seq_len} + 1) tokens x 4 "
                f"bytes + {MESSAGE_OVERHEAD_BYTES} = {need} bytes; raise max_message_bytes (at most "
                f"{GRPC_MAX_MESSAGE_BYTES}) or lower max_batch_size or max_seq_len")
        if self.stream_memory_bytes < self.max_message_bytes:
            raise ValueError(f"stream_memory_bytes ({int(self.stream_memory_bytes)}) must hold at least one largest "
                             f"message (max_message_bytes={int(self.max_message_bytes)})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self


class DiskCacheSettings(_Strict):
    """Optional second cache tier, for corpora larger than memory; safe to delete. A local
    directory, or a URL prefix in an object store (``s3://bucket/tokenfeed-cache``) that every job
    and replica on the same content and tokenizer shares (its size is then the bucket's lifecycle
    rules' business: ``max_bytes`` applies to a local directory only)."""

    path: str = Field(min_length=1, description="Directory (created when missing) or object-store URL prefix.")
    max_bytes: ByteSize = Field(default=ByteSize(50 << 30), gt=0, description="Byte budget of a local disk tier.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for a URL path (endpoint_url, anon, profile, ...).")


class CacheSettings(_Strict):
    """Cache of tokenized shards in memory (uncompressed while they fit, else zstd), content-addressed,
    optional disk tier."""

    max_bytes: ByteSize = Field(default=ByteSize(2 << 30), ge=0,
                                description="Memory budget (compressed bytes + per-entry overhead); 0 disables.")
    ttl_s: float = Field(default=3600.0, gt=0, description="An entry unused for this long is dropped.")
    zstd_level: int = Field(default=3, ge=1, le=22, description="zstd level of cached shards.")
    compression: Literal["auto", "zstd", "none"] = Field(
        default="auto", description="`auto`: shards uncompressed in memory while they fit in max_bytes, zstd once "
                                    "it is short; `none` always uncompressed (~2.3x the bytes, no zstd "
                                    "decompression each epoch: a quarter of a warm server's CPU); `zstd` always "
                                    "compressed; disk stays zstd.")
    policy: Literal["smart", "lru"] = Field(
        default="smart", description="Eviction: `smart` uses the streams' known future order, `lru` does not.")
    hot_slots: int = Field(default=4096, ge=1, description="Uncompressed packed shards kept in front of the cache, "
                                                           "at most; hot_max_bytes is the bound that usually "
                                                           "binds (a 64-rank job spreads over hundreds of "
                                                           "small shards).")
    hot_max_bytes: ByteSize = Field(default=ByteSize(512 << 20), gt=0,
                                    description="Byte budget of the packed shards in front of the cache; wide enough "
                                                "for the ranks of a job to spread over several shards without "
                                                "re-packing (tokenfeed_hot_packs_total counts packings).")
    disk: DiskCacheSettings | None = Field(default=None, description="Second tier on local disk; none by default.")


class PrefetchSettings(_Strict):
    """Background loading of the shards every active stream will read next."""

    depth: int = Field(default=4, ge=0, description="Shards kept loading ahead of each stream; 0 disables.")
    concurrency: int = Field(default=2, gt=0, description="Prefetch loads running at once (all streams).")
    max_share: float = Field(default=0.5, gt=0, le=1,
                             description="Share of cache.max_bytes that prefetched, not yet read shards may take.")


class Config(_Strict):
    """The whole server configuration."""

    server: ServerSettings = Field(default_factory=ServerSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    prefetch: PrefetchSettings = Field(default_factory=PrefetchSettings)
    datasets: dict[str, DatasetConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _mixtures_name_plain_datasets(self) -> Config:
        for name, ds in self.datasets.items():
            for part in ds.mixture.weights if ds.mixture else ():
                other = self.datasets.get(part)
                if other is None:
                    raise ValueError(f"datasets.{name}.mixture: unknown dataset {part!r} "
                                     f"(configured: {', '.join(sorted(self.datasets))})")
                if other.mixture is not None:
                    raise ValueError(f"datasets.{name}.mixture: {part!r} is itself a mixture; "
                                     "list its components instead")
        return self


def default_config() -> Config:
    """One dataset, ``stdlib``: the running Python's standard library sources, byte tokenizer."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    source = TextSourceConfig(
        type="text", paths=[str(stdlib / "**" / "*.py")], exclude=["**/site-packages/**"]
    )
    return Config(datasets={"stdlib": DatasetConfig(source=source)})


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem, each naming the field by its dotted path."""
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-")) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: object, origin: str = "<dict>") -> Config:
    """Validate a config mapping; raises ``ConfigError`` naming each bad field."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, origin)) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    return parse_config(data if data is not None else {}, origin=str(path))
