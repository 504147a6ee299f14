"""Hugging Face ``datasets`` source, offline: a ``save_to_disk`` directory (local or in an object
store) or local data files through ``load_dataset``; shards are contiguous row ranges."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import pyarrow as pa

from server.config import HfSourceConfig
from server.errors import ConfigError
from server.stages.sources.arrow import check_text_column, table_texts
from server.stages.sources.base import BadRecords, BrokenShard, FilePart, ShardSpec, resolve_paths
from server.stages.files import is_url
from server.stages.storage import Storage


def import_datasets() -> ModuleType:
    """``datasets``, set never to touch the network."""
    # The flags are read when ``datasets`` is first imported; set them before, and again after
    # in case something imported it earlier.
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    return datasets  # type: ignore[no-any-return]  # (datasets ships no type information)


class HfSource:
    """The rows of one split of a local HF dataset, ``rows_per_shard`` rows per shard."""

    def __init__(self, config: HfSourceConfig, field: str) -> None:
        self.config = config
        self.storage = Storage(config.storage_options)  # (a save_to_disk directory may be a URL)
        hf = import_datasets()
        if config.path is not None:
            ds, self.origin, self._files = self._from_disk(hf, config.path, field)
        else:
            assert config.format is not None and config.data_files is not None
            self._files = resolve_paths(config.data_files, [], field, key="data_files")
            self.origin = f"{config.format}:{os.path.commonpath(self._files)}"
            try:
                ds = hf.load_dataset(config.format, data_files=self._files, split=config.split,
                                     cache_dir=config.cache_dir)
            except Exception as err:  # datasets raises many kinds; all mean "cannot load these files"
                raise ConfigError(f"{field}.data_files: cannot load {len(self._files)} file(s) as "
                                  f"{config.format}: {type(err).__name__}: {err}") from None
        check_text_column(ds.features.arrow_schema, config.text_field, field, self.origin)
        self._table = ds.with_format("arrow")
        self.num_rows = len(ds)
        self._bytes_per_row = ds.data.nbytes / max(1, self.num_rows)

    def _from_disk(self, hf: ModuleType, path: str, field: str) -> tuple[Any, str, list[str]]:
        if is_url(path):
            return self._from_store(hf, path.rstrip("/"), field)
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(path):
            raise ConfigError(f"{field}.path: {path} is not a directory written by save_to_disk")
        try:
            ds = hf.load_from_disk(path)
        except (FileNotFoundError, ValueError, pa.ArrowException, OSError) as err:
            raise ConfigError(f"{field}.path: cannot load {path}: {err}") from None
        if isinstance(ds, hf.DatasetDict):
            if self.config.split not in ds:
                raise ConfigError(f"{field}.split: {path} has no split {self.config.split!r} "
                                  f"(it has: {', '.join(ds)})")
            ds = ds[self.config.split]
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
        return ds, path, files

    def _from_store(self, hf: ModuleType, url: str, field: str) -> tuple[Any, str, list[str]]:
        """A ``save_to_disk`` directory in an object store: its objects listed once (their sizes
        and ETags are its content identity), then loaded by ``datasets`` (which copies the Arrow
        files to a local temporary directory and maps them)."""
        try:
            files = self.storage.glob(f"{url}/**", [])
        except Exception as err:  # noqa: BLE001 - the store's client errors (denied, no bucket, ...)
            raise ConfigError(f"{field}.path: cannot list {url}: {type(err).__name__}: {err}") from None
        if not any(f.endswith("/dataset_info.json") or f.endswith("/dataset_dict.json") for f in files):
            raise ConfigError(f"{field}.path: {url} is not a directory written by save_to_disk")
        try:
            ds = hf.load_from_disk(url, storage_options=self.config.storage_options)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"{field}.path: cannot load {url}: {type(err).__name__}: {err}") from None
        if isinstance(ds, hf.DatasetDict):
            if self.config.split not in ds:
                raise ConfigError(f"{field}.split: {url} has no split {self.config.split!r} (it has: {', '.join(ds)})")
            ds = ds[self.config.split]
        return ds, url, files

    def shards(self) -> list[ShardSpec]:
        step = self.config.rows_per_shard
        return [
            ShardSpec(i, f"{self.origin}[rows {start}:{min(start + step, self.num_rows)}]",
                      (FilePart(self.origin, start, min(start + step, self.num_rows)),),
                      int(self._bytes_per_row * (min(start + step, self.num_rows) - start)))
            for i, start in enumerate(range(0, self.num_rows, step))
        ]

    def files(self) -> list[str]:
        return list(self._files)

    def read_shard(self, shard: ShardSpec, bad: BadRecords) -> list[str]:
        docs: list[str] = []
        for part in shard.parts:
            try:
                table = self._table[part.start : part.end]
            except OSError:
                raise  # an environment fault (pyarrow's IO errors are OSErrors): retried
            except pa.ArrowException as err:
                raise BrokenShard(f"unreadable Arrow data: {err}") from err
            docs.extend(table_texts(table, self.config.text_field, bad, self.origin, part.start))
        return docs
