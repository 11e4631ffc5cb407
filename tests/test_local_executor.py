"""The local executor (`--executor local`): the same `run_shard` as Ray, in this process, so it
writes the same shards, markers, stats and manifest counts; and how `auto` chooses."""

import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest
import torch
from conftest import FGDATA, assert_dataset_invariants, make_config, read_rows, write_caption_shard
from synthetic import synthetic_captions
from typer.testing import CliRunner

from pipeline import runner
from pipeline.cli import app
from pipeline.core.schemas import conform
from pipeline.core.shards import DONE_DIR, STATS_DIR, finished_shards, read_json, list_shards, read_rejects, shard_markers
from pipeline.errors import StageFailed
from pipeline.runner import choose_executor, run_stage
from pipeline.stages.base import ModelPool, ShardResult, Stage, WorkUnit
from pipeline.stages.fggrn.phrases import PhrasesStage


def caption_shards(root, shards: int, rows: int, seed: int = 3):
    captions = synthetic_captions(shards * rows, seed=seed)
    for shard in range(shards):
        batch = [{"key": f"{shard:02d}-{i:04d}", "short_caption": captions[shard * rows + i]} for i in range(rows)]
        batch[1]["short_caption"] = ""  # one reject per shard: rejects are compared too
        write_caption_shard(root / f"part-{shard:05d}.parquet", batch)
    return root


def shard_by_shard(out):
    """Everything a shard consists of, minus its timings: rows, rejects, marker, stats."""
    markers = shard_markers(out)
    shards = {}
    for path in list_shards(out):
        stats = read_json(out / STATS_DIR / path.name.replace(".parquet", ".json"))
        for timing in ("seconds", "timings"):
            stats.pop(timing, None)
        shards[path.name] = {
            "rows": pq.read_table(path).to_pylist(),
            "rejects": pq.read_table(out / "_rejects" / path.name).to_pylist(),
            "marker": markers[path.name],
            "stats": stats,
        }
    return shards


def manifest_counts(out):
    manifest = read_json(out / "_manifest.json")
    keys = ("stage", "kind", "settings_hash", "inputs", "provenance", "shards", "rows_in", "rows_out", "rows_rejected", "counters")
    return {key: manifest[key] for key in keys}


