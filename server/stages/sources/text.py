"""Plain-text source: one document per file, or documents split on a delimiter."""

from __future__ import annotations

from server.config import TextSourceConfig
from server.stages.sources.base import (BadRecords, ShardSpec, check_text_files, decode_utf8, group_files,
                                        resolve_paths)
from server.stages.storage import Storage


class TextSource:
    """Text files grouped into shards of about ``shard_bytes``."""

    def __init__(self, config: TextSourceConfig, field: str) -> None:
        self.config = config
        self.storage = Storage(config.storage_options)
        self.paths = resolve_paths(config.paths, config.exclude, field, storage=self.storage)
        check_text_files(self.paths, config.paths, field, "text", storage=self.storage)

    def shards(self) -> list[ShardSpec]:
        return group_files(self.paths, int(self.config.shard_bytes), self.storage)

    def files(self) -> list[str]:
        return list(self.paths)

    def read_shard(self, shard: ShardSpec, bad: BadRecords) -> list[str]:
        docs: list[str] = []
        delimiter = None if self.config.delimiter is None else self.config.delimiter.encode("utf-8")
        for part in shard.parts:
            data = self.storage.read(part.path)
            # Split before decoding (UTF-8 is self-synchronising), so one bad document costs only itself.
            pieces = [data] if delimiter is None else data.split(delimiter)
            if len(pieces) > 1 and not pieces[-1].strip():
                pieces.pop()  # the file ends with the delimiter: no document follows it
            for i, piece in enumerate(pieces):
                where = part.path if delimiter is None else f"{part.path} document {i}"
                text = decode_utf8(piece, bad, where)
                if text is None:
                    continue
                if text.strip():
                    docs.append(text)
                else:
                    bad.add("empty_document", sample=f"{where}: blank")
        return docs
