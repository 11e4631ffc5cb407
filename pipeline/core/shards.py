"""Parquet shard datasets: atomic writes, completion markers, resume, manifests.

A dataset directory holds its shards in `train/part-NNNNN.parquet`, `_rejects/part-NNNNN.parquet`,
`_stats/part-NNNNN.json`, completion markers `_done/part-NNNNN.done`, `_run.json` (the stage
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
import os
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.core.schemas import conform, validate_table
from pipeline.core.storage import Location, location
from pipeline.errors import FgdataError, first_line

DATA_DIR = "train"
REJECTS_DIR = "_rejects"
STATS_DIR = "_stats"
DONE_DIR = "_done"
RUN_FILE = "_run.json"
MANIFEST_FILE = "_manifest.json"
_TMP_TAG = storage.TMP_TAG
# What fgdata writes in a dataset directory: --overwrite deletes these and nothing else.
DATASET_ENTRIES = (DATA_DIR, "part-*.parquet", REJECTS_DIR, STATS_DIR, DONE_DIR, RUN_FILE, MANIFEST_FILE, "DATACARD.md", f".*{_TMP_TAG}*", "_download")
# What `train` and `hierarcaps distill` write: the model (save_pretrained), checkpoints and the report.
MODEL_DIR_ENTRIES = (RUN_FILE, "checkpoints", "*.json", "*.safetensors", "*.txt", "*.model", f".*{_TMP_TAG}*")


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
    return pq.ParquetFile(place.fs.open(place.path, "rb", cache_type="none"), metadata=metadata)


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
    the prefix: `_run.json` under it, nothing else under it, apart from every input.
    """
    out_dir = check_output_path(out_dir, inputs)
    if overwrite and out_dir.exists():
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
    if owner is None and out_dir.is_dir() and any(out_dir.iterdir()):
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


def check_output_path(out_dir: Location, inputs: list[Location] = ()) -> Location:
    """OUT must be a directory (or not exist yet), not a symlink, and apart from every input:
    neither inside one nor holding one. Returns it resolved."""
    if storage.is_uri(out_dir):
        return _check_output_uri(location(out_dir), inputs)
    given = Path(os.path.abspath(out_dir))  # absolute, symlinks not followed
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
        source = Path(source).resolve()
        if resolved == source:
            raise FgdataError(f"{out_dir} is the input itself; write the output to another directory")
        if resolved.is_relative_to(source):
            raise FgdataError(f"{out_dir} is inside the input {source}; write the output outside it")
        if source.is_relative_to(resolved):
            raise FgdataError(f"{out_dir} holds the input {source}; write the output to a directory apart from it")
    return resolved


def _check_output_uri(out_dir: Location, inputs: list[Location]) -> Location:
    """check_output_path on an object store: there are no symlinks, but a key may be an object
    and a prefix at once, so OUT must not be an object, and prefixes decide what is inside what."""
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
    """Deletes what fgdata wrote in `out_dir` (for --overwrite), after proving it wrote all of it."""
    if read_json(out_dir / RUN_FILE) is None:
        raise FgdataError(
            f"{out_dir} was not written by fgdata (it has no {RUN_FILE}), so --overwrite will not delete it; "
            "choose a new output directory"
        )
    entries = sorted(out_dir.iterdir())
    foreign = [e.name for e in entries if not any(fnmatch.fnmatchcase(e.name, pattern) for pattern in owned)]
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
