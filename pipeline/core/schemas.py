"""Column contracts from schemas/*.json: the single source of truth for every shard written."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.resources import schema_path
from pipeline.errors import FgdataError

_SCALARS = {
    "string": pa.string(),
    "binary": pa.binary(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
}


@dataclass(frozen=True)
class Schema:
    kind: str
    arrow: pa.Schema
    key: str


def _arrow_type(spec) -> pa.DataType:
    if isinstance(spec, str):
        if spec not in _SCALARS:
            raise ValueError(f"unknown column type {spec!r}")
        return _SCALARS[spec]
    if "list" in spec:
        return pa.list_(_arrow_type(spec["list"]))
    if "struct" in spec:
        return pa.struct([_arrow_field(column) for column in spec["struct"]])
    raise ValueError(f"unknown column type {spec!r}")


def _arrow_field(column: dict) -> pa.Field:
    return pa.field(column["name"], _arrow_type(column["type"]), nullable=column.get("nullable", True))


@cache
def load_schema(kind: str) -> Schema:
    path = schema_path(kind)
    if not path.exists():
        raise FgdataError(f"no schema for dataset kind {kind!r} (expected {path})")
    spec = json.loads(path.read_text())
    return Schema(kind=kind, arrow=pa.schema([_arrow_field(c) for c in spec["columns"]]), key=spec["key"])


def conform(rows: list[dict], kind: str) -> pa.Table:
    """Builds a table in the schema's exact column order and types from row dicts."""
    schema = load_schema(kind)
    try:
        return pa.Table.from_pylist(rows, schema=schema.arrow)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as exc:
        raise ValueError(f"rows do not fit the {kind} schema: {exc}") from exc


def validate_table(table: pa.Table, kind: str, where: str) -> None:
    """Raises unless `table` matches the schema exactly: columns, types, nulls, unique keys."""
    schema = load_schema(kind)
    names = table.schema.names
    if names != schema.arrow.names:
        missing = [n for n in schema.arrow.names if n not in names]
        extra = [n for n in names if n not in schema.arrow.names]
        raise FgdataError(f"{where}: columns do not match the {kind} schema (missing {missing}, unexpected {extra})")
    for expected in schema.arrow:
        column = table.column(expected.name)
        if not column.type.equals(expected.type):
            raise FgdataError(f"{where}: column {expected.name!r} has type {column.type}, {kind} schema says {expected.type}")
        if not expected.nullable and column.null_count:
            raise FgdataError(f"{where}: column {expected.name!r} has {column.null_count} null(s) but may not be null")
    keys = table.column(schema.key)
    if pc.count_distinct(keys).as_py() != len(keys):
        raise FgdataError(f"{where}: duplicate values in key column {schema.key!r}")


def check_input_columns(arrow_schema: pa.Schema, required: dict[str, pa.DataType], where: str) -> None:
    """Stops before any work when an input shard lacks a column a stage reads, or has it in another type."""
    for name, expected in required.items():
        index = arrow_schema.get_field_index(name)
        if index < 0:
            raise FgdataError(f"{where}: missing required column {name!r} (has: {', '.join(arrow_schema.names)})")
        actual = arrow_schema.field(index).type
        if not (actual.equals(expected) or (pa.types.is_large_string(actual) and pa.types.is_string(expected))):
            raise FgdataError(f"{where}: column {name!r} has type {actual}, expected {expected}")
