"""Parquet source (pyarrow): a named text column, each row group a shard."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from server.config import ParquetSourceConfig
from server.errors import ConfigError
from server.sources.arrow import check_text_column, table_texts
from server.sources.base import (BadRecords, BrokenShard, FilePart, ShardSpec, path_field, resolve_paths,
                                 sniff_format)

log = logging.getLogger(__name__)


class ParquetSource:
    """Parquet files; a file whose footer cannot be read is one shard that reads as broken."""

    def __init__(self, config: ParquetSourceConfig, field: str) -> None:
        self.config = config
        self.paths = resolve_paths(config.paths, config.exclude, field)
        self._shards: list[ShardSpec] = []
        for path in self.paths:
            where = path_field(path, config.paths, field)
            fmt = sniff_format(path)
            if fmt != "parquet":
                raise ConfigError(f"{where}: {path} is {'a ' + fmt if fmt else 'a text'} file, not Parquet "
                                  "(set the source's `type` to match the data)")
            try:
                meta = pq.ParquetFile(path).metadata
            except (pa.ArrowException, OSError) as err:
                # Truncated or corrupt footer: keep the file as one shard so that skipping it is
                # counted (broken_shard) like any other unreadable shard, and the order stays stable.
                log.warning("%s: unreadable Parquet footer (%s); its shard will be skipped", path, err)
                self._add(path, 0, 0)
                continue
            check_text_column(meta.schema.to_arrow_schema(), config.text_field, field, path)
            for rg in range(meta.num_row_groups):
                self._add(path, rg, meta.row_group(rg).total_byte_size)

    def _add(self, path: str, row_group: int, size: int) -> None:
        name = f"{path}[row group {row_group}]"
        self._shards.append(ShardSpec(len(self._shards), name, (FilePart(path, row_group, row_group + 1),), size))

    def shards(self) -> list[ShardSpec]:
        return list(self._shards)

    def files(self) -> list[str]:
        return list(self.paths)

    def read_shard(self, shard: ShardSpec, bad: BadRecords) -> list[str]:
        docs: list[str] = []
        column = self.config.text_field.split(".")[0]
        for part in shard.parts:
            try:
                table = pq.ParquetFile(part.path).read_row_group(part.start, columns=[column])
            except (pa.ArrowException, OSError) as err:
                raise BrokenShard(f"{shard.name}: unreadable Parquet: {err}") from err
            docs.extend(table_texts(table, self.config.text_field, bad, shard.name, 0))
        return docs
