"""`fgdata ingest`: images + alt-text from a folder, img2dataset output or a table → image shards."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from pipeline.config import Config
from pipeline.core import storage
from pipeline.core.images import ImageRejected, inspect_image, normalised_bytes
from pipeline.core.schemas import conform
from pipeline.core.shards import shard_name
from pipeline.core.sources import (
    NotRegularFile,
    SourceItem,
    detect_format,
    escape_undecodable,
    list_items,
    open_regular_file,
    read_member,
    read_regular_file,
)
from pipeline.core.text import clean_caption
from pipeline.stages.base import ShardResult, Stage, WorkUnit, reject

_ARROW_BATCH_BYTES = 8 << 20  # image bytes turned into Arrow at a time


class IngestStage(Stage):
    name = "ingest"
    output_kind = "images"
    config_section = "ingest"

    def __init__(self, source: Path, fmt: str = "auto"):
        self.source = storage.resolved(source)  # a local path, or a URI (a folder or webdataset tars on a store)
        self.fmt = fmt

    def plan(self, config: Config) -> list[WorkUnit]:
        """Shards of `rows_per_shard` images, cut sooner where their files pass `max_shard_bytes`:
        a worker holds its shard's images (once, as Arrow) until the shard is written."""
        settings = config.ingest
        shards: list[list[SourceItem]] = [[]]
        held = 0
        for item in list_items(self.source, self.fmt, settings):
            size = _stored_bytes(item)
            if shards[-1] and (len(shards[-1]) >= settings.rows_per_shard or held + size > settings.max_shard_bytes):
                shards.append([])
                held = 0
            shards[-1].append(item)
            held += size
        return [WorkUnit(shard_name(i), items) for i, items in enumerate(shards)]

    def lineage(self) -> list[dict]:
        fmt = detect_format(self.source) if self.fmt == "auto" else self.fmt
        return [{"path": str(self.source), "format": fmt}]

    def process(self, unit: WorkUnit, config: Config, model=None, prepared=None) -> ShardResult:
        rows, rejects, tables, pending = [], [], [], 0
        counters: Counter = Counter()
        with _TarCache() as tars:
            for item in unit.payload:
                where = _where(item)
                # Parquet strings must be UTF-8: a path that is not shows its odd bytes as \xNN (see sources.py).
                source = escape_undecodable(where)
                counters["names_escaped"] += source != where
                try:
                    if item.problem:
                        raise ImageRejected(*item.problem)
                    data = tars.read(item) if item.member else _read_file(item.path)
                    info = inspect_image(
                        data, min_side=config.ingest.min_side, max_pixels=config.ingest.max_pixels, formats=config.ingest.formats
                    )
                    stored_format = info.format
                    if info.normalise:
                        # EXIF orientation is decided here, once: the row stores upright, 8-bit,
                        # flattened bytes that every loader (the detector's to_rgb, FG-CLIP's
                        # plain convert("RGB"), a browser) decodes to the same pixels, so the
                        # recorded size and every box are in that one frame. See README "Data format".
                        data, stored_format = normalised_bytes(data)
                        counters.update(f"normalised_{why}" for why in info.normalise)
                except ImageRejected as rejected:
                    detail = escape_undecodable(rejected.detail)
                    rejects.append(reject(item.key, (rejected.reason, detail), source))
                    continue
                caption = clean_caption(item.caption)
                if caption is not None and len(caption) > config.ingest.max_caption_chars:
                    caption = caption[: config.ingest.max_caption_chars]
                    counters["captions_truncated"] += 1
                counters["captions_missing"] += not caption
                rows.append(
                    {
                        "key": item.key,
                        "image": data,
                        "width": info.width,
                        "height": info.height,
                        "format": stored_format,
                        "short_caption": caption or None,
                        "source": source,
                    }
                )
                counters["image_bytes"] += len(data)
                pending += len(data)
                if pending >= _ARROW_BATCH_BYTES:
                    # Into Arrow as the shard goes: the rows' bytes are freed batch by batch. Built
                    # at the end, the Python bytes and Arrow's growing copy held the shard ~3 times.
                    tables.append(conform(rows, "images"))
                    rows, pending = [], 0
        tables.append(conform(rows, "images"))
        return ShardResult(rows_in=len(unit.payload), table=pa.concat_tables(tables), rejects=rejects, counters=counters)


def _stored_bytes(item: SourceItem) -> int:
    """The size of an item's image file as the listing knows it (a tar member's span, a store
    object's signature) or as the file system says; 0 when unknown, as for an item to reject."""
    if item.problem:
        return 0
    if item.span:
        return item.span[1]
    if item.signature:
        size = item.signature.partition(":")[0]
        return int(size) if size.isdigit() else 0
    try:
        return os.stat(item.path).st_size
    except (OSError, ValueError):  # gone since the listing, or a NUL in a table's path: rejected later
        return 0


def _where(item: SourceItem) -> str:
    return f"{item.path}::{item.member}" if item.member else item.path


def _read_file(path: str) -> bytes:
    # The listing saw a regular file, but it may have changed since; a FIFO is never opened.
    try:
        return read_regular_file(path)
    except FileNotFoundError:
        raise ImageRejected("missing_file", f"{path} does not exist") from None
    except NotRegularFile as exc:
        raise ImageRejected("not_a_file", str(exc)) from None
    except (OSError, ValueError) as exc:  # ValueError: a path from a table with a NUL byte in it
        raise ImageRejected("unreadable_file", f"{path}: {exc}") from None


class _TarCache:
    """Keeps each tar open once per shard rather than once per image; members are read at the
    offsets the listing found, so a tar damaged further on still yields its earlier members."""

    def __init__(self):
        self._open: dict[str, BinaryIO] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for tar in self._open.values():
            tar.close()

    def read(self, item: SourceItem) -> bytes:
        try:
            if item.path not in self._open:
                self._open[item.path] = open_regular_file(item.path)
            return read_member(self._open[item.path], *item.span)
        except OSError as exc:
            raise ImageRejected("unreadable_file", f"cannot read {item.member} from {item.path}: {exc}") from None
