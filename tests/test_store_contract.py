"""The shard contract, input fingerprints and --overwrite safety on both object stores the tests can
run: `s3://` against moto's server (tests/object_store.py) and `gs://` against gcp-storage-emulator
(tests/gcs_store.py), both on 127.0.0.1, reached through s3fs and gcsfs. Every test runs once per
store: the rules must not depend on which one holds the data."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest
from gcs_store import gcs_bucket, gcs_server  # noqa: F401 (fixtures)
from object_store import all_objects, bucket, put_object, s3_server  # noqa: F401 (fixtures)

from pipeline.core import storage
from pipeline.core.schemas import conform
from pipeline.core.shards import (
    DONE_DIR,
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

SERVERS = {"s3": ("s3_server", "bucket"), "gs": ("gcs_server", "gcs_bucket")}


@pytest.fixture(params=list(SERVERS))
def store(request) -> str:
    """A fresh bucket's URI on one store."""
    return request.getfixturevalue(SERVERS[request.param][1])


def key(uri: str) -> str:
    """An object's key as the store lists it (the URI without its scheme)."""
    return uri.split("://", 1)[1]


def phrase_table(*keys: str) -> pa.Table:
    rows = [{"key": k, "short_caption": "a red car", "long_caption": None, "phrase_source": "short_caption", "phrases": [], "spacy_model": "x"} for k in keys]
    return conform(rows, "phrases")


# --- the shard contract ---------------------------------------------------------------------


def test_shard_is_written_data_first_marker_last_and_leaves_no_temporary_objects(store, monkeypatch):
    out = f"{store}/phrases"
    written = []
    real = storage.write_whole
    monkeypatch.setattr(storage, "write_whole", lambda final, write, *a: (written.append(str(final)), real(final, write, *a)))
    write_shard(out, "part-00000.parquet", phrase_table(), "phrases", [], {"rows_in": 0}, marker="m0")  # every row rejected
    assert written[-1] == f"{out}/{DONE_DIR}/part-00000.parquet.done"
    written.clear()
    table = phrase_table("a")
    rejects = [{"key": "b", "reason": "empty_caption", "detail": "no text", "source": "x"}]
    stats = write_shard(out, "part-00001.parquet", table, "phrases", rejects, {"rows_in": 2}, marker="fingerprint-1")
    data = f"{out}/train/part-00001.parquet"
    assert written == [data, f"{out}/{REJECTS_DIR}/part-00001.parquet", f"{out}/{STATS_DIR}/part-00001.json", f"{out}/{DONE_DIR}/part-00001.parquet.done"]
    assert stats == {"rows_in": 2} and finished_shards(out) == {"part-00000.parquet", "part-00001.parquet"}
    assert [str(p) for p in list_shards(out)] == [f"{out}/train/part-00000.parquet", data]
    assert read_shard(data).to_pylist() == table.to_pylist()
    assert read_shard(f"{out}/train/part-00000.parquet").num_rows == 0
    assert read_rejects(out).column("reason").to_pylist() == ["empty_caption"]
    assert read_json(f"{out}/{STATS_DIR}/part-00001.json") == {"rows_in": 2}
    assert storage.location(f"{out}/{DONE_DIR}/part-00001.parquet.done").read_text() == "fingerprint-1"
    assert not [name for name in all_objects(out) if storage.TMP_TAG in name]


def test_a_shard_without_its_marker_is_not_done(store):
    out = f"{store}/phrases"
    claim_output(out, "phrases", "h", overwrite=False)
    put_object(f"{out}/train/part-00000.parquet", b"half a shard a killed worker left")
    assert finished_shards(out) == set()
    write_shard(out, "part-00000.parquet", phrase_table("a"), "phrases", [], {}, marker="m")
    assert finished_shards(out) == {"part-00000.parquet"}
    assert read_shard(shard_path(out, "part-00000.parquet")).column("key").to_pylist() == ["a"]  # the half shard was replaced


def test_fingerprint_follows_the_object_not_its_name(store):
    uri = f"{store}/captions/part-00000.parquet"
    put_object(uri, b"one")
    first = unit_fingerprint("h", "part-00000.parquet", {"path": uri})
    assert unit_fingerprint("h", "part-00000.parquet", {"path": uri}) == first
    put_object(uri, b"two")  # same size, other content: the ETag (GCS: etag/md5Hash) differs
    changed = unit_fingerprint("h", "part-00000.parquet", {"path": uri})
    storage.location(uri).unlink()
    assert len({first, changed, unit_fingerprint("h", "part-00000.parquet", {"path": uri})}) == 3


# --- --overwrite and the run record on a store ----------------------------------------------


def test_overwrite_refuses_a_prefix_fgdata_did_not_write(store):
    put_object(f"{store}/thesis/chapter1.tex", b"years of work")
    before = all_objects(store)
    with pytest.raises(FgdataError, match="not written by fgdata"):
        claim_output(f"{store}/thesis", "ingest", "h", overwrite=True)
    with pytest.raises(FgdataError, match="is not empty and was not written by fgdata"):
        claim_output(f"{store}/thesis", "ingest", "h", overwrite=False)
    assert all_objects(store) == before


def test_overwrite_deletes_only_what_fgdata_wrote_under_its_own_prefix(store):
    out = f"{store}/out"
    claim_output(out, "phrases", "h", overwrite=False)
    write_shard(out, "part-00000.parquet", phrase_table("a"), "phrases", [], {}, marker="m")
    put_object(f"{out}/notes.md", b"mine")
    with pytest.raises(FgdataError, match=r"holds files fgdata did not write \(notes.md\)"):
        claim_output(out, "phrases", "h", overwrite=True)
    assert key(f"{out}/notes.md") in all_objects(out)
    storage.location(f"{out}/notes.md").unlink()
    put_object(f"{store}/out2/keep.txt", b"a neighbour whose name starts like OUT")
    put_object(f"{store}/keep.txt", b"beside OUT")
    with pytest.raises(FgdataError, match="already holds output of stage 'phrases'"):
        claim_output(out, "phrases", "other-settings", overwrite=False)
    claim_output(out, "phrases", "other-settings", overwrite=True)
    assert sorted(all_objects(store)) == sorted(key(u) for u in (f"{store}/keep.txt", f"{store}/out2/keep.txt", f"{out}/{RUN_FILE}"))
    assert read_json(f"{out}/{RUN_FILE}")["settings_hash"] == "other-settings"


def test_output_and_input_prefixes_never_overlap(store):
    source = f"{store}/data/images"
    for out, why in [(source, "is the input itself"), (f"{source}/phrases", "is inside the input"), (f"{store}/data", "holds the input"), (store, "is a whole bucket")]:
        with pytest.raises(FgdataError, match=why):
            claim_output(out, "phrases", "h", overwrite=True, inputs=[storage.location(source)])
    put_object(f"{store}/a-file", b"x")
    with pytest.raises(FgdataError, match="is a file"):
        claim_output(f"{store}/a-file", "phrases", "h", overwrite=False)


@pytest.mark.parametrize("scheme", list(SERVERS))
def test_missing_bucket_is_a_one_line_error(request, scheme):
    request.getfixturevalue(SERVERS[scheme][0])
    with pytest.raises(FgdataError, match=f"cannot write to {scheme}://no-such-bucket-") as error:
        claim_output(f"{scheme}://no-such-bucket-{uuid.uuid4().hex[:8]}/out", "phrases", "h", overwrite=False)
    assert "\n" not in str(error.value)
