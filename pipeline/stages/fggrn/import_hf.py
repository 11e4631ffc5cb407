"""`fgdata import hf`: a Hugging Face dataset → image shards (`--kind images`) or caption shards
(`--kind captions`).

SOURCE is a folder written by `datasets.save_to_disk` (read with `datasets.load_from_disk`; a
DatasetDict gives `--split`), or the hub's parquet layout: a .parquet file or a folder of them
(`data/train-00000-of-00001.parquet`, the files of `--split` when their names carry it).
Keys: the `key` or `id` column, else `<split>-<row index>`. Images: an `image` column holding
datasets' Image cells ({bytes, path}: a path must lie inside SOURCE) or raw bytes, judged by the
ingest checks; the caption from the first of ingest.caption_fields. Captions: `long_caption`,
else `caption`, else `text` becomes long_caption, `short_caption` is kept when present; each row
is labelled imported (caption_model "imported:<SOURCE>"). A row without what its kind needs is a
reject with its reason.
SOURCE may be a local path or an object-store URI (s3://, gs://, hf://). Parquet is read shard by
shard: planning reads the files' footers, each shard only the row groups holding its rows. A
save_to_disk folder is opened by datasets' own load_from_disk (on a store it copies the split to a
local temporary folder, once per shard: prefer the parquet layout for large sets on a store).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.core import storage
from pipeline.core.images import ImageRejected, inspect_image, normalised_bytes
from pipeline.core.schemas import conform
from pipeline.core.shards import shard_name
from pipeline.core.sources import OutsideRoot, path_inside, read_regular_file
from pipeline.core.text import clean_caption
from pipeline.errors import FgdataError, first_line
from pipeline.stages.base import ShardResult, Stage, WorkUnit, reject

KINDS = ("images", "captions")
IMAGE_COLUMNS = ("image", "img", "jpg", "png")
LONG_COLUMNS = ("long_caption", "caption", "text")


def _is_saved(source: storage.Location) -> bool:
    return source.is_dir() and ((source / "state.json").exists() or (source / "dataset_dict.json").exists())


def _load_saved(source: storage.Location, split: str) -> pa.Table:
    """A save_to_disk folder as one Arrow table: memory-mapped locally; on a store, datasets copies
    the split to a local temporary folder first (its own load_from_disk, through fsspec)."""
    import datasets

    loaded = datasets.load_from_disk(str(source))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise FgdataError(f"{source} has splits {', '.join(loaded)}, not {split!r}; pass --split")
        loaded = loaded[split]
    return loaded.with_format("arrow")[:]


def _parquet_files(source: storage.Location, split: str) -> list[storage.Location]:
    """The hub layout's files of `split` (all files when no name carries a split), in order. On a
    store, one listing of objects (a prefix named x.parquet is no file)."""
    if source.is_file():
        return [source]
    if storage.is_uri(source):
        root = source.path.rstrip("/")
        files = [source.joinpath(*p[len(root) + 1 :].split("/")) for p in sorted(source.fs.find(root)) if p.endswith(".parquet")]
    else:
        files = sorted(source.rglob("*.parquet"))
    in_split = [f for f in files if f.name.startswith(f"{split}-") or f.parent.name == split]
    files = in_split or files
    if not files:
        raise FgdataError(f"{source} is neither a save_to_disk folder nor holds .parquet files")
    return files


def _guarded(source: storage.Location, read):
    try:
        return read()
    except FgdataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets, pyarrow and store clients raise many types for a bad folder
        raise FgdataError(f"{source}: cannot read it as a Hugging Face dataset ({first_line(exc)})") from None


def describe_source(source: storage.Location, split: str) -> tuple[list[str], int]:
    """(column names, rows) of the dataset; for Parquet from the files' footers alone."""

    def read():
        if _is_saved(source):
            table = _load_saved(source, split)
            return table.column_names, table.num_rows
        schemas, rows = [], 0
        for file in _parquet_files(source, split):
            where, filesystem = storage.arrow_target(file)
            metadata = pq.read_metadata(where, filesystem=filesystem)
            schemas.append(metadata.schema.to_arrow_schema())
            rows += metadata.num_rows
        # files whose columns cannot be read as one table stop here, before any shard
        return pa.unify_schemas(schemas, promote_options="default").names, rows

    return _guarded(source, read)


