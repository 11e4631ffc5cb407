"""Records of URL lists and released datasets (.parquet, .csv, .tsv, .json, .jsonl), and their keys.

A file may be a local path or an object-store URI (s3://, gs://, hf://): Parquet is read by pyarrow
through the store's filesystem (only the wanted columns are fetched), the others through one open
object. Only a regular object is read; a prefix ("folder") is refused like a local folder.

Keys: the record's `key`, else its `f_path`, else its `id`, else `<file stem>-<row index>`; one rule for
`fgdata download`, `import grit` and `import fgclip`, so regions and images imported from one file join.
"""

from __future__ import annotations

import io
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.core.sources import escape_undecodable
from pipeline.errors import FgdataError, first_line

URL_LIST_SUFFIXES = (".parquet", ".csv", ".tsv", ".json", ".jsonl")
KEY_FIELDS = ("key", "f_path", "id")


def record_key(record: dict, index: int, stem: str) -> str:
    """The key of a URL-list or GRIT record (see the module docstring)."""
    for name in KEY_FIELDS:
        value = record.get(name)
        if value is not None and not (isinstance(value, float) and value != value) and str(value).strip():
            return escape_undecodable(str(value))
    return f"{stem}-{index:09d}"


def read_records(path: storage.Location | str, columns: tuple[str, ...] | None = None) -> list[dict]:
    """The records of a .parquet, .csv, .tsv, .json (a list of objects) or .jsonl file, local or on a
    store; a one-line FgdataError when it is not one. `columns` limits what Parquet reads (those that exist)."""
    path = storage.location(path)
    try:
        is_file, exists = path.is_file(), path.exists()
    except Exception as exc:  # noqa: BLE001 - a store client's errors (no such bucket, no access) are not OSErrors
        raise FgdataError(f"{path}: cannot reach it ({first_line(exc)})") from None
    if not is_file:
        raise FgdataError(f"{path} is not a file" if exists else f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in URL_LIST_SUFFIXES:
        raise FgdataError(f"{path}: expected a {', '.join(URL_LIST_SUFFIXES)} file")
    where, filesystem = storage.arrow_target(path)
    try:
        if suffix == ".parquet":
            names = pq.read_schema(where, filesystem=filesystem).names
            wanted = None if columns is None else [c for c in columns if c in names]
            return pq.read_table(where, columns=wanted, filesystem=filesystem).to_pylist()
        data = path.read_bytes()
        if suffix in (".csv", ".tsv"):
            frame = pd.read_csv(io.BytesIO(data), sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
            return frame.to_dict("records")
        text = data.decode("utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if suffix == ".jsonl" else json.loads(text)
    except (OSError, ValueError, pa.ArrowException, pd.errors.ParserError, RecursionError) as exc:
        raise FgdataError(f"{path}: cannot read it ({first_line(exc)})") from None
    if not isinstance(records, list):
        raise FgdataError(f"{path}: the JSON is a {type(records).__name__}, expected a list of objects")
    # a non-object item is kept so that it becomes a reject, never skipped
    return [r if isinstance(r, dict) else {"_not_an_object": type(r).__name__} for r in records]
