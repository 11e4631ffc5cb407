"""Parquet shard datasets: atomic writes, completion markers, resume, manifests.

A dataset directory holds `part-NNNNN.parquet` shards, `_rejects/part-NNNNN.parquet`,
`_stats/part-NNNNN.json`, completion markers `_done/part-NNNNN.done`, `_run.json` (the stage
and settings that own the directory) and `_manifest.json`, written last. A shard is finished
when its marker exists; data, rejects and stats are renamed into place before the marker.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import FgdataError
from pipeline.schemas import conform, validate_table

REJECTS_DIR = "_rejects"
STATS_DIR = "_stats"
DONE_DIR = "_done"
RUN_FILE = "_run.json"
MANIFEST_FILE = "_manifest.json"
_TMP_TAG = ".tmp-"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def list_shards(dataset_dir: Path) -> list[Path]:
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FgdataError(f"{dataset_dir} is not a directory of Parquet shards")
    shards = sorted(dataset_dir.glob("part-*.parquet"))
    if not shards:
        raise FgdataError(f"{dataset_dir} holds no part-*.parquet shards")
    return shards


def read_shard_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise FgdataError(f"{path}: not a readable Parquet file ({exc})") from None


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise FgdataError(f"{path}: cannot read shard ({exc})") from None


def finished_shards(out_dir: Path) -> set[str]:
    done = Path(out_dir) / DONE_DIR
    if not done.is_dir():
        return set()
    return {p.name.removesuffix(".done") for p in done.iterdir() if p.name.endswith(".done")}


def _atomic_replace(final: Path, write) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}{_TMP_TAG}{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, payload: dict) -> None:
    _atomic_replace(Path(path), lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"))


def read_json(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def write_shard(out_dir: Path, name: str, table: pa.Table, kind: str, rejects: list[dict], stats: dict) -> None:
    """Validates, then writes data, rejects and stats atomically, and marks the shard done last."""
    out_dir = Path(out_dir)
    validate_table(table, kind, where=f"{out_dir / name} (output)")
    rejects_table = conform(rejects, "rejects")
    _atomic_replace(out_dir / name, lambda tmp: pq.write_table(table, tmp))
    _atomic_replace(out_dir / REJECTS_DIR / name, lambda tmp: pq.write_table(rejects_table, tmp))
    write_json(out_dir / STATS_DIR / name.replace(".parquet", ".json"), stats)
    _atomic_replace(out_dir / DONE_DIR / f"{name}.done", lambda tmp: tmp.write_text(""))


def read_stats(out_dir: Path) -> dict[str, dict]:
    """Per-shard stats of the finished shards, keyed by shard name."""
    out_dir = Path(out_dir)
    return {name: read_json(out_dir / STATS_DIR / name.replace(".parquet", ".json")) for name in sorted(finished_shards(out_dir))}


def read_rejects(dataset_dir: Path) -> pa.Table:
    files = sorted((Path(dataset_dir) / REJECTS_DIR).glob("part-*.parquet"))
    tables = [pq.read_table(f) for f in files]
    return pa.concat_tables(tables) if tables else conform([], "rejects")


def claim_output(out_dir: Path, stage: str, settings_hash: str, overwrite: bool) -> None:
    """Makes `out_dir` ready for `stage`: resumes its own earlier run, refuses anyone else's.

    Resuming with different settings would mix two configurations in one dataset, so it is
    refused unless --overwrite wipes the directory first.
    """
    out_dir = Path(out_dir)
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    owner = read_json(out_dir / RUN_FILE)
    if owner is not None and (owner.get("stage"), owner.get("settings_hash")) != (stage, settings_hash):
        raise FgdataError(
            f"{out_dir} already holds output of stage {owner.get('stage')!r} with other settings "
            f"(hash {owner.get('settings_hash')}, now {settings_hash}); use a new output directory or --overwrite"
        )
    if owner is None and out_dir.is_dir() and any(out_dir.iterdir()):
        raise FgdataError(f"{out_dir} is not empty and was not written by fgdata; use a new output directory or --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.rglob(f".*{_TMP_TAG}*"):
        stale.unlink()
    write_json(out_dir / RUN_FILE, {"stage": stage, "settings_hash": settings_hash})


def lineage_entry(dataset_dir: Path, **extra) -> dict:
    """How a manifest records an input dataset: its path, the stage that wrote it, and its own inputs."""
    upstream = read_json(Path(dataset_dir) / MANIFEST_FILE) or {}
    return {"path": str(dataset_dir), "stage": upstream.get("stage"), "inputs": upstream.get("inputs", []), **extra}


def find_ancestor(dataset_dir: Path, kind: str) -> Path | None:
    """The nearest dataset of `kind` that `dataset_dir` descends from, following manifest lineage."""
    manifest = read_json(Path(dataset_dir) / MANIFEST_FILE)
    if manifest is None:
        return None
    if manifest.get("kind") == kind:
        return Path(dataset_dir)
    for parent in manifest.get("inputs", []):
        found = find_ancestor(Path(parent["path"]), kind) if parent.get("path") else None
        if found:
            return found
    return None
