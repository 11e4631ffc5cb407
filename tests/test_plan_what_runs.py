"""`fgdata plan` plans what will run (issue 30): the recipe's steps with their settings, fixed costs as
the commands pay them, the whole wall time of the user's runs, and the load the records were taken under."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import runner
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.recipes import STEP_KINDS, load_recipe
from pipeline.reports.plan import STAGES, load_bench, load_runs, plan
from pipeline.runner import choose_executor
from pipeline.stages.fggrn.ground import GroundStage
from pipeline.stages.fggrn.ingest import IngestStage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from records import write_result  # noqa: E402

RAY_START = 5.0
COMMAND_START = 2.0  # Python and fgdata's imports
# the stage commands of a user whose images come with captions: no recaption
NO_RECAPTION = """\
steps:
  - {name: images, stage: ingest, input: SOURCE}
  - {name: phrases, stage: phrases, input: images}
  - {name: regions, stage: ground, input: phrases, images: images}
  - {name: fggrn, stage: negatives, input: regions}
"""


def _records(folder: Path, load: float = 1.0) -> Path:
    """A bench record per stage, taken under `load` on 2 cores: negatives both with the LLM and the rules."""
    folder.mkdir(exist_ok=True)
    machine = {"cpus": 2, "gpu": None, "load_average": [load, load, load], "cpu_model": "AMD EPYC"}
    records = {
        "startup": {
            "ray_start_seconds": RAY_START, "command_start_seconds": dict.fromkeys(("ingest", "phrases", "ground", "negatives", "export fgclip"), COMMAND_START),
            "stage_fixed_seconds": {"ingest": 1.0, "phrases": 2.0}, "local_stage_fixed_seconds": {"ingest": 0.5, "phrases": 1.5},
        },
        "ingest": {"stage_images_per_s": 200.0},
        "phrases": {"stage_captions_per_s": 100.0},
        "ground": {"images": 100, "model": "tiny", "stage_images_per_s": 5.0, "stage_actor_busy_images_per_s": 10.0},
        # the LLM backend: 10 regions/s
        "negatives": {"images": 100, "regions": 400, "model": "tiny random Llama", "stage_regions_per_s": 8.0, "stage_actor_busy_regions_per_s": 10.0},
        "export": {"format": "fgclip", "images": 1000, "stage_images_per_s": 1000.0},
    }
    for name, fields in records.items():
        (folder / f"{name}.json").write_text(json.dumps({"benchmark": name, "machine": machine, **fields}))
    # the rules backend, as bench/cpu_1k.py writes it: 400 regions/s, 3 s of actor start
    rules = {"rows": 100, "regions": 400, "model": "rules + tiny NLI", "backend": "rules", "breakdown": {"startup_s": 3.0, "shard_busy_s": 1.0}}
    (folder / "cpu_1k_negatives.json").write_text(json.dumps({"benchmark": "cpu_1k_negatives", "machine": machine, **rules}))
    return folder


def _plan_json(*args: str) -> dict:
    result = CliRunner().invoke(app, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _step(bill: dict, name: str) -> dict:
    return next(s for s in bill["stages"] if s["step"] == name)


def test_negatives_with_the_rules_backend_is_not_priced_from_the_llm_record(tmp_path):
    records = _records(tmp_path / "records")
    rules = _step(_plan_json("fggrn", "--images", "100", "--results", str(records), "--set", "negatives.backend=rules"), "fggrn")
    assert rules["source"].endswith("cpu_1k_negatives.json") and rules["model"] == "rules + tiny NLI"
    assert rules["wall_seconds"] == pytest.approx(3.0 + 400 / 400.0)
    llm = _step(_plan_json("fggrn", "--images", "100", "--results", str(records)), "fggrn")
    assert Path(llm["source"]).name == "negatives.json" and llm["per_worker_per_s"] == pytest.approx(10.0)
    # no rules record: no figure, rather than the LLM's
    (records / "cpu_1k_negatives.json").unlink()
    missing = _plan_json("fggrn", "--images", "100", "--results", str(records), "--set", "negatives.backend=rules")
    assert _step(missing, "fggrn")["wall_seconds"] is None and "no record of negatives with backend rules" in _step(missing, "fggrn")["basis"]
    assert missing["total"]["stages_without_a_figure"] == ["kept", "screened", "captions", "fggrn"]  # no dedup, screen or recaption record here either


def test_a_recipe_steps_own_set_chooses_its_record(tmp_path):
    records = _records(tmp_path / "records")
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(NO_RECAPTION.replace("input: regions}", "input: regions, set: [negatives.backend=rules]}"))
    assert _step(_plan_json(str(recipe), "--images", "100", "--results", str(records)), "fggrn")["source"].endswith("cpu_1k_negatives.json")


def test_the_recipes_steps_are_exactly_what_is_planned_export_included(tmp_path):
    records = _records(tmp_path / "records")
    recipe = tmp_path / "no-recaption.yaml"
    recipe.write_text(NO_RECAPTION)
    bill = _plan_json(str(recipe), "--images", "100", "--results", str(records), "--export", "fgclip")
    assert [(s["step"], s["stage"]) for s in bill["stages"]] == [
        ("images", "ingest"), ("phrases", "phrases"), ("regions", "ground"), ("fggrn", "negatives"), ("export fgclip", "export fgclip"),
    ]
    export = _step(bill, "export fgclip")
    assert export["wall_seconds"] == pytest.approx(100 / 1000.0) and export["executor"] == "local"
    # a bundled recipe: its own steps, in its order (fggrn-demo runs recaption after negatives)
    demo = _plan_json("fggrn-demo", "--images", "100", "--results", str(records))
    assert [s["step"] for s in demo["stages"]] == [step.name for step in load_recipe("fggrn-demo").steps]
    result = CliRunner().invoke(app, ["plan", "fggrn", "--images", "5", "--export", "csv"])
    assert result.exit_code == 2 and "--export 'csv': the exports are fgclip" in result.output


def test_every_stage_a_recipe_can_name_can_be_planned(tmp_path):
    assert set(STEP_KINDS) <= set(STAGES)
    recipe = tmp_path / "curated.yaml"
    recipe.write_text("steps:\n  - {name: images, stage: ingest, input: SOURCE}\n  - {name: unique, stage: dedup, input: images}\n  - {name: safe, stage: screen, input: unique}\n")
    bill = _plan_json(str(recipe), "--images", "100", "--results", str(_records(tmp_path / "records")))
    assert [(s["step"], s["wall_seconds"] is None) for s in bill["stages"]] == [("images", False), ("unique", True), ("safe", True)]


def test_screen_is_planned_on_cpu_actors_even_on_a_gpu_cluster(tmp_path):
    # its NudeNet actors take no GPU: one per 8 cores of the cluster (as the runner's pool), or screen.num_actors
    from pipeline.stages.fggrn.screen import ScreenStage

    recipe = tmp_path / "curated.yaml"
    recipe.write_text("steps:\n  - {name: images, stage: ingest, input: SOURCE}\n  - {name: safe, stage: screen, input: images}\n  - {name: captions, stage: recaption, input: safe}\n")
    records = str(_records(tmp_path / "records"))
    bill = _plan_json(str(recipe), "--images", "1000", "--results", records, "--gpu", "h100", "--gpus", "8")  # 128 cores
    assert (_step(bill, "safe")["device"], _step(bill, "safe")["workers"]) == ("cpu", 16)
    assert (_step(bill, "captions")["device"], _step(bill, "captions")["workers"]) == ("h100", 8)
    more = _plan_json(str(recipe), "--images", "1000", "--results", records, "--gpu", "h100", "--gpus", "8", "--set", "screen.num_actors=3")
    assert _step(more, "safe")["workers"] == 3
    assert _step(_plan_json(str(recipe), "--images", "1000", "--results", records, "--cpus", "2"), "safe")["workers"] == 1
    stage = ScreenStage(tmp_path)
    assert [(p.actors, p.gpus_per_actor) for p in (stage.pool(8, load_config(), 128), stage.pool(0, load_config(), 2))] == [(16, 0.0), (1, 0.0)]
    assert stage.pool(8, load_config(None, ["screen.num_actors=3"]), 128).actors == 3


def test_dedup_and_screen_are_priced_from_their_bench_records(tmp_path):
    folder = _records(tmp_path / "records")
    write_result("curation", {"dedup_rerun": {"images": 1000, "pass1_seconds": {"first_run": 2.0, "rerun": 0.01}, "load_average": [0.5, 0.5, 0.5]}}, folder)
    write_result("screen_real", {"settings": {"model": "nudenet-320n"}, "throughput": {"stage_images_per_s": 25.0}}, folder)
    measures, _ = load_bench(folder)
    dedup, screen = (next(m for m in measures if m.stage == stage) for stage in ("dedup", "screen"))
    assert (dedup.per_worker_per_s, dedup.load_average) == (500.0, 0.5)  # its part's own load, not the record's
    assert screen.per_worker_per_s == 25.0 and "NudeNet" in screen.model
    recipe = tmp_path / "curated.yaml"
    recipe.write_text("steps:\n  - {name: images, stage: ingest, input: SOURCE}\n  - {name: unique, stage: dedup, input: images}\n  - {name: safe, stage: screen, input: unique}\n")
    bill = _plan_json(str(recipe), "--images", "1000", "--results", str(folder), "--cpus", "2")
    assert bill["total"]["stages_without_a_figure"] == []


def test_each_command_on_ray_pays_its_own_ray_start_and_a_one_shard_cpu_stage_none(tmp_path, monkeypatch):
    # as a fresh command finds it: no cluster named, no Ray left running by an earlier test here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runner.ray, "is_initialized", lambda: False)
    measures, startup = load_bench(_records(tmp_path / "records"))
    recipe = tmp_path / "no-recaption.yaml"
    recipe.write_text(NO_RECAPTION)
    steps = load_recipe(str(recipe))
    one_shard = load_config()  # 100 images: one shard of 1000
    commands = plan(steps, 100, one_shard, cpus=8, measures=measures, startup=startup, commands=True)
    on_ray = [s["step"] for s in commands["stages"] if s["ray_start_seconds"] == RAY_START]
    assert on_ray == ["regions", "fggrn"] and commands["total"]["ray_starts"] == 2
    assert [s["executor"] for s in commands["stages"]] == ["local", "local", "ray", "ray"]
    # the runner decides the same: a one-shard stage without a model in its process, a model stage on Ray
    source = tmp_path / "photos"
    source.mkdir()
    assert choose_executor(IngestStage(source), one_shard, 1) == "local"
    assert choose_executor(GroundStage(source, source), one_shard, 1) == "ray"
    ground = _step(commands, "regions")
    assert ground["workers"] == 1  # one model actor without GPUs, as the runner's pool
    assert ground["wall_seconds"] == pytest.approx(COMMAND_START + RAY_START + (100 / 5.0 - 100 / 10.0) + 100 / 10.0)
    # in its process: the local executor's start-up, one core
    assert _step(commands, "images")["wall_seconds"] == pytest.approx(COMMAND_START + 0.5 + 100 / (200.0 / 2))  # the record: 200/s on 2 cores
    assert commands["total"]["wall_seconds"] == pytest.approx(sum(s["wall_seconds"] for s in commands["stages"]))
    assert commands["total"]["command_start_seconds"] == 4 * COMMAND_START
    # more than one shard: every command starts Ray; one `fgdata run` starts it once
    shards = load_config(None, ["ingest.rows_per_shard=10"])
    assert plan(steps, 100, shards, measures=measures, startup=startup, commands=True)["total"]["ray_starts"] == 4
    run = plan(steps, 100, one_shard, measures=measures, startup=startup)
    assert run["total"]["ray_starts"] == 1 and run["total"]["ray_start_seconds"] == RAY_START
    assert run["total"]["wall_seconds"] == pytest.approx(COMMAND_START + RAY_START + sum(s["wall_seconds"] for s in run["stages"]))


def test_from_runs_counts_the_runs_whole_wall_time(tmp_path):
    """A 1-shard negatives run of 92 s, 4.8 s of it in the shard: the plan for the same rows is 92 s, not 4.8."""
    run = tmp_path / "runs" / "fggrn"
    run.mkdir(parents=True)
    manifest = {
        "stage": "negatives", "rows_in": 300, "shards": ["part-00000.parquet"], "executor": "ray",
        "timings": {"wall_seconds": 92.0, "shard_seconds": 4.8}, "machine": {"hostname": "box", "cpus": 2, "ray_cpus": 2, "ray_gpus": 0},
        "config": {"negatives": {"backend": "rules"}},
    }
    (run / "_manifest.json").write_text(json.dumps(manifest))
    bill = _plan_json("fggrn", "--images", "300", "--from-runs", str(tmp_path / "runs"), "--results", str(_records(tmp_path / "records")),
                      "--set", "negatives.backend=rules", "--commands")
    fggrn = _step(bill, "fggrn")
    assert fggrn["basis"].startswith("your run") and "whole wall time" in fggrn["basis"]
    # the run's Ray start is in its wall time: not added again; the command's start is not
    assert fggrn["wall_seconds"] == pytest.approx(COMMAND_START + 92.0)
    assert fggrn["ray_start_seconds"] == 0
    # twice the rows on the same one actor: the start-up once, the shard time twice
    measures = load_runs([tmp_path / "runs"])
    twice = plan(load_recipe("fggrn"), 600, load_config(None, ["negatives.backend=rules"]), measures=measures, stages=["negatives"])
    assert twice["stages"][0]["wall_seconds"] == pytest.approx(92.0 + 4.8)


def test_a_bench_record_carries_the_load_average_and_the_cpu_model(tmp_path):
    path = write_result("ingest", {"stage_images_per_s": 1.0}, results=tmp_path, quiet=True)
    machine = json.loads(path.read_text())["machine"]
    assert len(machine["load_average"]) == 3 and all(isinstance(v, float) for v in machine["load_average"])
    cpuinfo = Path("/proc/cpuinfo").read_text()
    expected = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    assert machine["cpu_model"] == expected


def test_the_plan_warns_when_the_load_now_differs_by_more_than_one_per_core(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    measures, startup = load_bench(_records(tmp_path / "records", load=1.0))
    same = plan(load_recipe("fggrn"), 100, load_config(), measures=measures, startup=startup, load_now=2.5)  # 0.75 per core more
    assert same["load_warning"] is None
    assert any("ingest.json: taken under load average 1 on 2 cores (AMD EPYC)" in note for note in same["notes"])
    busy = plan(load_recipe("fggrn"), 100, load_config(), measures=measures, startup=startup, load_now=12.0)  # 5.5 per core more
    assert "load average is 12.00 on 2 cores" in busy["load_warning"] and "ingest.json (1)" in busy["load_warning"]
    monkeypatch.setattr("os.getloadavg", lambda: (12.0, 12.0, 12.0))
    table = CliRunner().invoke(app, ["plan", "fggrn", "--images", "100", "--results", str(tmp_path / "records")])
    assert table.exit_code == 0 and "warning: this machine's load average is 12.00 on 2 cores" in table.output


# values a run's manifest may hold where plan now reads its whole wall time, shards, executor and settings
ODD_RUN_VALUES = [
    {"timings": {"shard_seconds": 4.8, "wall_seconds": float("nan")}},
    {"timings": {"shard_seconds": 4.8, "wall_seconds": float("inf")}},
    {"timings": {"shard_seconds": 4.8, "wall_seconds": -92.0}},
    {"timings": {"shard_seconds": 4.8, "wall_seconds": "92"}},
    {"timings": {"shard_seconds": 4.8, "wall_seconds": 10**400}},
    {"timings": {"shard_seconds": 4.8, "wall_seconds": 1.0}},  # less than the shard time
    {"shards": "part-00000.parquet"},
    {"shards": []},
    {"shards": [None] * 1000},
    {"executor": ["ray"]},
    {"executor": None},
    {"config": "rules"},
    {"config": {"negatives": ["backend", "rules"]}},
    {"config": {"negatives": {"backend": 5, "num_actors": True}}},
    {"config": {"negatives": {"backend": "rules", "num_actors": 10**30}}},
    {"config": {"negatives": {"backend": "rules", "num_actors": -3}}},
    {"machine": {"ray_gpus": float("nan"), "ray_cpus": "2"}},
]


@pytest.mark.parametrize("odd", ODD_RUN_VALUES, ids=[json.dumps(o)[:60] for o in ODD_RUN_VALUES])
def test_odd_wall_shards_executor_and_settings_of_a_run_keep_the_plan_finite(tmp_path, odd):
    manifest = {
        "stage": "negatives", "rows_in": 300, "shards": ["part-00000.parquet"], "executor": "ray",
        "timings": {"wall_seconds": 92.0, "shard_seconds": 4.8}, "machine": {"cpus": 2}, "config": {"negatives": {"backend": "rules"}}, **odd,
    }
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "_manifest.json").write_text(json.dumps(manifest))  # NaN and Infinity as Python writes them
    result = CliRunner().invoke(app, ["plan", "fggrn", "--images", "300", "--from-runs", str(tmp_path), "--set", "negatives.backend=rules", "--commands", "--json"])
    assert result.exit_code in (0, 2) and isinstance(result.exception, (SystemExit, type(None))), result.output
    if result.exit_code == 0:
        bill = json.loads(result.stdout, parse_constant=lambda constant: pytest.fail(f"{constant} in the plan"))
        fggrn = _step(bill, "fggrn")
        assert fggrn["wall_seconds"] is None or 0 <= fggrn["wall_seconds"] < 10**6


@pytest.mark.parametrize(
    "name, record, message",
    [
        ("cpu_1k_negatives", {"rows": 100, "regions": 400, "breakdown": "fast"}, "'breakdown.shard_busy_s' is None"),
        ("cpu_1k_negatives", {"rows": 100, "regions": float("nan"), "breakdown": {"shard_busy_s": 1.0}}, "'regions' is"),
        ("export", {"format": "fgclip", "stage_images_per_s": -1}, "'stage_images_per_s' is -1"),
    ],
)
def test_a_broken_end_to_end_or_export_record_is_a_one_line_error(tmp_path, name, record, message):
    (tmp_path / f"{name}.json").write_text(json.dumps({"benchmark": name, **record}))
    result = CliRunner().invoke(app, ["plan", "fggrn", "--images", "5", "--results", str(tmp_path)])
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output


def test_an_export_record_of_another_format_is_not_read(tmp_path):
    (tmp_path / "export.json").write_text(json.dumps({"benchmark": "export", "format": ["fgclip"], "stage_images_per_s": 5}))
    assert load_bench(tmp_path)[0] == []


def test_a_screen_runs_start_up_counts_its_pool_of_one_actor_per_8_cores():
    from pipeline.reports.plan import _start_up

    manifest = {"timings": {"wall_seconds": 10.0}, "shards": ["a", "b", "c", "d"], "machine": {"ray_cpus": 16, "ray_gpus": 0}}
    assert _start_up(manifest, "screen", {}, busy=8.0, on_ray=True) == pytest.approx(10.0 - 8.0 / 2)  # 2 actors busy at once
    assert _start_up(manifest, "screen", {"num_actors": 4}, busy=8.0, on_ray=True) == pytest.approx(10.0 - 8.0 / 4)
    assert _start_up(manifest, "ground", {}, busy=8.0, on_ray=True) == pytest.approx(10.0 - 8.0)  # no GPUs: one actor