@pytest.mark.usefixtures("ray_session")
def test_local_and_ray_write_the_same_shards_markers_and_manifest_counts(tmp_path):
    source = caption_shards(tmp_path / "in", shards=3, rows=40)
    run_stage(PhrasesStage(source), tmp_path / "local", make_config("run.executor=local"))
    run_stage(PhrasesStage(source), tmp_path / "ray", make_config("run.executor=ray"))
    local, on_ray = shard_by_shard(tmp_path / "local"), shard_by_shard(tmp_path / "ray")
    assert len(local) == 3 and all(shard["rows"] and shard["rejects"] for shard in local.values())
    assert local == on_ray
    assert manifest_counts(tmp_path / "local") == manifest_counts(tmp_path / "ray")
    assert read_json(tmp_path / "local" / "_manifest.json")["executor"] == "local"
    assert read_json(tmp_path / "ray" / "_manifest.json")["executor"] == "ray"
    assert_dataset_invariants(tmp_path / "local", expected_keys={f"{s:02d}-{i:04d}" for s in range(3) for i in range(40)})
    # the same markers: a run begun in-process resumes on Ray, redoing only the unfinished shard
    (tmp_path / "local" / DONE_DIR / "part-00001.parquet.done").unlink()
    summary = run_stage(PhrasesStage(source), tmp_path / "local", make_config("run.executor=ray"))
    assert (summary.shards_run, summary.shards_skipped) == (1, 2)
    assert shard_by_shard(tmp_path / "local") == on_ray


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_model_stage_gives_the_same_rows_in_process_as_on_ray_actors(tmp_path):
    """hierarcaps filter with a tiny NLI model: load_model + prepare in this process give the
    rows and rejects a Ray actor pool gives (scores equal up to float rounding across threads)."""
    from conftest import SAMPLE_IMAGES
    from test_hierarchy import TEST_CSV

    from pipeline.models.tiny import build_tiny_nli
    from pipeline.stages.hierarcaps.filter import HierarcapsFilterStage
    from pipeline.stages.hierarcaps.import_csv import HierarcapsImportStage

    nli = build_tiny_nli(tmp_path / "nli", [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")] * 10)
    (tmp_path / "test.csv").write_text(TEST_CSV)
    run_stage(HierarcapsImportStage(tmp_path / "test.csv"), tmp_path / "imported", make_config())
    settings = (f"hierarcaps.nli_model={nli}", "hierarcaps.min_entailment=0.34")
    outputs = {}
    for executor in ("local", "ray"):
        run_stage(HierarcapsFilterStage(tmp_path / "imported"), tmp_path / executor, make_config(*settings, f"run.executor={executor}"))
        rows, rejects = read_rows(tmp_path / executor), read_rejects(tmp_path / executor).to_pylist()
        outputs[executor] = (
            [(r["key"], r["entailment"]) for r in rows], [(r["key"], r["reason"]) for r in rejects], shard_markers(tmp_path / executor)
        )
    (local_rows, local_rejects, local_markers), (ray_rows, ray_rejects, ray_markers) = outputs["local"], outputs["ray"]
    assert len(local_rows) + len(local_rejects) == 2
    assert [key for key, _ in local_rows] == [key for key, _ in ray_rows] and local_rejects == ray_rejects
    for (_, local_scores), (_, ray_scores) in zip(local_rows, ray_rows):
        assert local_scores == pytest.approx(ray_scores, abs=1e-5)
    assert local_markers == ray_markers
    assert manifest_counts(tmp_path / "local") == manifest_counts(tmp_path / "ray")


class CountingModelStage(Stage):
    """A model stage that says, in its reject rows, which model and which prepared batch each
    row went through; `calls` counts load_model and prepare in this process."""

    name, output_kind, config_section, uses_model = "counting", "captions", "run", True
    calls: dict = {}

    def __init__(self, batches_announced: int = 2, broken_model: bool = False):
        self.batches_announced, self.broken_model = batches_announced, broken_model

    def plan(self, config):
        return [WorkUnit(f"part-{i:05d}.parquet", i) for i in range(3)]

    def lineage(self):
        return []

    def load_model(self, config):
        self.calls["load_model"] = self.calls.get("load_model", 0) + 1
        if self.broken_model:
            raise OSError("weights not found at /nowhere")
        return f"model-{self.calls['load_model']}"

    def prepared_batches(self, unit, config):
        return self.batches_announced

    def pool(self, cluster_gpus, config):
        return ModelPool(actors=1, gpus_per_actor=0.0, cpus_per_actor=1.0)

    def prepare(self, unit, config):
        self.calls["prepare"] = self.calls.get("prepare", 0) + 1
        return [[f"{unit.payload}-a"], [f"{unit.payload}-b"]]

    def process(self, unit, config, model=None, prepared=None):
        self.calls.setdefault("torch_threads", set()).add(torch.get_num_threads())
        rejects = [
            {"key": key, "reason": "seen", "detail": f"{model} batch {index}", "source": ""}
            for index, batch in enumerate(prepared)
            for key in batch
        ]
        return ShardResult(rows_in=len(rejects), table=conform([], "captions"), rejects=rejects)


def test_local_executor_loads_the_model_once_and_feeds_each_shard_its_prepared_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "ensure_ray", lambda run: pytest.fail("the local executor started Ray"))
    CountingModelStage.calls = {}
    run_stage(CountingModelStage(), tmp_path / "out", make_config("run.executor=local"))
    assert CountingModelStage.calls == {"load_model": 1, "prepare": 3, "torch_threads": {1}}
    details = [(r["key"], r["detail"]) for r in read_rejects(tmp_path / "out").to_pylist()]
    assert details == [(f"{i}-{b}", f"model-1 batch {n}") for i in range(3) for n, b in enumerate("ab")]
    assert read_json(tmp_path / "out" / "_manifest.json")["counters"] == {"rejected_seen": 6}


def test_in_process_torch_runs_on_the_threads_a_ray_actor_of_the_stage_gets(tmp_path):
    """Ray starts an actor with OMP_NUM_THREADS = its CPUs; a different thread count rounds float sums
    differently (a random detector's boxes moved across the score threshold), so local does the same."""
    torch.set_num_threads(2)
    CountingModelStage.calls = {}
    run_stage(CountingModelStage(), tmp_path / "out", make_config("run.executor=local"))
    assert CountingModelStage.calls["torch_threads"] == {1}  # the stage's cpus_per_actor
    assert torch.get_num_threads() == 2  # the caller's count is back


def test_local_executor_holds_prepare_to_the_batch_count_it_announced(tmp_path):
    with pytest.raises(StageFailed) as failed:
        run_stage(CountingModelStage(batches_announced=1), tmp_path / "out", make_config("run.executor=local", "run.max_retries=0"))
    assert sorted(failed.value.failures) == [f"part-{i:05d}.parquet" for i in range(3)]
    assert "prepare returned 2 batch(es) for part-00000.parquet, prepared_batches said 1" in failed.value.failures["part-00000.parquet"]
    assert not finished_shards(tmp_path / "out")


def test_a_model_that_does_not_load_fails_every_shard_with_its_reason(tmp_path):
    with pytest.raises(StageFailed) as failed:
        run_stage(CountingModelStage(broken_model=True), tmp_path / "out", make_config("run.executor=local"))
    assert set(failed.value.failures.values()) == {"OSError: weights not found at /nowhere"}
    assert len(failed.value.failures) == 3 and not (tmp_path / "out" / "_manifest.json").exists()


@pytest.mark.parametrize(
    "setting, pending, uses_model, ray_address, ray_up, expected",
    [
        ("auto", 1, False, None, False, "local"),  # tiny: one shard, no model, no cluster
        ("auto", 0, False, None, False, "local"),  # everything already finished
        ("auto", 2, False, None, False, "ray"),
        ("auto", 1, True, None, False, "ray"),  # model stages keep Ray's GPU placement
        ("auto", 1, False, "10.0.0.1:6379", False, "ray"),  # a cluster was named
        ("auto", 1, False, None, True, "ray"),  # Ray already runs in this process
        ("local", 8, True, "10.0.0.1:6379", True, "local"),
        ("ray", 1, False, None, False, "ray"),
    ],
)
def test_auto_runs_tiny_cpu_runs_in_process_and_everything_else_on_ray(monkeypatch, setting, pending, uses_model, ray_address, ray_up, expected):
    if ray_address:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runner.ray, "is_initialized", lambda: ray_up)
    stage = CountingModelStage() if uses_model else PhrasesStage("unused")
    assert choose_executor(stage, make_config(f"run.executor={setting}"), pending) == expected


