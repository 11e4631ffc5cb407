import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import FGDATA, assert_dataset_invariants, make_config, run_cli, write_caption_shard

from pipeline.core.shards import finished_shards
from pipeline.errors import StageFailed
from pipeline.runner import run_stage
from pipeline.stages.fggrn.phrases import PhrasesStage


def corrupt_data_pages(path: Path) -> None:
    """Breaks the caption column's data but keeps the footer, so the up-front schema check passes."""
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(1)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_shard_failing_after_retries_is_reported_and_others_stay_finished(tmp_path, executor):
    source = tmp_path / "in"
    for shard in range(3):
        write_caption_shard(source / f"part-{shard:05d}.parquet", [{"key": f"{shard}-{i}", "short_caption": "a red car"} for i in range(50)])
    original = (source / "part-00001.parquet").read_bytes()
    corrupt_data_pages(source / "part-00001.parquet")
    out = tmp_path / "out"
    with pytest.raises(StageFailed) as failed:
        run_stage(PhrasesStage(source), out, make_config("run.max_retries=1", f"run.executor={executor}"))
    assert list(failed.value.failures) == ["part-00001.parquet"]
    assert "part-00001.parquet" in str(failed.value) and "rerun the same command" in str(failed.value)
    assert finished_shards(out) == {"part-00000.parquet", "part-00002.parquet"}
    assert not (out / "_manifest.json").exists()

    (source / "part-00001.parquet").write_bytes(original)  # the user fixes the file and reruns
    summary = run_stage(PhrasesStage(source), out, make_config(f"run.executor={executor}"))
    assert (summary.shards_run, summary.shards_skipped, summary.rows_out) == (1, 2, 150)
    assert_dataset_invariants(out)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"no Ray head listening on port {port}")


@pytest.mark.slow
def test_joins_an_existing_cluster_named_by_ray_address(tmp_path):
    port = free_port()
    ray_cli = str(Path(sys.executable).parent / "ray")
    # --block keeps the head in this process group, so killing the group stops exactly this
    # cluster (`ray stop` would also stop the Ray the other tests share).
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_port(port)
        write_caption_shard(tmp_path / "in" / "part-00000.parquet", [{"key": "a", "short_caption": "a dog on a sofa"}])
        # Ray's token authentication, on by default, needs the mode set before the driver loads Ray
        # (an earlier test's in-process Ray sets it in this process; a user's shell has it unset)
        unset = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
        refused = subprocess.run([str(FGDATA), "phrases", str(tmp_path / "in"), str(tmp_path / "refused")], env={**unset, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert "export RAY_AUTH_MODE=token" in refused.stderr.splitlines()[-1]
        result = run_cli("phrases", str(tmp_path / "in"), str(tmp_path / "out"), env_extra={"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token"})
        assert result.returncode == 0, result.stderr
        assert f"connecting to the Ray cluster at 127.0.0.1:{port}" in result.stderr
        assert "Ray cluster: 1 node(s), 1 CPU(s)" in result.stderr  # not a fresh local Ray with 2
        assert_dataset_invariants(tmp_path / "out", expected_keys={"a"})
    finally:
        # SIGKILL: every process of this cluster is in the group and ends at once (SIGTERM makes the
        # head stop them one by one, 30 s here); nothing of it is read afterwards
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)


@pytest.mark.parametrize(
    "address, says",
    [
        ("closed", "Connection refused"),  # was over 5 minutes of Ray waiting for a GCS that is not there
        ("head-node", "not host:port"),
    ],
)
def test_a_ray_address_where_no_cluster_answers_is_one_line_naming_it(address, says, tmp_path):
    if address == "closed":
        address = f"127.0.0.1:{free_port()}"
    write_caption_shard(tmp_path / "in" / "part-00000.parquet", [{"key": "a", "short_caption": "a dog on a sofa"}])
    started = time.monotonic()
    result = run_cli("phrases", str(tmp_path / "in"), str(tmp_path / "out"), env_extra={"RAY_ADDRESS": address}, timeout=120)
    assert time.monotonic() - started < 30, f"took {time.monotonic() - started:.0f}s"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: cannot use the Ray cluster at {address} (RAY_ADDRESS): {errors[0].rsplit(': ', 1)[-1]}"], result.stderr
    assert says in errors[0]
    assert not finished_shards(tmp_path / "out")


def test_model_pools_fill_the_gpus_by_tensor_parallel_group():
    from pipeline.config import RecaptionConfig
    from pipeline.stages.base import ModelPool, model_pool

    settings = RecaptionConfig()
    assert model_pool(settings, cluster_gpus=0) == ModelPool(actors=1, gpus_per_actor=0.0, cpus_per_actor=1.0)
    assert model_pool(settings, cluster_gpus=8) == ModelPool(actors=8, gpus_per_actor=1.0, cpus_per_actor=1.0)
    assert model_pool(settings, cluster_gpus=8, gpus_per_replica=4) == ModelPool(actors=2, gpus_per_actor=4.0, cpus_per_actor=1.0)
    settings.num_actors = 3
    assert model_pool(settings, cluster_gpus=8).actors == 3


def test_the_manifest_records_the_library_versions_the_shards_were_made_with(tmp_path, monkeypatch):
    from importlib import metadata

    from pipeline import __version__, runner
    from pipeline.core.shards import read_json

    real_version = metadata.version

    def version(package):
        if package == "vllm":  # the optional extra, as on a machine without it
            raise metadata.PackageNotFoundError(package)
        return real_version(package)

    monkeypatch.setattr(runner.metadata, "version", version)
    write_caption_shard(tmp_path / "in" / "part-00000.parquet", [{"key": "a", "short_caption": "a red car"}])
    run_stage(PhrasesStage(tmp_path / "in"), tmp_path / "out", make_config())
    versions = read_json(tmp_path / "out" / "_manifest.json")["versions"]
    assert versions["fgdata"] == __version__ and versions["vllm"] is None
    for package in ("torch", "transformers", "ultralytics", "ray", "pyarrow", "spacy"):
        assert versions[package] == real_version(package), package
