"""Parquet shard datasets: atomic writes, completion markers, resume, manifests.

A dataset directory holds its shards in `train/part-NNNNN.parquet`, `_rejects/part-NNNNN.parquet`,
`_stats/part-NNNNN.json`, completion markers `_done/part-NNNNN.done` (and, for dedup, its pass-1
hashes `_dedup_hashes/part-NNNNN.parquet`), `_run.json` (the stage
and settings that own the directory) and `_manifest.json`, written last. A shard is finished
when its marker exists; data, rejects and stats are renamed into place before the marker (on an
object store, where nothing is renamed, uploaded whole before it: see core/storage.py).

The shards sit in `train/` so that Hugging Face `datasets.load_dataset("parquet", data_dir=OUT)`
(and `load_dataset(OUT)`) read them, and only them, as the train split: a folder named after a
split is the first thing `datasets` looks for, and everything else here is bookkeeping it must not
take for data. Parquet that fgdata did not write, and datasets of fgdata 0.1 (shards at the
top), are read where their shards are.

A dataset directory may be a local path or an `s3://`, `gs://`, `hf://` URI: every function here
takes either (a str, Path or UPath) and works through `storage.location`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import platform
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.core import storage
from pipeline.core.schemas import conform, validate_table
from pipeline.core.storage import Location, location
from pipeline.errors import FgdataError, first_line

log = logging.getLogger(__name__)

DATA_DIR = "train"
REJECTS_DIR = "_rejects"
STATS_DIR = "_stats"
DONE_DIR = "_done"
# `dedup`'s pass-1 result per input shard (pixel digests, pHashes, caption digests, undecodable
# keys), so a rerun does not decode every image again: see pipeline/stages/fggrn/dedup.py
DEDUP_HASHES_DIR = "_dedup_hashes"
RUN_FILE = "_run.json"
MANIFEST_FILE = "_manifest.json"
LOCK_FILE = "_run.lock"
# In `train/` while a run is unfinished: not Parquet, so `datasets.load_dataset` (and any reader of
# train/*.parquet) fails on it rather than return the rows of the shards done so far as the dataset.
INCOMPLETE_FILE = "_INCOMPLETE-fgdata-run-not-finished.parquet"
_TMP_TAG = storage.TMP_TAG
_TMP_FILE = f".*{_TMP_TAG}*"
# What fgdata writes in a dataset directory: --overwrite deletes these and nothing else.
DATASET_ENTRIES = (DATA_DIR, "part-*.parquet", REJECTS_DIR, STATS_DIR, DONE_DIR, RUN_FILE, MANIFEST_FILE, "DATACARD.md", _TMP_FILE, "_download", DEDUP_HASHES_DIR)
# What `train` and `hierarcaps distill` write: the model (save_pretrained), checkpoints and the report.
MODEL_DIR_ENTRIES = (RUN_FILE, "checkpoints", "*.json", "*.safetensors", "*.txt", "*.model", _TMP_FILE)
# What fgdata writes inside its own folders (paths relative to the folder; `*` spans subfolders):
# --overwrite proves every file under them is one of these before it deletes anything.
_SHARD = "part-[0-9][0-9][0-9][0-9][0-9]"
FOLDER_CONTENTS = {
    DATA_DIR: (f"{_SHARD}.parquet", INCOMPLETE_FILE, _TMP_FILE),
    REJECTS_DIR: (f"{_SHARD}.parquet", _TMP_FILE),
    STATS_DIR: (f"{_SHARD}.json", _TMP_FILE),
    DONE_DIR: (f"{_SHARD}.parquet.done", _TMP_FILE),
    # img2dataset's files of one attempt (named by it), and of one a kill cut short
    "_download": (f"{_SHARD}/attempt-[0-9]*/*", f"{_SHARD}/.attempt-[0-9]*.partial/*"),
    DEDUP_HASHES_DIR: (f"{_SHARD}.parquet", _TMP_FILE),  # named after the input shard
    "checkpoints": ("step-[0-9]*/*",),  # a checkpoint's files, and a `.partial` one a kill left
}


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shards_folder(dataset_dir: Location) -> Location:
    """Where a dataset's `part-*.parquet` shards are: `train/` as fgdata writes them, else the
    directory itself (Parquet fgdata did not write, or a dataset of fgdata 0.1)."""
    dataset_dir = location(dataset_dir)
    inner = dataset_dir / DATA_DIR
    return inner if inner.is_dir() else dataset_dir


def shard_path(dataset_dir: Location, name: str) -> Location:
    """The shard `name` (e.g. `part-00003.parquet`) of a dataset, wherever its shards are."""
    return shards_folder(dataset_dir) / name


def list_shards(dataset_dir: Location) -> list[Location]:
    dataset_dir = location(dataset_dir)
    if not dataset_dir.is_dir():
        raise FgdataError(f"{dataset_dir} is not a directory of Parquet shards")
    shards = sorted(shards_folder(dataset_dir).glob("part-*.parquet"))
    if not shards:
        raise FgdataError(f"{dataset_dir} holds no part-*.parquet shards (looked in {DATA_DIR}/ and at the top)")
    return shards


def read_shard_schema(path: Location) -> pa.Schema:
    where, filesystem = storage.arrow_target(location(path))
    try:
        return pq.read_schema(where, filesystem=filesystem)
    except (pa.ArrowException, OSError) as exc:
        raise FgdataError(f"{path}: not a readable Parquet file ({exc})") from None


def shard_rows(path: Location) -> int:
    """The rows of a shard, from its footer (no data read)."""
    where, filesystem = storage.arrow_target(location(path))
    try:
        return pq.read_metadata(where, filesystem=filesystem).num_rows
    except (pa.ArrowException, OSError) as exc:
        raise FgdataError(f"{path}: not a readable Parquet file ({exc})") from None


def open_shard(path: Location, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    """A shard opened for its footer, row groups and batches (given its `metadata`, the footer is
    not read again): a local file, or an object read by exact range requests. Not the store's
    default read-ahead: s3fs fetches 50 MB past every read, so a footer or one row group would pull
    a whole shard, and a sample every shard."""
    place = location(path)
    if not storage.is_uri(place):
        return pq.ParquetFile(place, metadata=metadata)
    return pq.ParquetFile(storage.open_for_reading(place, cache_type="none"), metadata=metadata)


def read_shard(path: Location, columns: list[str] | None = None) -> pa.Table:
    where, filesystem = storage.arrow_target(location(path))
    try:
        return pq.read_table(where, columns=columns, filesystem=filesystem)
    except (pa.ArrowException, OSError) as exc:
        raise FgdataError(f"{path}: cannot read shard ({exc})") from None


def shard_markers(out_dir: Location) -> dict[str, str]:
    """Completion markers by shard name, with what each holds: the fingerprint of the work that made it."""
    done = location(out_dir) / DONE_DIR
    if not done.is_dir():
        return {}
    return {p.name.removesuffix(".done"): p.read_text(errors="replace").strip() for p in done.iterdir() if p.name.endswith(".done")}


def finished_shards(out_dir: Location) -> set[str]:
    return set(shard_markers(out_dir))


def write_json(path: Location, payload: dict) -> None:
    storage.write_whole(location(path), lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"))


def write_text(path: Location, text: str, make_parents: bool = True) -> None:
    """`text` into `path` whole or not at all (a temporary file renamed; on a store, one upload), UTF-8."""
    storage.write_whole(location(path), lambda tmp: tmp.write_text(text, encoding="utf-8"), make_parents)


def read_json(path: Location) -> dict | None:
    """fgdata's own metadata (manifests, run records, stats, reports): a JSON object, or None when
    the file does not exist. Anything else is a one-line error that names the file."""
    path = location(path)
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FgdataError(f"{path}: corrupt fgdata metadata ({first_line(exc)}); rerun the command that wrote it, or remove that dataset") from None
    if not isinstance(payload, dict):
        raise FgdataError(f"{path}: corrupt fgdata metadata (a JSON {type(payload).__name__}, expected an object); rerun the command that wrote it")
    return payload


def _write_parquet(table: pa.Table, path: Location) -> None:
    # An empty table is written with no row group: `datasets` fails on a row group of 0 rows
    # ("BatchSize must be greater than 0"), and a shard whose rows were all rejected is one.
    where, filesystem = storage.arrow_target(path)
    if table.num_rows:
        pq.write_table(table, where, filesystem=filesystem)
    else:
        pq.ParquetWriter(where, table.schema, filesystem=filesystem).close()


def write_shard(out_dir: Location, name: str, table: pa.Table, kind: str, rejects: list[dict], stats: dict | Callable[[], dict], marker: str = "") -> dict:
    """Validates, then writes data, rejects and stats atomically, and marks the shard done last;
    returns the stats. `stats` may be a function, called once data and rejects are written (so
    the stats can time the writing).

    `marker` (the fingerprint of the settings and input that made the shard) goes into the
    completion marker, so a shard written by another run is never taken for this run's."""
    out_dir = location(out_dir)
    validate_table(table, kind, where=f"{out_dir / DATA_DIR / name} (output)")
    rejects_table = conform(rejects, "rejects")
    storage.write_whole(out_dir / DATA_DIR / name, lambda tmp: _write_parquet(table, tmp))
    storage.write_whole(out_dir / REJECTS_DIR / name, lambda tmp: _write_parquet(rejects_table, tmp))
    stats = stats() if callable(stats) else stats
    write_json(out_dir / STATS_DIR / name.replace(".parquet", ".json"), stats)
    storage.write_whole(out_dir / DONE_DIR / f"{name}.done", lambda tmp: tmp.write_text(marker))
    return stats


