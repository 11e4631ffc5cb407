"""A real S3-compatible store for tests: moto's server mode on 127.0.0.1, reached through s3fs
with the endpoint and credentials in the standard AWS_* environment, as MinIO or S3 itself would
be. A test module takes it with `from object_store import bucket, s3_server` (both fixtures)."""

from __future__ import annotations

import uuid

import pytest
import ray

from pipeline.core import storage
from pipeline.core.shards import MANIFEST_FILE, REJECTS_DIR, STATS_DIR, finished_shards, list_shards, read_json, read_rejects, read_shard


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free port of 127.0.0.1; AWS_ENDPOINT_URL and dummy credentials in the
    environment for this module (subprocesses and Ray workers inherit them)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # a Ray that an earlier test module started in this process has workers without these
        # variables; the next run starts one whose workers inherit them (and it ends with the module)
        ray.shutdown()
        yield f"http://{host}:{port}"
        ray.shutdown()
        from s3fs import S3FileSystem

        S3FileSystem.clear_instance_cache()  # their clients point at this server
    server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"fgdata-{uuid.uuid4().hex[:10]}"
    storage.location(f"s3://{name}").fs.mkdir(name)
    return f"s3://{name}"


def put_object(uri: str, data: bytes) -> None:
    place = storage.location(uri)
    with place.fs.open(place.path, "wb") as handle:
        handle.write(data)


def all_objects(uri: str) -> dict[str, bytes]:
    place = storage.location(uri)
    return {key: place.fs.cat_file(key) for key in sorted(place.fs.find(place.path))}


def s3_rows(dataset: str) -> list[dict]:
    return [row for shard in list_shards(dataset) for row in read_shard(shard).to_pylist()]


def assert_s3_invariants(dataset: str, expected_keys: set[str]) -> None:
    """As conftest.assert_dataset_invariants, read through the store: markers, stats that add up,
    no key twice, every input key in the output or the rejects."""
    place = storage.location(dataset)
    finished = finished_shards(dataset)
    keys: list[str] = []
    for shard in list_shards(dataset):
        assert shard.name in finished, f"{shard.name} has no completion marker"
        stats = read_json(place / STATS_DIR / shard.name.replace(".parquet", ".json"))
        rows_out = read_shard(shard).num_rows
        rows_rejected = read_shard(place / REJECTS_DIR / shard.name).num_rows
        assert (stats["rows_out"], stats["rows_rejected"]) == (rows_out, rows_rejected)
        assert stats["rows_in"] == rows_out + rows_rejected
        keys += read_shard(shard, columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)), "a key appears twice in the output"
    assert read_json(place / MANIFEST_FILE)["rows_out"] == len(keys)
    assert set(keys) | {r["key"] for r in read_rejects(dataset).to_pylist()} == expected_keys
