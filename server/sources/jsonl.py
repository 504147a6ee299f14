"""JSON Lines source: one document per line, text from a (dotted) field; large files split."""

from __future__ import annotations

import json
import os

from server.config import JsonlSourceConfig
from server.sources.base import BadRecords, FilePart, ShardSpec, decode_utf8, resolve_paths


class JsonlSource:
    """JSONL files; a file larger than ``shard_bytes`` is split at line boundaries."""

    def __init__(self, config: JsonlSourceConfig, field: str) -> None:
        self.config = config
        self.paths = resolve_paths(config.paths, config.exclude, field)
        self._keys = config.text_field.split(".")

    def shards(self) -> list[ShardSpec]:
        shards: list[ShardSpec] = []
        target = int(self.config.shard_bytes)
        for path in self.paths:
            for start, end in _line_ranges(path, target):
                name = path if (start, end) == (0, os.path.getsize(path)) else f"{path}[{start}:{end}]"
                shards.append(ShardSpec(len(shards), name, (FilePart(path, start, end),), end - start))
        return shards

    def read_shard(self, shard: ShardSpec, bad: BadRecords) -> list[str]:
        docs: list[str] = []
        for part in shard.parts:
            with open(part.path, "rb") as f:
                f.seek(part.start)
                data = f.read(part.end - part.start)
            for line in data.splitlines():
                if line.strip():
                    text = self._text(line, bad)
                    if text is not None:
                        docs.append(text)
        return docs

    def _text(self, line: bytes, bad: BadRecords) -> str | None:
        raw = decode_utf8(line, bad)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            bad.add("invalid_json")
            return None
        for key in self._keys:
            if not isinstance(value, dict) or key not in value:
                bad.add("missing_field")
                return None
            value = value[key]
        if not isinstance(value, str):
            bad.add("not_a_string")
            return None
        if not value.strip():
            bad.add("empty_document")
            return None
        return value


def _line_ranges(path: str, target: int) -> list[tuple[int, int]]:
    """Byte ranges of about ``target`` bytes that start and end on line boundaries."""
    size = os.path.getsize(path)
    ranges, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            end = min(start + target, size)
            if end < size:
                f.seek(end)
                f.readline()
                end = f.tell()
            ranges.append((start, end))
            start = end
    return ranges