def read_stats(out_dir: Location) -> dict[str, dict]:
    """Per-shard stats of the finished shards, keyed by shard name."""
    out_dir = location(out_dir)
    return {name: read_json(out_dir / STATS_DIR / name.replace(".parquet", ".json")) for name in sorted(finished_shards(out_dir))}


def read_rejects(dataset_dir: Location) -> pa.Table:
    files = sorted((location(dataset_dir) / REJECTS_DIR).glob("part-*.parquet"))
    tables = [read_shard(f) for f in files]
    return pa.concat_tables(tables) if tables else conform([], "rejects")


def claim_output(
    out_dir: Path,
    stage: str,
    settings_hash: str,
    overwrite: bool,
    *,
    inputs: list[Location] = (),
    owned: tuple[str, ...] = DATASET_ENTRIES,
) -> Location:
    """Makes `out_dir` ready for `stage` and returns it resolved: resumes its own earlier run,
    refuses anyone else's.

    Resuming with different settings would mix two configurations in one dataset, so it is
    refused unless --overwrite replaces the directory. --overwrite deletes only a directory
    fgdata provably wrote (its `_run.json`, and nothing but the entries in `owned`), never an
    input or a folder holding one, never through a symlink. On an object store the same holds for
    the prefix: `_run.json` under it, nothing else under it, apart from every input. A run claims
    OUT while it holds it (`hold_output`), so the lock there is its own.
    """
    out_dir = check_output_path(out_dir, inputs)
    if overwrite and _holds_anything(out_dir):
        remove_owned_output(out_dir, owned)
    owner = read_json(out_dir / RUN_FILE)
    if owner is not None and any(out_dir.glob("part-*.parquet")):
        raise FgdataError(
            f"{out_dir} was written by fgdata 0.1 (its shards are at the top, not in {DATA_DIR}/), so it cannot be "
            "resumed; use --overwrite to redo it, or a new output directory"
        )
    if owner is not None and (owner.get("stage"), owner.get("settings_hash")) != (stage, settings_hash):
        raise FgdataError(
            f"{out_dir} already holds output of stage {owner.get('stage')!r} with other settings "
            f"(hash {owner.get('settings_hash')}, now {settings_hash}); use a new output directory, or --overwrite to replace it"
        )
    if owner is None and _holds_anything(out_dir):
        raise FgdataError(f"{out_dir} is not empty and was not written by fgdata; choose a new or empty output directory")
    if storage.is_uri(out_dir):
        # a store has no folders to make, and fgdata leaves no temporary objects there to sweep
        try:
            write_json(out_dir / RUN_FILE, {"stage": stage, "settings_hash": settings_hash, "written_by": "fgdata"})
        except OSError as exc:  # no such bucket, no permission, no endpoint
            raise FgdataError(f"cannot write to {out_dir}: {first_line(exc)}") from None
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.rglob(f".*{_TMP_TAG}*"):
        stale.unlink()
    write_json(out_dir / RUN_FILE, {"stage": stage, "settings_hash": settings_hash, "written_by": "fgdata"})
    return out_dir


