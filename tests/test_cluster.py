"""A stage on a real multi-node Ray cluster (three Ray nodes on this machine, each its own raylet
and object store), joined by the CLI through RAY_ADDRESS as a user's job would be. One worker node
is SIGKILLed mid-run: with retries its shard is redone on the surviving node and the dataset comes
out whole in the same run; without retries the run fails cleanly and a rerun finishes it. Nothing
lost, nothing duplicated either way."""

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from conftest import FGDATA, assert_dataset_invariants, wait_for, write_caption_shard
from synthetic import synthetic_captions

from pipeline.core.shards import DONE_DIR, finished_shards, read_json

SHARDS, ROWS_PER_SHARD = 40, 40
RUN_TIMEOUT = 300  # seconds for the whole CLI run, kill and retries included


@pytest.fixture
def cluster(monkeypatch):
    """A head node with no CPUs (it holds the GCS and the driver's objects, like a login node)
    and two 1-CPU worker nodes, so every shard runs on a worker node. All of it is torn down
    in the finally, whatever the test did."""
    from ray.cluster_utils import Cluster

    # a short, private temp dir: Ray's socket paths must stay under 108 bytes, and the
    # session files of the other Ray instances on this machine are left alone
    private_root = tempfile.mkdtemp(prefix="fgray-", dir="/tmp")
    temp_dir = os.path.join(private_root, "ray")
    os.mkdir(temp_dir)
    # Ray writes the cluster's address for a bare `ray.init()` to find under its temp root:
    # kept private too, so no other Ray user on this machine joins this cluster by accident
    monkeypatch.setenv("RAY_TMPDIR", private_root)
    cluster = Cluster(shutdown_at_exit=True)
    try:
        cluster.add_node(num_cpus=0, temp_dir=temp_dir, include_dashboard=False)
        workers = [cluster.add_node(num_cpus=1, temp_dir=temp_dir) for _ in range(2)]
        cluster.wait_for_nodes(timeout=60)
        yield cluster, workers
    finally:
        try:
            cluster.shutdown()
        finally:
            shutil.rmtree(private_root, ignore_errors=True)


@pytest.fixture
def caption_shards(tmp_path):
    root = tmp_path / "captions"
    captions = synthetic_captions(SHARDS * ROWS_PER_SHARD, seed=11)
    for shard in range(SHARDS):
        rows = [{"key": f"{shard:02d}-{i:04d}", "short_caption": captions[shard * ROWS_PER_SHARD + i]} for i in range(ROWS_PER_SHARD)]
        rows[0]["short_caption"] = ""  # one reject per shard: rejects are checked for duplicates too
        write_caption_shard(root / f"part-{shard:05d}.parquet", rows)
    return root


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def shard_workers_on(node) -> list[int]:
    """Ray worker processes are the raylet's children and are named after the task they run."""
    ps = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    parent = raylet_pid(node)
    return [int(line.split()[0]) for line in ps.splitlines() if int(line.split()[1]) == parent and "ray::fgdata-phrases" in line]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def phrases_command(source, out, *settings: str) -> list[str]:
    return [str(FGDATA), "phrases", str(source), str(out), "-s", "run.progress=false", "-s", "run.executor=ray", *(arg for s in settings for arg in ("-s", s))]


