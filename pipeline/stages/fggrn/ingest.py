"""`fgdata ingest`: images + alt-text from a folder, img2dataset output or a table → image shards."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import BinaryIO

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


class IngestStage(Stage):
    name = "ingest"
    output_kind = "images"
    config_section = "ingest"

    def __init__(self, source: Path, fmt: str = "auto"):
        self.source = storage.resolved(source)  # a local path, or a URI (a folder or webdataset tars on a store)
        self.fmt = fmt

    def plan(self, config: Config) -> list[WorkUnit]:
        items = list_items(self.source, self.fmt, config.ingest)
        size = config.ingest.rows_per_shard
        return [WorkUnit(shard_name(i), items[start : start + size]) for i, start in enumerate(range(0, len(items), size))]

    def lineage(self) -> list[dict]:
        fmt = detect_format(self.source) if self.fmt == "auto" else self.fmt
        return [{"path": str(self.source), "format": fmt}]

    def process(self, unit: WorkUnit, config: Config, model=None, prepared=None) -> ShardResult:
        rows, rejects = [], []
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
        return ShardResult(rows_in=len(unit.payload), table=conform(rows, "images"), rejects=rejects, counters=counters)


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
