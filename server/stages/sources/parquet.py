"""Parquet source (pyarrow): a named text column, each row group a shard."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from server.config import ParquetSourceConfig
from server.errors import ConfigError
from server.stages.sources.arrow import check_text_column, table_texts
from server.stages.sources.base import (BadRecords, BrokenShard, FilePart, ShardSpec, path_field, resolve_paths,
                                        sniff_format)
from server.stages.storage import Storage

log = logging.getLogger(__name__)


class ParquetSource:
    """Parquet files; a file whose footer cannot be read is one shard that reads as broken."""

    def __init__(self, config: ParquetSourceConfig, field: str) -> None:
        self.config = config
        self.storage = Storage(config.storage_options)
        self.paths = resolve_paths(config.paths, config.exclude, field, storage=self.storage)
        self._shards: list[ShardSpec] = []
        for path in self.paths:
            where = path_field(path, config.paths, field)
            fmt = sniff_format(path, self.storage)
            if fmt != "parquet":
                raise ConfigError(f"{where}: {path} is {'a ' + fmt if fmt else 'a text'} file, not Parquet "
                                  "(set the source's `type` to match the data)")
            try:
                with _Watched(self.storage, path) as f:
                    meta = f.parquet().metadata
            except _ReadFailed as err:
                raise ConfigError(f"{where}: cannot read {path}: {err.__cause__}") from None
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
                with _Watched(self.storage, part.path) as f:
                    table = f.parquet().read_row_group(part.start, columns=[column])
            except _ReadFailed as err:
                assert isinstance(err.__cause__, OSError)
                raise err.__cause__ from None  # an environment fault: the dataset retries it
            except (pa.ArrowException, OSError) as err:  # the bytes were read: their content is bad
                raise BrokenShard(f"unreadable Parquet: {err}") from err
            docs.extend(table_texts(table, self.config.text_field, bad, shard.name, 0))
        return docs


class _ReadFailed(Exception):
    """Reading the file itself failed (its ``__cause__`` is the ``OSError``)."""


class _Watched:
    """A Parquet file opened by us, so that an I/O error (an environment fault, retried) is told
    apart from content that pyarrow cannot parse (which it also reports as ``OSError``)."""

    def __init__(self, storage: Storage, path: str) -> None:
        self.storage, self.path = storage, path
        self.error: OSError | None = None

    def __enter__(self) -> _Watched:
        try:
            self._file = self.storage.open(self.path)
        except OSError as err:
            raise _ReadFailed() from err
        return self

    def parquet(self) -> pq.ParquetFile:
        return pq.ParquetFile(_Reader(self))

    def __exit__(self, kind: object, err: BaseException | None, tb: object) -> None:
        self._file.close()
        if self.error is not None and err is not None:
            raise _ReadFailed() from self.error


class _Reader:
    """The file object handed to pyarrow: records the first ``OSError`` of a read or seek."""

    def __init__(self, watched: _Watched) -> None:
        self._w = watched
        self.closed = False

    def _call(self, fn: str, *args: object) -> object:
        try:
            return getattr(self._w._file, fn)(*args)
        except OSError as err:
            self._w.error = self._w.error or err
            raise

    def read(self, n: int = -1) -> bytes:
        return self._call("read", n)  # type: ignore[return-value]

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call("seek", offset, whence)  # type: ignore[return-value]

    def tell(self) -> int:
        return self._w._file.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True
