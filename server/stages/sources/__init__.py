"""Sources list a corpus as shards and read a shard's documents (plain, synchronous code)."""

from __future__ import annotations

from server.config import (HfSourceConfig, JsonlSourceConfig, ParquetSourceConfig, SourceConfig,
                           TextSourceConfig, TokensSourceConfig)
from server.stages.sources.base import BadRecords, BrokenShard, FilePart, ShardSpec, Source, resolve_paths
from server.stages.sources.jsonl import JsonlSource
from server.stages.sources.text import TextSource
from server.stages.sources.tokens import TokensSource

__all__ = ["BadRecords", "BrokenShard", "FilePart", "ShardSpec", "Source", "TokensSource", "build_source",
           "resolve_paths"]


def build_source(config: SourceConfig, field: str) -> Source:
    """The source a config names; ``field`` is its dotted config path, used in errors."""
    if isinstance(config, TextSourceConfig):
        return TextSource(config, field)
    if isinstance(config, JsonlSourceConfig):
        return JsonlSource(config, field)
    if isinstance(config, ParquetSourceConfig):
        from server.stages.sources.parquet import ParquetSource  # imports pyarrow: only when used

        return ParquetSource(config, field)
    if isinstance(config, HfSourceConfig):
        from server.stages.sources.hf import HfSource  # imports `datasets` (~1 s): only when used

        return HfSource(config, field)
    if isinstance(config, TokensSourceConfig):
        return TokensSource(config, field)
    raise ValueError(f"{field}.type: unknown source type {config.type!r}")
