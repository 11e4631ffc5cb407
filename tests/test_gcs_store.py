"""Datasets on Google Cloud Storage (`gs://`), against GCS's JSON API served by gcp-storage-emulator
on 127.0.0.1 and reached through gcsfs, as test_object_storage.py does for s3:// against moto. GCS
differs from S3 where it matters here: no rename, no folders (a "directory" is a shared prefix),
content tags are md5Hash/etag plus a generation number. A CLI run (subprocess, Ray workers) holds
there as on a local disk; the shard contract, --overwrite safety and input fingerprints are checked
on gs:// and s3:// alike in test_store_contract.py."""

from __future__ import annotations

import pytest
from conftest import SAMPLE_IMAGES, run_cli
from gcs_store import gcs_bucket, gcs_server  # noqa: F401 (fixtures)
from object_store import all_objects, assert_s3_invariants, s3_rows

from pipeline.core import storage
from pipeline.core.shards import (
    DONE_DIR,
    MANIFEST_FILE,
    list_shards,
    read_json,
    read_rejects,
    read_shard,
    read_shard_schema,
    shard_rows,
)


def test_gs_uris_reach_the_emulator_through_gcsfs(gcs_bucket):
    from gcsfs.core import GCSFileSystem

    place = storage.location(f"{gcs_bucket}/a/b.txt")
    assert storage.is_uri(place) and isinstance(place.fs, GCSFileSystem)
    place.write_text("hello")  # no folder to make first: the object's name holds its prefix
    assert storage.location(f"{gcs_bucket}/a").is_dir() and [p.name for p in storage.location(gcs_bucket).iterdir()] == ["a"]
    assert all_objects(gcs_bucket) == {f"{gcs_bucket}/a/b.txt".removeprefix("gs://"): b"hello"}


def test_reading_shards_on_gs_leaves_no_prefetch_task_to_the_garbage_collector(gcs_bucket, caplog):
    """gcsfs's default cache starts a prefetch task per file, left pending when pyarrow drops the
    file; the garbage collector then destroys it from inside whatever code runs, which once crashed
    CI's test process. fgdata names its read cache, so reads leave nothing behind."""
    import gc

    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = storage.location(f"{gcs_bucket}/data/part-00000.parquet")
    table = pa.table({"key": [f"k{i}" for i in range(5000)], "caption": ["a red bus"] * 5000})
    pq.write_table(table, shard.path, filesystem=shard.fs)
    gc.collect()
    caplog.clear()
    for _ in range(5):
        assert read_shard(shard).equals(table) and shard_rows(shard) == 5000
        assert read_shard_schema(shard) == table.schema and read_shard(shard, columns=["key"]).num_rows == 5000
        gc.collect()
    assert not [r.getMessage() for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


# The shard contract, fingerprints and --overwrite on gs://: tests/test_store_contract.py.


# --- the CLI on GCS -------------------------------------------------------------------------


def _rows(dataset) -> list[dict]:
    # `source` names where an image came from, the same local file in both runs
    return [row for shard in list_shards(dataset) for row in read_shard(shard).to_pylist()]


@pytest.mark.slow
def test_fgdata_ingest_and_phrases_on_gs_equal_the_local_run(gcs_bucket, tmp_path):
    """`fgdata ingest` (the sample's local images) → gs://…/images → `fgdata phrases` on Ray →
    gs://…/phrases, in subprocesses that reach the emulator through the environment alone; the rows
    and rejects equal the same commands on a local disk, a rerun resumes, --overwrite redoes."""
    ingest = ("--set", "ingest.rows_per_shard=8", "-s", "run.progress=false")
    for root in (gcs_bucket, str(tmp_path)):
        result = run_cli("ingest", str(SAMPLE_IMAGES), f"{root}/images", *ingest, "--executor", "local")
        assert result.returncode == 0, result.stderr
    # Ray workers (other processes than the driver) write the phrase shards on the store
    phrases = ("-s", "run.progress=false", "-s", "run.executor=ray", "-s", "run.num_cpus=2")
    result = run_cli("phrases", f"{gcs_bucket}/images", f"{gcs_bucket}/phrases", *phrases)
    assert result.returncode == 0, result.stderr
    local = run_cli("phrases", f"{tmp_path}/images", f"{tmp_path}/phrases", "-s", "run.progress=false", "--executor", "local")
    assert local.returncode == 0, local.stderr

    image_keys = {row["key"] for row in s3_rows(f"{gcs_bucket}/images")}
    rejected = {r["key"] for r in read_rejects(f"{gcs_bucket}/images").to_pylist()}
    assert (len(image_keys), rejected) == (17, {"broken_not_an_image", "broken_truncated"})
    assert len(list_shards(f"{gcs_bucket}/images")) == 3
    assert_s3_invariants(f"{gcs_bucket}/images", image_keys | rejected)
    assert_s3_invariants(f"{gcs_bucket}/phrases", image_keys)
    for name in ("images", "phrases"):
        assert _rows(f"{gcs_bucket}/{name}") == _rows(tmp_path / name)
        assert read_rejects(f"{gcs_bucket}/{name}").to_pylist() == read_rejects(tmp_path / name).to_pylist()
    assert read_json(f"{gcs_bucket}/phrases/{MANIFEST_FILE}")["inputs"][0]["path"] == f"{gcs_bucket}/images"

    again = run_cli("phrases", f"{gcs_bucket}/images", f"{gcs_bucket}/phrases", "-s", "run.progress=false", "--executor", "local")
    assert again.returncode == 0 and "3 already finished" in again.stdout, again.stdout + again.stderr
    marker = storage.location(f"{gcs_bucket}/phrases/{DONE_DIR}/part-00000.parquet.done")
    generation = marker.fs.info(marker.path)["generation"]
    redo = run_cli("phrases", f"{gcs_bucket}/images", f"{gcs_bucket}/phrases", "-s", "run.progress=false", "--executor", "local", "--overwrite")
    assert redo.returncode == 0, redo.stderr
    assert marker.fs.info(marker.path)["generation"] != generation  # deleted and written again, not skipped
    assert _rows(f"{gcs_bucket}/phrases") == _rows(tmp_path / "phrases")
