"""Sources list a corpus as shards and read a shard's documents (plain, synchronous code)."""

from __future__ import annotations

from server.config import JsonlSourceConfig, SourceConfig, TextSourceConfig
from server.sources.base import BadRecords, FilePart, ShardSpec, Source, resolve_paths
from server.sources.jsonl import JsonlSource
from server.sources.text import TextSource

__all__ = ["BadRecords", "FilePart", "ShardSpec", "Source", "build_source", "resolve_paths"]


def build_source(config: SourceConfig, field: str) -> Source:
    """The source a config names; ``field`` is its dotted config path, used in errors."""
    if isinstance(config, TextSourceConfig):
        return TextSource(config, field)
    if isinstance(config, JsonlSourceConfig):
        return JsonlSource(config, field)
    raise ValueError(f"{field}.type: unknown source type {config.type!r}")
