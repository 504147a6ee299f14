"""JSON Lines source: one document per line, text from a (dotted) field; plain files are split
into byte ranges, ``.gz`` / ``.zst`` files (detected by content) are one shard each."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator

import zstandard

from server.config import JsonlSourceConfig
from server.errors import ConfigError
from server.stages.sources.base import (BadRecords, BrokenShard, FilePart, ShardSpec, decode_utf8, path_field,
                                        resolve_paths, sniff_formats)
from server.stages.files import listed_stats
from server.stages.storage import Storage

_COMPRESSED = ("gzip", "zstd")


class JsonlSource:
    """JSONL files; a plain file larger than ``shard_bytes`` is split at line boundaries."""

    def __init__(self, config: JsonlSourceConfig, field: str) -> None:
        self.config = config
        self.storage = Storage(config.storage_options)
        self.paths = resolve_paths(config.paths, config.exclude, field, storage=self.storage)
        self.formats: dict[str, str | None] = sniff_formats(self.paths, self.storage)
        for path, fmt in self.formats.items():
            if fmt is not None and fmt not in _COMPRESSED:
                raise ConfigError(f"{path_field(path, config.paths, field)}: {path} is a {fmt} file, not "
                                  "JSON Lines (plain, gzip or zstd); set the source's `type` to match the data")
        self._keys = config.text_field.split(".")

    def shards(self) -> list[ShardSpec]:
        shards: list[ShardSpec] = []
        target = int(self.config.shard_bytes)
        formats, size_of, listed = self.formats, self.storage.size, listed_stats() or {}
        for path in self.paths:
            seen = listed.get(path)  # the start-up listing's stat (local files), else asked
            size = seen[0] if seen is not None else size_of(path)
            if size <= target or formats[path]:  # one shard: a small file, or a compressed stream (no seeks)
                shards.append(ShardSpec(len(shards), path, (FilePart(path, 0, size),), size))
                continue
            ranges = _line_ranges(self.storage, path, size, target)
            for start, end in ranges:
                name = path if (start, end) == (0, size) else f"{path}[{start}:{end}]"
                shards.append(ShardSpec(len(shards), name, (FilePart(path, start, end),), end - start))
        return shards

    def files(self) -> list[str]:
        return list(self.paths)

    def read_shard(self, shard: ShardSpec, bad: BadRecords) -> list[str]:
        docs: list[str] = []
        for part in shard.parts:
            for lineno, line in enumerate(self._read(part).split(b"\n")):
                if line.strip():
                    text = self._text(line, bad, f"{shard.name} line {lineno + 1}")
                    if text is not None:
                        docs.append(text)
        return docs

    def _read(self, part: FilePart) -> bytes:
        fmt = self.formats[part.path]
        if fmt is None:  # a byte range: one ranged request from an object store
            return self.storage.read(part.path, part.start, part.end)
        data = self.storage.read(part.path)
        try:
            return _gunzip(data) if fmt == "gzip" else b"".join(_unzstd(data))
        except (EOFError, OSError, zlib.error, zstandard.ZstdError) as err:
            raise BrokenShard(f"{part.path}: unreadable {fmt} stream: {err}") from err

    def _text(self, line: bytes, bad: BadRecords, where: str) -> str | None:
        raw = decode_utf8(line, bad, where)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            bad.add("invalid_json", sample=f"{where}: {err.msg}: {raw[:60]!r}")
            return None
        for key in self._keys:
            if not isinstance(value, dict) or key not in value:
                bad.add("missing_field", sample=f"{where}: no field {self.config.text_field!r}: {raw[:60]!r}")
                return None
            value = value[key]
        if not isinstance(value, str):
            bad.add("not_a_string", sample=f"{where}: {self.config.text_field!r} is {type(value).__name__}")
            return None
        if not value.strip():
            bad.add("empty_document", sample=f"{where}: blank {self.config.text_field!r}")
            return None
        return value


def _gunzip(data: bytes) -> bytes:
    """All members of a gzip stream; a truncated or corrupt one raises."""
    return gzip.decompress(data)


def _unzstd(data: bytes) -> Iterator[bytes]:
    """All frames of a zstd stream; unlike ``stream_reader``, a truncated frame raises."""
    dctx = zstandard.ZstdDecompressor()
    while data:
        dobj = dctx.decompressobj()
        yield dobj.decompress(data)
        if not dobj.eof:
            raise EOFError("zstd stream ends inside a frame (truncated file)")
        data = dobj.unused_data


def _line_ranges(storage: Storage, path: str, size: int, target: int) -> list[tuple[int, int]]:
    """Byte ranges of about ``target`` bytes that start and end on line boundaries (reading only
    the line at each cut: a block per shard from an object store, never the whole object)."""
    if size <= target:  # most files of a many-small-files corpus: no cut, nothing to read
        return [(0, size)]
    ranges, start = [], 0
    with storage.open(path) as f:
        while start < size:
            end = min(start + target, size)
            if end < size:
                f.seek(end)
                f.readline()
                end = f.tell()
            ranges.append((start, end))
            start = end
    return ranges