def run_and_kill_node(ray_cluster, victim, args: list[str], out) -> tuple[subprocess.CompletedProcess, list[str], float]:
    """Runs the CLI against the cluster and SIGKILLs the victim node's raylet while it has a shard
    in hand. Returns the finished run, the shards finished before the kill and the kill time."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    started = time.time()
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        # a few shards done and one being worked on by the victim: the kill lands mid-run
        in_hand = wait_for(lambda: len(finished_shards(out)) >= 3 and shard_workers_on(victim), timeout=120, what="a shard on the victim node")
        finished_before = finished_shards(out)
        killed_at = time.time()
        ray_cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: raylet, object store, agents
        # its workers notice the raylet is gone and exit with the shard unfinished
        wait_for(lambda: not any(pid_alive(pid) for pid in in_hand), timeout=30, what="the dead node's workers to exit")
        stdout, stderr = run.communicate(timeout=RUN_TIMEOUT)
        print(f"node killed {killed_at - started:.1f}s into the run, {len(finished_before)} shards finished, {len(in_hand)} in hand")
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    return subprocess.CompletedProcess(args, run.returncode, stdout, stderr), finished_before, killed_at


def assert_whole(out) -> None:
    keys = {f"{s:02d}-{i:04d}" for s in range(SHARDS) for i in range(ROWS_PER_SHARD)}
    assert_dataset_invariants(out, expected_keys=keys)
    manifest = read_json(out / "_manifest.json")
    assert manifest["rows_in"] == SHARDS * ROWS_PER_SHARD and manifest["rows_rejected"] == SHARDS
    assert not list(out.rglob(".*.tmp-*")), "a killed worker's temporary file was left in the dataset"


@pytest.mark.slow
def test_worker_node_killed_mid_run_is_retried_on_the_survivor(cluster, caption_shards, tmp_path):
    ray_cluster, (victim, _) = cluster
    out = tmp_path / "phrases"
    run, finished_before, killed_at = run_and_kill_node(ray_cluster, victim, phrases_command(caption_shards, out, "run.max_retries=3"), out)
    # one run: the shard the dead node held went back to the queue and was redone elsewhere
    assert run.returncode == 0, run.stderr
    assert "3 node(s)" in run.stderr  # the CLI joined the cluster, it did not start a local Ray
    assert 3 <= len(finished_before) < SHARDS
    after_kill = set(finished_shards(out)) - set(finished_before)
    assert all((out / DONE_DIR / f"{name}.done").stat().st_mtime >= killed_at - 1 for name in after_kill)
    assert_whole(out)


@pytest.mark.slow
def test_worker_node_killed_without_retries_fails_cleanly_then_rerun_resumes(cluster, caption_shards, tmp_path):
    """With retries off the node's shard fails: a one-line error that names it, the finished
    shards kept; the same command on the surviving cluster redoes only what is missing."""
    ray_cluster, (victim, _) = cluster
    out = tmp_path / "phrases"
    command = phrases_command(caption_shards, out, "run.max_retries=0")
    run, _, _ = run_and_kill_node(ray_cluster, victim, command, out)
    assert run.returncode == 1
    assert "NodeDiedError" in run.stderr and "rerun the same command" in run.stderr and "Traceback" not in run.stderr
    # The shard the dead node held is finished or not, depending on whether its worker wrote
    # the marker before the raylet died (then only the reply was lost): the rerun copes with both.
    finished = finished_shards(out)
    assert not (out / "_manifest.json").exists()
    marker_times = {name: (out / DONE_DIR / f"{name}.done").stat().st_mtime_ns for name in finished}

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, env={**os.environ, "RAY_ADDRESS": ray_cluster.address})
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished)} of {SHARDS} shards already finished" in rerun.stderr
    assert {name: (out / DONE_DIR / f"{name}.done").stat().st_mtime_ns for name in finished} == marker_times  # kept, not redone
    assert_whole(out)


def test_node_count_leaves_out_dead_nodes(monkeypatch, caplog):
    """The GCS keeps listing a dead node: the count a user reads on joining must not include it."""
    from pipeline import runner
    from pipeline.config import RunConfig

    nodes = [{"Alive": True}, {"Alive": True}, {"Alive": False}]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setattr(runner.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runner, "ray_address_problem", lambda address: None)  # nothing listens there: ray.init is faked too
    monkeypatch.setattr(runner.ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(runner.ray, "nodes", lambda: nodes)
    monkeypatch.setattr(runner.ray, "cluster_resources", lambda: {"CPU": 1})
    with caplog.at_level("INFO", logger="pipeline.runner"):
        runner.ensure_ray(RunConfig())
    assert "Ray cluster: 2 node(s), 1 CPU(s)" in caplog.text