def _holds_anything(out_dir: Location) -> bool:
    """Whether OUT holds more than the lock of the run claiming it."""
    return out_dir.is_dir() and any(entry.name != LOCK_FILE for entry in out_dir.iterdir())


def check_output_path(out_dir: Location, inputs: list[Location] = ()) -> Location:
    """OUT must be a directory (or not exist yet), not a symlink, and apart from every input:
    neither inside one nor holding one. Returns it resolved."""
    if storage.is_uri(out_dir):
        return _check_output_uri(location(out_dir), inputs)
    given = Path(os.path.abspath(location(out_dir)))  # absolute (file:///abs as /abs), symlinks not followed
    if given.is_symlink():
        raise FgdataError(f"{out_dir} is a symlink; give the real directory it points to ({given.resolve()})")
    resolved = given.resolve()
    for parent in [resolved, *resolved.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == resolved else f"is under {parent}, which is a file"
            raise FgdataError(f"{out_dir} {where}; the output must be a directory")
    for source in inputs:
        if storage.is_uri(source):  # an object in a store is never inside a local folder
            continue
        source = storage.resolved(source)
        if resolved == source:
            raise FgdataError(f"{out_dir} is the input itself; write the output to another directory")
        if resolved.is_relative_to(source):
            raise FgdataError(f"{out_dir} is inside the input {source}; write the output outside it")
        if source.is_relative_to(resolved):
            raise FgdataError(f"{out_dir} holds the input {source}; write the output to a directory apart from it")
    return resolved


def _check_output_uri(out_dir: Location, inputs: list[Location]) -> Location:
    """check_output_path on an object store: there are no symlinks, but a key may be an object
    and a prefix at once, so OUT must not be an object, and prefixes decide what is inside what.
    A whole bucket is never OUT: --overwrite would empty it."""
    if storage.is_bucket(out_dir):
        bucket = str(out_dir).rstrip("/")  # a bucket prints as s3://b/
        raise FgdataError(f"{bucket} is a whole bucket; give a folder in it ({bucket}/NAME)")
    try:
        is_object = out_dir.is_file()
    except Exception as exc:  # noqa: BLE001 - a store's client errors (no endpoint, bad credentials) are not all OSErrors
        raise FgdataError(f"cannot reach {out_dir}: {first_line(exc)}") from None
    if is_object:
        raise FgdataError(f"{out_dir} is a file; the output must be a directory")
    for source in inputs:
        source = storage.resolved(source)
        if storage.is_inside(out_dir, source):
            where = "is the input itself" if storage.is_inside(source, out_dir) else f"is inside the input {source}"
            raise FgdataError(f"{out_dir} {where}; write the output to another directory")
        if storage.is_inside(source, out_dir):
            raise FgdataError(f"{out_dir} holds the input {source}; write the output to a directory apart from it")
    return out_dir


def remove_owned_output(out_dir: Location, owned: tuple[str, ...] = DATASET_ENTRIES) -> None:
    """Deletes what fgdata wrote in `out_dir` (for --overwrite), after proving it wrote all of it:
    every entry is one of `owned`, and every file inside fgdata's folders is one fgdata writes
    there. The run's own lock stays: the run deleting the rest holds it."""
    if read_json(out_dir / RUN_FILE) is None:
        raise FgdataError(
            f"{out_dir} was not written by fgdata (it has no {RUN_FILE}), so --overwrite will not delete it; "
            "choose a new output directory"
        )
    entries = sorted(e for e in out_dir.iterdir() if e.name != LOCK_FILE)
    foreign = [e.name for e in entries if not _is_owned(e, owned)]
    for entry in entries:
        if entry.name in FOLDER_CONTENTS and entry.name not in foreign:
            foreign += [f"{entry.name}/{name}" for name in _files_under(entry) if not any(fnmatch.fnmatchcase(name, p) for p in FOLDER_CONTENTS[entry.name])]
    if foreign:
        raise FgdataError(
            f"{out_dir} holds files fgdata did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), "
            "so --overwrite will not delete it; move them out or choose a new output directory"
        )
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            storage.remove_tree(entry)
        else:
            entry.unlink()


def _is_owned(entry: Location, owned: tuple[str, ...]) -> bool:
    """A folder only under one of fgdata's folder names (a folder called `x.json` is not a model
    file), anything else under one of `owned`'s names."""
    if not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in owned):
        return False
    return entry.name in FOLDER_CONTENTS or not entry.is_dir() or entry.is_symlink()


