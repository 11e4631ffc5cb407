"""A real Google Cloud Storage API for tests: gcp-storage-emulator (GCS's JSON API, in memory) on
127.0.0.1, reached through gcsfs with the endpoint in STORAGE_EMULATOR_HOST, the variable Google's
own clients read, as fake-gcs-server or GCS itself would be. A test module takes it with
`from gcs_store import gcs_bucket, gcs_server` (both fixtures)."""

from __future__ import annotations

import socket
import uuid

import fsspec
import pytest
from fsspec.registry import _registry as fsspec_classes  # the classes fsspec resolved, by protocol
import ray

from pipeline.core import storage

# What gcsfs needs to talk to an emulator, as environment (for subprocesses and Ray workers):
# - STORAGE_EMULATOR_HOST: the endpoint (gcsfs and google-cloud-storage both read it);
# - FSSPEC_GS_TOKEN=anon: no credentials (fsspec's per-protocol defaults from the environment);
#   otherwise gcsfs first probes for gcloud credentials and the GCE metadata server;
# - GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs >= 2025.10 otherwise asks the gRPC Storage
#   Control API for each bucket's layout, which an emulator does not serve (a 60 s timeout per
#   bucket before it falls back to the JSON API this uses anyway).
def _emulator_environment(endpoint: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": endpoint, "FSSPEC_GS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def gcs_server():
    """The emulator on a free port of 127.0.0.1 for this module, with the environment above (which
    subprocesses and Ray workers inherit); this process gets the same settings directly, since
    fsspec read its environment and gcsfs chose its class when they were imported."""
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in _emulator_environment(endpoint).items():
                env.setenv(name, value)
            env.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
            from gcsfs.core import GCSFileSystem  # the JSON-API filesystem, whatever gcsfs exports

            env.setitem(fsspec.config.conf, "gs", {**fsspec.config.conf.get("gs", {}), "token": "anon"})
            for protocol in GCSFileSystem.protocol:
                env.setitem(fsspec_classes, protocol, GCSFileSystem)
            # a Ray that an earlier test module started in this process has workers without this
            # environment; the next run starts one whose workers inherit it (and it ends with the module)
            ray.shutdown()
            GCSFileSystem.clear_instance_cache()
            yield endpoint
            ray.shutdown()
            GCSFileSystem.clear_instance_cache()  # their sessions point at this server
    finally:
        server.stop()  # its thread is not a daemon: pytest would never exit


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    name = f"fgdata-{uuid.uuid4().hex[:10]}"
    storage.location(f"gs://{name}").fs.mkdir(name)
    return f"gs://{name}"
