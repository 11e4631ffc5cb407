"""Lists the images `fgdata ingest` can read, with their captions, in a deterministic order.

Four layouts: a folder of images with `.txt`/`.json` sidecars; img2dataset's "files" output
(`00000.parquet` + `00000/000000000.jpg` + sidecars); img2dataset's webdataset tars; and a
Parquet/CSV table of image paths and captions. Listing reads captions, never image bytes.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from pipeline.config import IngestConfig
from pipeline.errors import FgdataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
FORMATS = ("auto", "folder", "img2dataset", "webdataset", "table")


@dataclass(frozen=True)
class SourceItem:
    """One image to ingest. `problem` is set when the listing already knows it must be rejected."""

    key: str
    path: str  # image file, or the tar holding it
    member: str | None = None  # member name inside the tar
    caption: str | None = None
    problem: tuple[str, str] | None = None  # (reason, detail)


def detect_format(source: Path) -> str:
    if source.is_file():
        if source.suffix.lower() in (".csv", ".parquet"):
            return "table"
        raise FgdataError(f"{source} is a file but not a .csv or .parquet table of image paths")
    if not source.is_dir():
        raise FgdataError(f"{source} does not exist")
    if any(source.glob("*.tar")):
        return "webdataset"
    if any((source / p.stem).is_dir() for p in source.glob("*.parquet")):
        return "img2dataset"
    return "folder"


def list_items(source: Path, fmt: str, config: IngestConfig) -> list[SourceItem]:
    source = Path(source).resolve()
    if fmt == "auto":
        fmt = detect_format(source)
    listers = {"folder": _list_folder, "img2dataset": _list_img2dataset, "webdataset": _list_webdataset, "table": _list_table}
    if fmt not in listers:
        raise FgdataError(f"unknown source format {fmt!r}; choose one of {', '.join(FORMATS)}")
    items = listers[fmt](source, config)
    if not items:
        raise FgdataError(f"{source} ({fmt}) holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return _mark_duplicate_keys(sorted(items, key=lambda item: (item.key, item.path, item.member or "")))


def _mark_duplicate_keys(items: list[SourceItem]) -> list[SourceItem]:
    # Keys must be unique across the whole dataset, so duplicates are found here, on the
    # driver, not per shard; the first (in sorted order) keeps the key.
    marked, previous = [], None
    for item in items:
        if item.key == previous and item.problem is None:
            item = replace(item, problem=("duplicate_key", f"key {item.key!r} is already used by another image"))
        marked.append(item)
        previous = item.key
    return marked


def _caption_from_json(text: str, fields: list[str]) -> str | None:
    record = json.loads(text)
    if not isinstance(record, dict):
        raise ValueError("sidecar JSON is not an object")
    for name in fields:
        if isinstance(record.get(name), str):
            return record[name]
    return None


def _sidecar_caption(image: Path, fields: list[str]) -> tuple[str | None, tuple[str, str] | None]:
    txt, jsn = image.with_suffix(".txt"), image.with_suffix(".json")
    try:
        if txt.exists():
            return txt.read_text(encoding="utf-8"), None
        if jsn.exists():
            return _caption_from_json(jsn.read_text(encoding="utf-8"), fields), None
    except (UnicodeDecodeError, ValueError) as exc:
        return None, ("bad_caption_sidecar", f"cannot read the caption sidecar of {image.name}: {exc}")
    return None, None


def _folder_items(folder: Path, config: IngestConfig, key_of) -> list[SourceItem]:
    items = []
    for path in folder.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            caption, problem = _sidecar_caption(path, config.caption_fields)
            items.append(SourceItem(key=key_of(path), path=str(path), caption=caption, problem=problem))
    return items


def _list_folder(source: Path, config: IngestConfig) -> list[SourceItem]:
    return _folder_items(source, config, key_of=lambda p: p.relative_to(source).with_suffix("").as_posix())


def _list_img2dataset(source: Path, config: IngestConfig) -> list[SourceItem]:
    # img2dataset names every file by its key; its per-shard parquet also lists the rows whose
    # download failed, which have no file: they become rejects so the counts add up.
    items = _folder_items(source, config, key_of=lambda p: p.stem)
    present = {item.key for item in items}
    for table_path in sorted(source.glob("*.parquet")):
        columns = pq.read_schema(table_path).names
        if not {"key", "status"} <= set(columns):
            continue
        wanted = [c for c in ("key", "status", "error_message", "caption") if c in columns]
        for row in pq.read_table(table_path, columns=wanted).to_pylist():
            if row["status"] != "success" and row["key"] not in present:
                detail = f"img2dataset could not download it: {row.get('error_message') or row['status']}"
                items.append(
                    SourceItem(key=row["key"], path=str(table_path), caption=row.get("caption"), problem=("download_failed", detail))
                )
    return items


def _list_webdataset(source: Path, config: IngestConfig) -> list[SourceItem]:
    items = []
    for tar_path in sorted(source.glob("*.tar")):
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    # webdataset: the key is the member path up to the first dot of its basename
                    folder, _, base = member.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    sample = samples.setdefault(f"{folder}/{stem}" if folder else stem, {})
                    if f".{ext.lower()}" in IMAGE_SUFFIXES:
                        sample["image"] = member.name
                    elif ext in ("txt", "json"):
                        sample[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as exc:
            raise FgdataError(f"{tar_path}: not a readable tar file ({exc})") from None
        for key, sample in samples.items():
            if "image" not in sample:
                continue
            caption, problem = None, None
            try:
                if "txt" in sample:
                    caption = sample["txt"].decode("utf-8")
                elif "json" in sample:
                    caption = _caption_from_json(sample["json"].decode("utf-8"), config.caption_fields)
            except (UnicodeDecodeError, ValueError) as exc:
                problem = ("bad_caption_sidecar", f"cannot read the caption of {key}: {exc}")
            items.append(SourceItem(key=key, path=str(tar_path), member=sample["image"], caption=caption, problem=problem))
    return items


def _list_table(source: Path, config: IngestConfig) -> list[SourceItem]:
    try:
        frame = pd.read_csv(source, dtype=str, keep_default_na=False) if source.suffix.lower() == ".csv" else pd.read_parquet(source)
    except Exception as exc:  # noqa: BLE001 - pandas raises many types for a bad file
        raise FgdataError(f"{source}: cannot read the table ({exc})") from None
    image_column = next((c for c in config.image_fields if c in frame.columns), None)
    if image_column is None:
        raise FgdataError(f"{source}: no image path column; expected one of {config.image_fields} (ingest.image_fields)")
    caption_column = next((c for c in config.caption_fields if c in frame.columns), None)
    items = []
    for index, row in enumerate(frame.to_dict("records")):
        raw_path = row[image_column]
        path = Path(str(raw_path)) if raw_path else None
        if path is not None and not path.is_absolute():
            path = source.parent / path
        key = str(row["key"]) if row.get("key") not in (None, "") else (path.with_suffix("").name if path else f"row-{index}")
        caption = row.get(caption_column) if caption_column else None
        caption = caption if isinstance(caption, str) else None
        problem = None if path else ("missing_image_path", f"row {index} of {source.name} has no {image_column}")
        items.append(SourceItem(key=key, path=str(path or source), caption=caption, problem=problem))
    return items