def _files_under(folder: Location) -> list[str]:
    """Every file under `folder` as a path relative to it, sorted; a symlink is a file (never followed)."""
    if storage.is_uri(folder):
        prefix = folder.path.rstrip("/") + "/"
        return sorted(key.removeprefix(prefix) for key in folder.fs.find(folder.path))
    files = []
    for root, dirs, names in os.walk(folder):
        names += [d for d in dirs if os.path.islink(os.path.join(root, d))]
        files += [os.path.relpath(os.path.join(root, name), folder) for name in names]
    return sorted(files)


# A run's lock on OUT is taken over when its run is dead: its pid gone on this host, or no refresh
# for this long (a run on another host, or a store, where no pid can be asked).
LOCK_STALE_SECONDS = RunConfig.lock_stale_s
_HELD: set[str] = set()  # the outputs this process holds, so a recipe's step runs inside the recipe's hold


@contextmanager
def hold_output(out_dir: Location, stale_after: float = LOCK_STALE_SECONDS) -> Iterator[None]:
    """Holds `out_dir` for one run, from before its claim (so --overwrite never deletes under a
    live run) to its end, error or Ctrl-C included. Another run holding it is a one-line error."""
    key = str(out_dir)
    if key in _HELD:
        yield
        return
    if not storage.is_uri(out_dir):
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # no permission, a read-only disk
            raise FgdataError(f"cannot write to {out_dir}: {first_line(exc)}") from None
    lock = OutputLock(location(out_dir) / LOCK_FILE, stale_after)
    lock.acquire()
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        lock.release()


