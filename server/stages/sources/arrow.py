"""Text columns of Arrow tables (Parquet row groups, HF datasets): schema checks and bad records."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from server.errors import ConfigError
from server.stages.sources.base import BadRecords, decode_utf8


def check_text_column(schema: pa.Schema, text_field: str, field: str, origin: str) -> None:
    """Refuse at start-up a ``text_field`` that is absent or not text; ``field`` is the config path."""
    keys = text_field.split(".")
    struct: pa.Schema | pa.StructType = schema
    dtype: pa.DataType | None = None
    for depth, key in enumerate(keys):
        index = struct.get_field_index(key)
        if index < 0:
            names = [f.name for f in struct]
            raise ConfigError(f"{field}.text_field: {origin} has no column {'.'.join(keys[:depth + 1])!r} "
                              f"(it has: {', '.join(names)})")
        dtype = struct.field(index).type
        if depth + 1 < len(keys):
            if not pa.types.is_struct(dtype):
                raise ConfigError(f"{field}.text_field: {'.'.join(keys[:depth + 1])!r} of {origin} "
                                  f"is {dtype}, not a struct")
            struct = dtype
    if not _is_text(dtype):
        raise ConfigError(f"{field}.text_field: column {text_field!r} of {origin} is {dtype}, not a string")


def _is_text(dtype: pa.DataType | None) -> bool:
    return dtype is not None and (pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
                                  or pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)
                                  or getattr(pa.types, "is_string_view", lambda _: False)(dtype))


def table_texts(table: pa.Table, text_field: str, bad: BadRecords, where: str, first_row: int) -> list[str]:
    """The documents of a table's text column; nulls, invalid UTF-8 and blank texts are counted."""
    keys = text_field.split(".")
    column = table.column(keys[0])
    for key in keys[1:]:
        column = pc.struct_field(column, key)
    docs: list[str] = []
    for row, value in enumerate(column.to_pylist(), start=first_row):
        if value is None:
            bad.add("missing_field", sample=f"{where} row {row}: {text_field!r} is null")
            continue
        if isinstance(value, bytes):
            value = decode_utf8(value, bad, f"{where} row {row}")
            if value is None:
                continue
        if not value.strip():
            bad.add("empty_document", sample=f"{where} row {row}: blank {text_field!r}")
            continue
        docs.append(value)
    return docs
