"""Datasets on Google Cloud Storage (`gs://`), against GCS's JSON API served by gcp-storage-emulator
on 127.0.0.1 and reached through gcsfs, as test_object_storage.py does for s3:// against moto. GCS
differs from S3 where it matters here: no rename, no folders (a "directory" is a shared prefix),
content tags are md5Hash/etag plus a generation number. The shard contract, --overwrite safety,
input fingerprints and a CLI run (subprocess, Ray workers) hold there as on a local disk."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest
from conftest import SAMPLE_IMAGES, run_cli
from gcs_store import gcs_bucket, gcs_server  # noqa: F401 (fixtures)
from object_store import all_objects, assert_s3_invariants, put_object, s3_rows

from pipeline.core import storage
from pipeline.core.schemas import conform
from pipeline.core.shards import (
    DONE_DIR,
    MANIFEST_FILE,
    REJECTS_DIR,
    RUN_FILE,
    STATS_DIR,
    claim_output,
    finished_shards,
    list_shards,
    read_json,
    read_rejects,
    read_shard,
    shard_path,
    unit_fingerprint,
    write_shard,
)
from pipeline.errors import FgdataError


def phrase_table(*keys: str) -> pa.Table:
    rows = [{"key": k, "short_caption": "a red car", "long_caption": None, "phrase_source": "short_caption", "phrases": [], "spacy_model": "x"} for k in keys]
    return conform(rows, "phrases")


def test_gs_uris_reach_the_emulator_through_gcsfs(gcs_bucket):
    from gcsfs.core import GCSFileSystem

    place = storage.location(f"{gcs_bucket}/a/b.txt")
    assert storage.is_uri(place) and isinstance(place.fs, GCSFileSystem)
    place.write_text("hello")  # no folder to make first: the object's name holds its prefix
    assert storage.location(f"{gcs_bucket}/a").is_dir() and [p.name for p in storage.location(gcs_bucket).iterdir()] == ["a"]
    assert all_objects(gcs_bucket) == {f"{gcs_bucket}/a/b.txt".removeprefix("gs://"): b"hello"}


# --- the shard contract ---------------------------------------------------------------------


def test_shard_is_written_data_first_marker_last_and_leaves_no_temporary_objects(gcs_bucket, monkeypatch):
    out = f"{gcs_bucket}/phrases"
    written = []
    real = storage.write_whole
    monkeypatch.setattr(storage, "write_whole", lambda final, write, *a: (written.append(str(final)), real(final, write, *a)))
    table = phrase_table("a")
    rejects = [{"key": "b", "reason": "empty_caption", "detail": "no text", "source": "x"}]
    stats = write_shard(out, "part-00001.parquet", table, "phrases", rejects, {"rows_in": 2}, marker="fingerprint-1")
    data = str(shard_path(out, "part-00001.parquet"))
    assert written == [data, f"{out}/{REJECTS_DIR}/part-00001.parquet", f"{out}/{STATS_DIR}/part-00001.json", f"{out}/{DONE_DIR}/part-00001.parquet.done"]
    assert stats == {"rows_in": 2} and finished_shards(out) == {"part-00001.parquet"}
    assert [str(p) for p in list_shards(out)] == [data]
    assert read_shard(data).to_pylist() == table.to_pylist()
    assert read_rejects(out).column("reason").to_pylist() == ["empty_caption"]
    assert read_json(f"{out}/{STATS_DIR}/part-00001.json") == {"rows_in": 2}
    assert storage.location(f"{out}/{DONE_DIR}/part-00001.parquet.done").read_text() == "fingerprint-1"
    assert not [key for key in all_objects(out) if storage.TMP_TAG in key]


def test_a_shard_without_its_marker_is_not_done(gcs_bucket):
    out = f"{gcs_bucket}/phrases"
    claim_output(out, "phrases", "h", overwrite=False)
    put_object(str(shard_path(out, "part-00000.parquet")), b"half a shard a killed worker left")
    assert finished_shards(out) == set()
    write_shard(out, "part-00000.parquet", phrase_table("a"), "phrases", [], {}, marker="m")
    assert finished_shards(out) == {"part-00000.parquet"}
    assert read_shard(shard_path(out, "part-00000.parquet")).column("key").to_pylist() == ["a"]  # the half shard was replaced


def test_fingerprint_follows_the_object_not_its_name(gcs_bucket):
    uri = f"{gcs_bucket}/captions/part-00000.parquet"
    put_object(uri, b"one")
    first = unit_fingerprint("h", "part-00000.parquet", {"path": uri})
    assert unit_fingerprint("h", "part-00000.parquet", {"path": uri}) == first
    put_object(uri, b"two")  # same size, other content: GCS's etag/md5Hash differs
    changed = unit_fingerprint("h", "part-00000.parquet", {"path": uri})
    storage.location(uri).unlink()
    assert len({first, changed, unit_fingerprint("h", "part-00000.parquet", {"path": uri})}) == 3


# --- --overwrite and the run record on GCS --------------------------------------------------


def test_overwrite_refuses_a_prefix_fgdata_did_not_write(gcs_bucket):
    put_object(f"{gcs_bucket}/thesis/chapter1.tex", b"years of work")
    before = all_objects(gcs_bucket)
    with pytest.raises(FgdataError, match="not written by fgdata"):
        claim_output(f"{gcs_bucket}/thesis", "ingest", "h", overwrite=True)
    with pytest.raises(FgdataError, match="is not empty and was not written by fgdata"):
        claim_output(f"{gcs_bucket}/thesis", "ingest", "h", overwrite=False)
    assert all_objects(gcs_bucket) == before


def test_overwrite_deletes_only_what_fgdata_wrote_under_its_own_prefix(gcs_bucket):
    out = f"{gcs_bucket}/out"
    claim_output(out, "phrases", "h", overwrite=False)
    write_shard(out, "part-00000.parquet", phrase_table("a"), "phrases", [], {}, marker="m")
    put_object(f"{out}/notes.md", b"mine")
    with pytest.raises(FgdataError, match=r"holds files fgdata did not write \(notes.md\)"):
        claim_output(out, "phrases", "h", overwrite=True)
    assert f"{out}/notes.md".removeprefix("gs://") in all_objects(out)
    storage.location(f"{out}/notes.md").unlink()
    put_object(f"{gcs_bucket}/out2/keep.txt", b"a neighbour whose name starts like OUT")
    put_object(f"{gcs_bucket}/keep.txt", b"beside OUT")
    with pytest.raises(FgdataError, match="already holds output of stage 'phrases'"):
        claim_output(out, "phrases", "other-settings", overwrite=False)
    claim_output(out, "phrases", "other-settings", overwrite=True)
    left = all_objects(gcs_bucket)
    assert sorted(left) == sorted(k.removeprefix("gs://") for k in (f"{gcs_bucket}/keep.txt", f"{gcs_bucket}/out2/keep.txt", f"{out}/{RUN_FILE}"))
    assert read_json(f"{out}/{RUN_FILE}")["settings_hash"] == "other-settings"


def test_output_that_is_an_object_or_overlaps_the_input_is_refused(gcs_bucket):
    source = f"{gcs_bucket}/images"
    for out, why in [(source, "is the input itself"), (f"{source}/phrases", "is inside the input"), (gcs_bucket, "holds the input")]:
        with pytest.raises(FgdataError, match=why):
            claim_output(out, "phrases", "h", overwrite=True, inputs=[storage.location(source)])
    put_object(f"{gcs_bucket}/a-file", b"x")
    with pytest.raises(FgdataError, match="is a file"):
        claim_output(f"{gcs_bucket}/a-file", "phrases", "h", overwrite=False)


def test_missing_bucket_is_a_one_line_error(gcs_server):
    with pytest.raises(FgdataError, match="cannot write to gs://no-such-bucket-") as error:
        claim_output(f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/out", "phrases", "h", overwrite=False)
    assert "\n" not in str(error.value)


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