def read_rows(source: storage.Location, split: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of the dataset; for Parquet only the row groups holding them are read."""

    def read():
        if _is_saved(source):
            return _load_saved(source, split).slice(start, stop - start)
        tables, offset = [], 0  # offset: the dataset row a file's (or row group's) first row is
        for file in _parquet_files(source, split):
            where, filesystem = storage.arrow_target(file)
            with pq.ParquetFile(where, filesystem=filesystem) as parquet:
                groups, first = [], None
                for index in range(parquet.num_row_groups):
                    rows = parquet.metadata.row_group(index).num_rows
                    if offset < stop and offset + rows > start:
                        groups.append(index)
                        first = offset if first is None else first
                    offset += rows
                if groups:
                    table = parquet.read_row_groups(groups)
                    tables.append(table.slice(max(start, first) - first, min(stop, first + table.num_rows) - max(start, first)))
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})

    return _guarded(source, read)


class ImportHfStage(Stage):
    name = "import-hf"
    config_section = "ingest"

    def __init__(self, source: Path | str, kind: str = "images", split: str = "train"):
        self.source = storage.resolved(source)
        self.kind, self.split = kind, split
        self.output_kind = kind
        self.objects = ""  # on a store: the size and ETag of every object under SOURCE, set by plan

    def plan(self, config: Config) -> list[WorkUnit]:
        if self.kind not in KINDS:
            raise FgdataError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        columns, rows = describe_source(self.source, self.split)
        wanted = IMAGE_COLUMNS if self.kind == "images" else LONG_COLUMNS
        if not any(c in columns for c in wanted):
            raise FgdataError(f"{self.source}: no {' / '.join(wanted)} column for --kind {self.kind} (columns: {', '.join(columns)})")
        if storage.is_uri(self.source):
            # a prefix has no size or time of its own: its objects' sizes and ETags stand for it
            listing = _guarded(self.source, lambda: self.source.fs.find(self.source.path, detail=True))
            self.objects = hashlib.sha256(repr(sorted((k, storage.object_signature(v)) for k, v in listing.items())).encode()).hexdigest()
        size = config.ingest.rows_per_shard
        # the unit names rows by position; the fingerprint adds the source's size and time
        return [WorkUnit(shard_name(i), {"path": str(self.source), "start": s, "stop": min(s + size, rows)}) for i, s in enumerate(range(0, max(rows, 1), size))]

    def plan_fingerprint(self) -> str:
        return f"{self.kind}:{self.split}" + (f":{self.objects}" if self.objects else "")

    def lineage(self) -> list[dict]:
        return [{"path": str(self.source), "format": "huggingface", "split": self.split}]

    def process(self, unit: WorkUnit, config: Config, model=None, prepared=None) -> ShardResult:
        start, stop = unit.payload["start"], unit.payload["stop"]
        table = read_rows(self.source, self.split, start, stop)
        counters: Counter = Counter()
        rows, rejects, seen = [], [], set()
        for offset, record in enumerate(table.to_pylist()):
            key = next((str(record[c]) for c in ("key", "id") if record.get(c) is not None and str(record[c]).strip()), f"{self.split}-{start + offset:09d}")
            try:
                if key in seen:  # within the shard; keys are the dataset's own, so a repeat is its error
                    raise ImageRejected("duplicate_key", f"key {key!r} is used by an earlier row")
                seen.add(key)
                row = self._image_row(key, record, config, counters) if self.kind == "images" else self._caption_row(key, record)
            except ImageRejected as rejected:
                rejects.append(reject(key, (rejected.reason, rejected.detail), str(self.source)))
                continue
            rows.append(row)
        return ShardResult(rows_in=table.num_rows, table=conform(rows, self.kind), rejects=rejects, counters=counters, provenance={"imported_from": str(self.source)})

    def _image_row(self, key: str, record: dict, config: Config, counters: Counter) -> dict:
        # a shard's files may lack the column other files have: a null cell, as when all are read together
        cell = next((record[c] for c in IMAGE_COLUMNS if c in record), None)
        data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
        if not data and path:
            try:
                data = read_regular_file(str(path_inside(self.source, path)))
            except OutsideRoot:  # an absolute path or ../: never read outside SOURCE
                raise ImageRejected("unsafe_path", f"image path {path!r} points outside {self.source}") from None
            except (OSError, ValueError, RuntimeError) as exc:  # missing, not a file, a NUL, a link loop
                raise ImageRejected("missing_file", f"{path}: {first_line(exc)}") from None
        if not isinstance(data, bytes) or not data:
            raise ImageRejected("missing_image", "the row has no image bytes")
        s = config.ingest
        info = inspect_image(data, min_side=s.min_side, max_pixels=s.max_pixels, formats=s.formats)
        stored = info.format
        if info.normalise:  # as ingest: every loader decodes the stored bytes to the same pixels
            data, stored = normalised_bytes(data)
        caption_column = next((c for c in s.caption_fields if isinstance(record.get(c), str)), None)
        caption = clean_caption(record[caption_column][: s.max_caption_chars]) if caption_column else None
        counters["captions_missing"] += not caption
        return {"key": key, "image": data, "width": info.width, "height": info.height, "format": stored, "short_caption": caption or None, "source": f"{self.source}#{key}"}

    def _caption_row(self, key: str, record: dict) -> dict:
        long = next((record[c] for c in LONG_COLUMNS if isinstance(record.get(c), str) and record[c].strip()), None)
        if long is None:
            raise ImageRejected("missing_caption", f"no text in {' / '.join(LONG_COLUMNS)}")
        short = record.get("short_caption") if isinstance(record.get("short_caption"), str) else None
        return {
            "key": key, "short_caption": short, "long_caption": long, "caption_model": f"imported:{self.source.name}",
            "caption_model_revision": None, "caption_model_is_random": False, "caption_backend": "imported",
            "prompt_name": "none", "prompt_hash": "", "sampling": "{}", "seed": 0, "generated_tokens": 0, "finish_reason": "stop",
        }
