"""`fgdata download`: a URL list → image shards, fetched by fetch.py, staged in img2dataset's layout.

URL lists: GRIT / COYO / CC-style .parquet, .csv or .tsv (url + caption columns) and FineHARD /
FG-CLIP .json or .jsonl (a list of objects with `url`, whose `f_path` becomes the key, so the rows
`fgdata import fgclip` writes from the same JSON join these images by key: FG-CLIP issue #55, where
f_path no longer matched the renamed download).

Keys: the record's `key`, else its `f_path`, else its `id`, else `<file stem>-<row index>`; the
same rule as `fgdata import grit`, so regions and images imported from one GRIT file join.

Each shard downloads into OUT/_download/part-N/attempt-K/ (img2dataset's "files" layout, written by
its writer), then the ingest checks judge the bytes. A URL that failed to download is a reject whose
reason says why (http_404, timeout, blocked_address, too_large, ...); a body that is not an image is
never staged (not_an_image); one cut short or too small is rejected by the image checks
(decode_error, image_too_small, ...). A rerun reopens only the shards with failures that may pass
(fetch.RETRIED) and requests only those URLs again; what was downloaded is kept in the staging
folder and judged again without a request, and a final failure stays a reject without a request.

The URL list and OUT may be local or on an object store (s3://, gs://, hf://). With OUT on a store
the staging folder is there too (img2dataset writes through fsspec), so a rerun on any node finds
what earlier runs downloaded. A store has no rename: an attempt is written in place and counts only
once its `_complete` object, written last, exists (locally the finished attempt is renamed into place).
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.core import storage
from pipeline.core.images import ImageRejected, image_format
from pipeline.core.scoped import environment
from pipeline.core.shards import DONE_DIR, RUN_FILE, STATS_DIR, read_json, shard_name
from pipeline.core.sources import SourceItem
from pipeline.errors import FgdataError
from pipeline.stages.base import ShardResult, WorkUnit
from pipeline.stages.fggrn.fetch import Refused, fetch, request_url, retried
from pipeline.stages.fggrn.ingest import IngestStage
from pipeline.stages.fggrn.records import KEY_FIELDS, read_records, record_key

STAGING_DIR = "_download"
URL_FIELDS = ("url", "URL", "image_url")
# FG-CLIP JSON holds both captions: the image shard keeps the alt-text one
CAPTION_FIELDS = ("short_caption", "caption", "text", "alt", "TEXT")
COMPLETE = "_complete"  # an attempt on an object store is finished when this object exists
# the staging table of an attempt: img2dataset's columns, plus the record's own key and the reason
STAGED_SCHEMA = pa.schema([(name, pa.string()) for name in ("key", "url", "caption", "status", "error_message", "reason", "fgdata_key")])


def plan_url_records(path: storage.Location) -> list[dict]:
    """One entry per record, in file order: key, url, caption, and `problem` for a record that
    cannot be requested (no URL, not http(s), a key used before)."""
    records = read_records(path, columns=(*KEY_FIELDS, *URL_FIELDS, *CAPTION_FIELDS))
    if records and not any(isinstance(r, dict) and any(f in r for f in URL_FIELDS) for r in records):
        raise FgdataError(f"{path}: no URL column or field (expected one of {', '.join(URL_FIELDS)})")
    planned, seen = [], set()
    for index, record in enumerate(records):
        key = record_key(record, index, path.stem)
        url = next((record[f] for f in URL_FIELDS if record.get(f) not in (None, "")), None)
        caption = next((record[f] for f in CAPTION_FIELDS if isinstance(record.get(f), str) and record[f]), None)
        problem = None
        if "_not_an_object" in record:
            problem = ("bad_record", f"item {index} is a {record['_not_an_object']}, not an object")
        elif url is None:
            problem = ("missing_url", f"record {index} has no url")
        elif (why := _unrequestable(url)) is not None:
            # never requested, so never requested again: a rerun finds nothing to retry here
            problem = ("bad_url", f"record {index}: {str(url)[:200]!r} is not a URL to request: {why}")
        elif key in seen:
            problem = ("duplicate_key", f"record {index}: key {key!r} is already used by an earlier record")
        seen.add(key)
        planned.append({"key": key, "url": url.strip() if isinstance(url, str) else None, "caption": caption, "problem": problem})
    return planned


def _unrequestable(url) -> str | None:
    """Why `url` cannot be requested (not text, not http(s): no file://, a host no IDNA encodes, ...), or None."""
    if not isinstance(url, str):
        return f"a {type(url).__name__}, not text"
    try:
        request_url(url)
    except ValueError as exc:
        return str(exc)[:200]
    return None


def _attempts(staging: storage.Location) -> list[storage.Location]:
    """The attempt folders in staging, partial ones included, in the order they were made."""
    return sorted(staging.glob("attempt-*"), key=lambda p: int(p.name.split("-")[1]))


def _file_names(folder: storage.Location) -> set[str]:
    """The names of the regular files (objects) in `folder`, from one listing."""
    if storage.is_uri(folder):
        try:
            listing = folder.fs.ls(folder.path, detail=True)
        except FileNotFoundError:
            return set()
        return {entry["name"].rstrip("/").rpartition("/")[2] for entry in listing if entry.get("type") == "file"}
    return {entry.name for entry in os.scandir(folder) if entry.is_file()} if folder.is_dir() else set()


def _staged_results(staging: storage.Location) -> dict[str, dict]:
    """The latest result per key over the finished attempts: its problem (None: downloaded) and file."""
    results: dict[str, dict] = {}
    for attempt in _attempts(staging):
        table_path = attempt / "00000.parquet"
        if not table_path.is_file() or (storage.is_uri(attempt) and not (attempt / COMPLETE).is_file()):
            continue
        where, filesystem = storage.arrow_target(table_path)
        downloaded = _file_names(attempt / "00000")
        for row in pq.read_table(where, filesystem=filesystem).to_pylist():
            image = attempt / "00000" / f"{row['key']}.img"
            ok = row["status"] == "success" and image.name in downloaded
            # an attempt staged by img2dataset's own downloader has no reason: its failures are retried
            problem = None if ok else (row.get("reason") or "download_error", row["error_message"] or "no file was written")
            results[row["fgdata_key"]] = {"problem": problem, "file": str(image)}
    return results


def _wanted(record: dict, result: dict | None) -> bool:
    """Whether `record` is requested now: never tried, or failed for a reason that may pass."""
    return record["problem"] is None and (result is None or (result["problem"] is not None and retried(result["problem"][0])))


def _fetch_image(url: str, config: Config) -> tuple[bytes | None, tuple[str, str] | None]:
    """(body, None), or (None, (reason, detail)); a body that is no image is never kept."""
    for _ in range(config.download.retries + 1):
        try:
            body = fetch(url, config.download)
        except Refused as refused:
            problem = (refused.reason, refused.detail)
            if not retried(refused.reason):
                break
            continue
        try:
            image_format(body)
        except ImageRejected as rejected:
            return None, (rejected.reason, f"{url[:300]}: {rejected.detail}")
        return body, None
    return None, problem


def _download(records: list[dict], attempt: storage.Location, config: Config) -> None:
    """Fetches `records` (key, url, caption) into `attempt` with img2dataset's files writer, written
    under a temporary name first (on a store: in place, then its `_complete` object) so a killed
    worker never leaves a half attempt that counts."""
    # albumentations (which img2dataset imports) asks PyPI for updates when first imported unless
    # this is set; set for that import only, so the caller's environment is left as it was
    with environment(NO_ALBUMENTATIONS_UPDATE="1"):
        from img2dataset.writer import FilesSampleWriter

    on_store = storage.is_uri(attempt)
    partial = attempt if on_store else attempt.with_name(f".{attempt.name}.partial")
    if not on_store:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    # the bytes are kept as served (ingest's checks decide, and normalise, every image); the file
    # name says nothing of the format, so "img": ingest reads the format from the bytes
    writer = FilesSampleWriter(0, str(partial), save_caption=True, oom_shard_count=5, schema=STAGED_SCHEMA, encode_format="img")
    with ThreadPoolExecutor(config.download.threads) as pool:
        # each body is written as soon as it is in: memory holds about `threads` bodies, not the shard's
        fetching = {pool.submit(_fetch_image, record["url"], config): (index, record) for index, record in enumerate(records)}
        for done in as_completed(fetching):
            (index, record), (body, problem) = fetching.pop(done), done.result()
            meta = {"key": f"{index:09d}", "url": record["url"], "caption": record["caption"], "fgdata_key": record["key"],
                    "status": "success" if problem is None else "failed_to_download",
                    "reason": problem and problem[0], "error_message": problem and problem[1]}
            writer.write(body, meta["key"], record["caption"], meta)
    writer.close()
    if on_store:
        (attempt / COMPLETE).write_bytes(b"")  # last: what makes the attempt count
    else:
        os.replace(partial, attempt)


class DownloadStage(IngestStage):
    """Downloads a shard's URLs, then judges the bytes exactly as `fgdata ingest` does."""

    name = "download"
    # the download section is how, not what: it stays out of the settings hash (see DownloadConfig)
    config_section = "ingest"

    def __init__(self, url_list: Path | str, out_dir: Path | str):
        self.url_list = storage.resolved(url_list)
        self.out_dir = storage.location(out_dir) if storage.is_uri(out_dir) else Path(os.path.abspath(storage.location(out_dir)))  # file:///abs as /abs

    def plan(self, config: Config) -> list[WorkUnit]:
        import importlib.util

        if importlib.util.find_spec("img2dataset") is None:  # its files writer stages the downloads
            raise FgdataError(
                "fgdata download needs img2dataset, which `make setup` installs without its pins on pandas and "
                "opencv (see the Makefile's DOWNLOAD_PACKAGES); install it the same way"
            )
        records = plan_url_records(self.url_list)
        if not records:
            raise FgdataError(f"{self.url_list} holds no records")
        size = config.ingest.rows_per_shard
        return [WorkUnit(shard_name(i), records[start : start + size]) for i, start in enumerate(range(0, len(records), size))]

    def lineage(self) -> list[dict]:
        return [{"path": str(self.url_list), "format": "url-list"}]

    def process(self, unit: WorkUnit, config: Config, model=None, prepared=None) -> ShardResult:
        staging = self.out_dir / STAGING_DIR / unit.name.removesuffix(".parquet")
        if not storage.is_uri(staging):  # a store has no folders to make
            staging.mkdir(parents=True, exist_ok=True)
        results = _staged_results(staging)
        wanted = [r for r in unit.payload if _wanted(r, results.get(r["key"]))]
        if wanted:
            attempts = [int(p.name.split("-")[1]) for p in _attempts(staging)]
            _download(wanted, staging / f"attempt-{max(attempts, default=-1) + 1}", config)
            results = _staged_results(staging)
        items = []
        for record in unit.payload:
            problem = record["problem"] or results[record["key"]]["problem"]
            path = results[record["key"]]["file"] if problem is None else str(self.url_list)
            items.append(SourceItem(key=record["key"], path=path, caption=record["caption"], problem=problem))
        shard = super().process(WorkUnit(unit.name, items), config)
        # `source` names the URL, not the staging file it was read from
        urls: dict[str, str] = {}
        for record in unit.payload:
            urls.setdefault(record["key"], record["url"] or "")
        shard.table = shard.table.set_column(
            shard.table.schema.get_field_index("source"), shard.table.schema.field("source"), pa.array([urls[k] for k in shard.table.column("key").to_pylist()], pa.string())
        )
        for reject in shard.rejects:
            reject["source"] = urls[reject["key"]] or str(self.url_list)
        shard.counters["urls_requested"] += len(wanted)
        return shard


def reopen_failed_shards(out_dir: Path | str) -> list[str]:
    """Removes the completion marker of every finished download shard with failures that may pass
    (fetch.RETRIED), so the next run redoes those shards (requesting only those URLs). Only in a folder
    `fgdata download` owns (local or on a store); returns the reopened shard names."""
    out_dir = storage.location(out_dir)
    owner = read_json(out_dir / RUN_FILE) if (out_dir / RUN_FILE).is_file() else None
    if owner is None or owner.get("stage") != DownloadStage.name:
        return []
    reopened = []
    for marker in sorted((out_dir / DONE_DIR).glob("part-*.parquet.done")):
        name = marker.name.removesuffix(".done")
        stats = read_json(out_dir / STATS_DIR / name.replace(".parquet", ".json")) or {}
        counters = stats.get("counters", {})
        if any(count and key.startswith("rejected_") and retried(key.removeprefix("rejected_")) for key, count in counters.items()):
            marker.unlink()
            reopened.append(name)
    return reopened