def test_the_executor_flag_and_setting_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runner.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runner, "ensure_ray", lambda run: pytest.fail("a local run started Ray"))
    source = caption_shards(tmp_path / "in", shards=2, rows=5)
    cli = CliRunner()
    # two shards: auto would take Ray; the flag keeps them in this process
    result = cli.invoke(app, ["phrases", str(source), str(tmp_path / "flag"), "-s", "run.progress=false", "--executor", "local"])
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "flag" / "_manifest.json")["executor"] == "local"
    # the flag is the last word over --set
    result = cli.invoke(app, ["phrases", str(source), str(tmp_path / "last"), "-s", "run.executor=ray", "--executor", "local"])
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "last" / "_manifest.json")["executor"] == "local"
    # one shard, no model: auto runs it in this process
    (source / "part-00001.parquet").unlink()
    result = cli.invoke(app, ["phrases", str(source), str(tmp_path / "auto"), "-s", "run.progress=false"])
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "auto" / "_manifest.json")["executor"] == "local"
    wrong = cli.invoke(app, ["phrases", str(source), str(tmp_path / "wrong"), "--executor", "slurm"])
    assert wrong.exit_code == 2 and "run.executor='slurm' must be one of auto, ray, local" in wrong.output
    assert not (tmp_path / "wrong").exists()


KILL_SHARDS, KILL_ROWS = 6, 500


@pytest.mark.slow
def test_a_killed_local_run_resumes_without_duplicates(tmp_path):
    """SIGKILL a local run once its first shard is finished; the rerun skips the finished shards
    and ends with exactly the rows of an uninterrupted run."""
    source = caption_shards(tmp_path / "in", shards=KILL_SHARDS, rows=KILL_ROWS, seed=11)
    reference = tmp_path / "reference"
    run_stage(PhrasesStage(source), reference, make_config("run.executor=local"))
    out = tmp_path / "out"
    args = [str(FGDATA), "phrases", str(source), str(out), "--executor", "local", "-s", "run.progress=false"]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not finished_shards(out) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.02)
        os.killpg(run.pid, signal.SIGKILL)  # the first shard is finished: the kill lands mid-run
    finally:
        run.wait(timeout=30)
    finished_before = finished_shards(out)
    # one process, shards in order: nothing can finish after the kill
    assert 1 <= len(finished_before) < KILL_SHARDS and not (out / "_manifest.json").exists()
    marker_times = {name: (out / DONE_DIR / f"{name}.done").stat().st_mtime_ns for name in finished_before}

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished_before)} already finished" in rerun.stdout
    assert {name: (out / DONE_DIR / f"{name}.done").stat().st_mtime_ns for name in finished_before} == marker_times
    assert shard_by_shard(out) == shard_by_shard(reference)
    keys = {f"{s:02d}-{i:04d}" for s in range(KILL_SHARDS) for i in range(KILL_ROWS)}
    assert_dataset_invariants(out, expected_keys=keys)
    assert not list(out.rglob(".*.tmp-*"))