class OutputLock:
    """`_run.lock`: the host, pid and start of the run holding an output, and when it last said it
    is alive. Created only where none exists (a hard link on disk, a conditional PUT on a store;
    where a store ignores the condition, looked for first and read back after), refreshed by a
    thread every quarter of `stale_after`, removed at the end if it is still this run's."""

    def __init__(self, path: Location, stale_after: float = LOCK_STALE_SECONDS):
        self.path, self.stale_after = path, stale_after
        self.record = {
            "host": platform.node(),
            "pid": os.getpid(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        if not self._create():
            holder = self._read()
            if holder is not None and not self._is_stale(holder):
                raise FgdataError(self._refusal(holder))
            if holder is not None:
                log.warning("%s: taking over the lock of a dead run (host %s, pid %s, since %s)", self.path.parent, holder.get("host"), holder.get("pid"), holder.get("since"))
            # The stale lock goes only if it is still the one judged stale: a run that took it over
            # meanwhile keeps it (two runs reaching this line in the same instant remain a race).
            if holder is not None and self._read() == holder:
                self.path.unlink(missing_ok=True)
            if not self._create():
                raise FgdataError(self._refusal(self._read() or {}))
        self._heartbeat = threading.Thread(target=self._refresh, name="fgdata-lock", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        holder = self._read()
        if holder is not None and holder.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)

    def _payload(self) -> bytes:
        return json.dumps({**self.record, "refreshed": time.time()}, sort_keys=True).encode()

    def _create(self) -> bool:
        """Writes the lock where there is none; whether this run now holds it."""
        if storage.is_uri(self.path):
            try:
                # the look first, for a store that ignores the PUT's condition (an emulator)
                if self.path.exists():
                    return False
                self.path.fs.pipe_file(self.path.path, self._payload(), mode="create")
            except FileExistsError:
                return False
            except Exception as exc:  # noqa: BLE001 - a store's client errors (no bucket, no permission) are not all OSErrors
                raise FgdataError(f"cannot write to {self.path.parent}: {first_line(exc)}") from None
            return (self._read() or {}).get("token") == self.record["token"]
        tmp = self.path.with_name(f".{self.path.name}{_TMP_TAG}{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_bytes(self._payload())
            os.link(tmp, self.path)  # fails when a lock exists; never shows a half-written one
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # no permission, a read-only disk, a filesystem without hard links
            raise FgdataError(f"cannot write to {self.path.parent}: {first_line(exc)}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # not JSON (a lock is written whole, so a damaged one): stale
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") == platform.node() and isinstance(holder.get("pid"), int) and holder["pid"] > 0 and not _pid_alive(holder["pid"]):
            return True
        refreshed = holder.get("refreshed")
        return not isinstance(refreshed, (int, float)) or time.time() - refreshed > self.stale_after

    def _refusal(self, holder: dict) -> str:
        return (
            f"{self.path.parent} is in use by another fgdata run (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"since {holder.get('since')}); wait for it to end. A killed run's lock is taken over once its pid is gone "
            f"(same host) or {self.stale_after:g}s after its last refresh"
        )

    def _refresh(self) -> None:
        while not self._stop.wait(self.stale_after / 4):
            try:
                if (self._read() or {}).get("token") != self.record["token"]:
                    log.error("%s: this run's lock was taken over by another run; stop one of them", self.path.parent)
                    return
                payload = self._payload()
                storage.write_whole(self.path, lambda tmp: tmp.write_bytes(payload))
            except Exception as exc:  # noqa: BLE001 - a refresh that failed once is tried again next time
                log.warning("%s: could not refresh this run's lock: %s", self.path.parent, first_line(exc))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def unit_fingerprint(settings_hash: str, name: str, payload, shared: str = "") -> str:
    """What one output shard is made from: the settings, the unit's description, and the size and
    modification time (an object's ETag) of the input files it names, so a changed input never passes
    for the old one."""
    digest = hashlib.sha256(f"{settings_hash}\0{shared}\0{name}\0".encode())
    digest.update(repr(payload).encode("utf-8", "surrogateescape"))
    if isinstance(payload, dict):
        for field in ("path", "phrases", "images"):
            if isinstance(payload.get(field), str):
                try:
                    digest.update(f"\0{field}:{storage.signature(payload[field])}".encode())
                except OSError:
                    digest.update(f"\0{field}:missing".encode())
    return digest.hexdigest()[:24]


def record_planned(out_dir: Location, shards: int) -> None:
    """Notes in the run record how many shards the run writes, so an unfinished output can say how
    far it got (`incomplete_note`)."""
    record = read_json(location(out_dir) / RUN_FILE) or {}
    if record.get("shards") != shards:
        write_json(location(out_dir) / RUN_FILE, {**record, "shards": shards})


def mark_unfinished(out_dir: Location) -> None:
    """Makes `out_dir` fail to load until `mark_finished`: a run starts (or resumes) writing it."""
    write_text(
        location(out_dir) / DATA_DIR / INCOMPLETE_FILE,
        f"Not Parquet: the fgdata run writing {out_dir} has not finished, so its train/ holds only part of the rows.\n"
        f"`fgdata info {out_dir}` says how far it got; rerun the command that writes it to finish it.\n",
    )


def mark_finished(out_dir: Location) -> None:
    (location(out_dir) / DATA_DIR / INCOMPLETE_FILE).unlink(missing_ok=True)


def incomplete_note(dataset_dir: Location) -> str:
    """What `fgdata info` says of a dataset without its manifest: a run that has not finished, whose
    `train/` (what `datasets.load_dataset` reads) holds part of the rows or none."""
    planned = (read_json(location(dataset_dir) / RUN_FILE) or {}).get("shards")
    of = f" of {planned}" if isinstance(planned, int) else ""
    return (
        f"{dataset_dir}: INCOMPLETE: {len(finished_shards(dataset_dir))}{of} shards done, no {MANIFEST_FILE}; "
        "do not load it (its train/ holds only part of the rows): rerun the command that writes it to finish it"
    )


def unfinished_reason(dataset_dir: Location) -> str | None:
    """Why a dataset fgdata was writing is not finished yet, or None. A directory without fgdata's
    run record is someone else's (their own Parquet shards, a caption folder): not judged here."""
    dataset_dir = location(dataset_dir)
    if not dataset_dir.is_dir() or read_json(dataset_dir / RUN_FILE) is None:
        return None
    if read_json(dataset_dir / MANIFEST_FILE) is None:
        return f"it has no {MANIFEST_FILE} (its run did not complete)"
    finished = finished_shards(dataset_dir)  # one listing, not a look-up per shard (each a request on a store)
    missing = sorted(p.name for p in shards_folder(dataset_dir).glob("part-*.parquet") if p.name not in finished)
    if missing:
        return f"{len(missing)} shard(s) have no completion marker (e.g. {missing[0]})"
    return None


def lineage_entry(dataset_dir: Location, **extra) -> dict:
    """How a manifest records an input dataset: its path, the stage that wrote it, and its own inputs."""
    upstream = read_json(location(dataset_dir) / MANIFEST_FILE) if location(dataset_dir).is_dir() else None
    upstream = upstream or {}
    return {"path": str(dataset_dir), "stage": upstream.get("stage"), "inputs": upstream.get("inputs", []), **extra}


def find_ancestor(dataset_dir: Location, kind: str, _seen: frozenset = frozenset()) -> Location | None:
    """The nearest dataset of `kind` that `dataset_dir` descends from, following manifest lineage."""
    here = storage.resolved(dataset_dir)
    if here in _seen:  # a manifest naming itself or a descendant as its input
        raise FgdataError(f"{here / MANIFEST_FILE}: corrupt fgdata metadata (its lineage loops back to {here})")
    manifest = read_json(here / MANIFEST_FILE) if here.is_dir() else None
    if manifest is None:
        return None
    if manifest.get("kind") == kind:
        return location(dataset_dir)
    parents = manifest.get("inputs", [])
    if not isinstance(parents, list) or not all(isinstance(p, dict) for p in parents):
        raise FgdataError(f"{here / MANIFEST_FILE}: corrupt fgdata metadata ('inputs' is not a list of objects)")
    for parent in parents:
        path = parent.get("path")
        found = find_ancestor(location(path), kind, _seen | {here}) if isinstance(path, str) and "\0" not in path else None
        if found:
            return found
    return None
