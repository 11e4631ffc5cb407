"""Shared fixtures: settings that run stages in-process, Ray for the tests about Ray, sample data,
image and shard builders, dataset checks."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import Config, load_config
from pipeline.core.shards import DONE_DIR, STATS_DIR, read_json, read_rejects, shards_folder

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # synthetic captions are shared with the benchmarks
SAMPLE_IMAGES = REPO / "sample" / "images"
FGDATA = Path(sys.executable).parent / "fgdata"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the tests that run stages on it (`make_config("run.executor=ray")`): the
    first such run starts it with make_config's 2 CPUs, later runs reuse it. Started lazily, so a
    test file whose stages all run in-process never pays for Ray."""
    yield
    import ray

    ray.shutdown()


def make_config(*overrides: str) -> Config:
    """Test settings: stages run in-process (the local executor) unless a test asks for Ray."""
    return load_config(None, ["run.progress=false", "run.executor=local", "run.num_cpus=2", *overrides])


def image_bytes(size=(64, 48), fmt="JPEG", color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def png_bytes(side: int = 16) -> bytes:
    """A small square PNG (an image cell of a Hugging Face dataset)."""
    return image_bytes((side, side), "PNG", (0, 128, 255))


def write_caption_shard(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = schema or pa.schema([("key", pa.string()), ("short_caption", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def read_rows(dataset: Path) -> list[dict]:
    return [row for shard in sorted(shards_folder(dataset).glob("part-*.parquet")) for row in pq.read_table(shard).to_pylist()]


def assert_dataset_invariants(dataset: Path, expected_keys: set[str] | None = None) -> None:
    """rows_in == rows_out + rows_rejected per shard, no key twice, every input key accounted for."""
    output_keys: list[str] = []
    for shard in sorted(shards_folder(dataset).glob("part-*.parquet")):
        assert (dataset / DONE_DIR / f"{shard.name}.done").exists(), f"{shard.name} has no completion marker"
        stats = read_json(dataset / STATS_DIR / shard.name.replace(".parquet", ".json"))
        rows_out = pq.read_metadata(shard).num_rows
        rows_rejected = pq.read_metadata(dataset / "_rejects" / shard.name).num_rows
        assert stats["rows_out"] == rows_out and stats["rows_rejected"] == rows_rejected
        assert stats["rows_in"] == rows_out + rows_rejected
        output_keys += pq.read_table(shard, columns=["key"]).column("key").to_pylist()
    assert len(output_keys) == len(set(output_keys)), "a key appears twice in the output"
    manifest = read_json(dataset / "_manifest.json")
    assert manifest["rows_out"] == len(output_keys)
    if expected_keys is not None:
        rejects = read_rejects(dataset).to_pylist()
        rejected_keys = {r["key"] for r in rejects}
        assert set(output_keys) | rejected_keys == expected_keys
        # only the second holder of a key may share it with an output row
        assert not set(output_keys) & {r["key"] for r in rejects if r["reason"] != "duplicate_key"}


def run_cli(*args: str, timeout: float = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Runs the installed `fgdata` console script in a real subprocess."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([str(FGDATA), *args], capture_output=True, text=True, timeout=timeout, env=env)


def wait_for(condition, timeout=120.0, what="condition"):
    """`condition()`'s first true result, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def shard_worker_pids(title: str = "ray::fgdata-phrases") -> list[int]:
    """Ray names a worker process after the task (or actor method) it is running."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if title in line and "ps -eo" not in line]


def kill_run_when(run: subprocess.Popen, condition, timeout: float, what: str) -> None:
    """SIGKILLs a CLI run started in its own session (its whole process group) once `condition`
    holds, then waits until no Ray task or actor worker of it is left, so a rerun starts clean."""
    wait_for(condition, timeout=timeout, what=what)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    wait_for(lambda: not shard_worker_pids("ray::fgdata-") and not shard_worker_pids("ray::ModelWorker"), timeout=60, what="the killed run's workers")


def phrase_precision_recall(labels: list[dict], found_per_caption) -> tuple[float, float, list[str]]:
    """Predicted phrases against hand labels, case aside: precision = correct / predicted, recall =
    correct / labelled over the whole set, and one line per caption whose phrases differ."""
    correct = predicted = labelled = 0
    misses = []
    for item, found in zip(labels, found_per_caption):
        got = {p["text"].lower() for p in found}
        want = {p.lower() for p in item["phrases"]}
        correct += len(got & want)
        predicted += len(got)
        labelled += len(want)
        if got != want:
            misses.append(f"{item['caption'][:200]}\n   extra {sorted(got - want)}  missing {sorted(want - got)}")
    return correct / predicted, correct / labelled, misses
