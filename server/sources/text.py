"""Plain-text source: one document per file, or documents split on a delimiter."""

from __future__ import annotations

from server.config import TextSourceConfig
from server.sources.base import BadRecords, ShardSpec, decode_utf8, group_files, resolve_paths


class TextSource:
    """Text files grouped into shards of about ``shard_bytes``."""

    def __init__(self, config: TextSourceConfig, field: str) -> None:
        self.config = config
        self.paths = resolve_paths(config.paths, config.exclude, field)

    def shards(self) -> list[ShardSpec]:
        return group_files(self.paths, int(self.config.shard_bytes))

    def read_shard(self, shard: ShardSpec, bad: BadRecords) -> list[str]:
        docs: list[str] = []
        for part in shard.parts:
            with open(part.path, "rb") as f:
                text = decode_utf8(f.read(), bad)
            if text is None:
                continue
            pieces = [text] if self.config.delimiter is None else text.split(self.config.delimiter)
            for piece in pieces:
                if piece.strip():
                    docs.append(piece)
                else:
                    bad.add("empty_document")
        return docs
