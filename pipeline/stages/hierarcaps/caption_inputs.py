"""Captions for the HierarCaps stages: caption or image shards, or a plain caption file.

A directory is read shard by shard (`key`, `short_caption`, and `image_url` when present); a
file is a .txt (one caption per line), or a .csv/.tsv/.parquet table with a caption column
(the first of ingest.caption_fields it has) and optional `key` and `image_url` columns.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa

from pipeline.core.schemas import check_input_columns
from pipeline.core.shards import list_shards, read_shard, read_shard_schema, shard_name, shard_rows
from pipeline.core.storage import resolved
from pipeline.errors import FgdataError
from pipeline.stages.base import WorkUnit, reject

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")


def caption_units(source: Path, rows_per_unit: int, caption_fields: list[str]) -> list[WorkUnit]:
    """One unit per input shard, or per `rows_per_unit` captions of a file."""
    source = resolved(source)  # a local path or a URI
    if source.is_dir():
        units = []
        for path in list_shards(source):
            check_input_columns(read_shard_schema(path), {"key": pa.string(), "short_caption": pa.string()}, where=str(path))
            units.append(WorkUnit(path.name, {"path": str(path), "rows": shard_rows(path)}))
        if not units:
            raise FgdataError(f"{source} holds no shards with captions")
        return units
    rows = _read_caption_file(source, caption_fields)
    chunks = [rows[i : i + rows_per_unit] for i in range(0, len(rows), rows_per_unit)]
    return [WorkUnit(shard_name(i), {"captions": chunk, "rows": len(chunk)}) for i, chunk in enumerate(chunks)]


def unit_captions(unit: WorkUnit) -> list[dict]:
    """key, caption and image_url (or None) of every row of a unit."""
    if "captions" in unit.payload:
        return unit.payload["captions"]
    table = read_shard(unit.payload["path"])
    urls = table.column("image_url").to_pylist() if "image_url" in table.column_names else [None] * table.num_rows
    return [
        {"key": key, "caption": caption, "image_url": url}
        for key, caption, url in zip(table.column("key").to_pylist(), table.column("short_caption").to_pylist(), urls)
    ]


def with_captions(batch: list[dict], rejects: list[dict], source: str) -> list[dict]:
    """The items of `batch` that have a caption; the others go to `rejects` as empty_caption."""
    usable = []
    for item in batch:
        if (item["caption"] or "").strip():
            usable.append(item)
        else:
            rejects.append(reject(item["key"], ("empty_caption", "the row has no caption text"), source))
    return usable


def _read_table(where, suffix: str) -> pd.DataFrame:
    if suffix == ".parquet":
        return pd.read_parquet(where)
    return pd.read_csv(where, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)


def _read_caption_file(path: Path, caption_fields: list[str]) -> list[dict]:
    if not path.exists():
        raise FgdataError(f"{path} does not exist (give caption shards, or a .txt/.csv/.tsv/.parquet file of captions)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [{"key": f"{path.stem}-{i:09d}", "caption": line, "image_url": None} for i, line in enumerate(lines)]
    if suffix not in TABLE_SUFFIXES:
        raise FgdataError(f"{path}: captions must come as shards, .txt, .csv, .tsv or .parquet")
    try:
        with path.open("rb") as handle:  # a local file or one object on a store, read the same way
            frame = _read_table(handle, suffix)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise FgdataError(f"{path}: cannot read the table ({exc})") from None
    column = next((name for name in caption_fields if name in frame.columns), None)
    if column is None:
        raise FgdataError(f"{path}: no caption column; expected one of {caption_fields}, found {list(frame.columns)}")
    keys = frame["key"].astype(str).tolist() if "key" in frame.columns else [f"{path.stem}-{i:09d}" for i in range(len(frame))]
    if len(set(keys)) != len(keys):
        raise FgdataError(f"{path}: column key has duplicate values")
    urls = frame["image_url"].tolist() if "image_url" in frame.columns else [None] * len(frame)
    return [
        {"key": key, "caption": "" if caption is None else str(caption), "image_url": url or None}
        for key, caption, url in zip(keys, frame[column].tolist(), urls)
    ]
