"""`fgdata run hierarcaps` end to end: the bundled recipe on Ray writes, step by step, the rows its
eight single-stage commands write on the same captions with the same settings, and a killed run
resumes per (step, shard). Seed and augment are answered by the FAKE vLLM of tests/fakes (put on
every process's path by tests/fakes/hierarcaps_world, answering the synthetic world's chain for each
caption); NLI is a tiny random model with its thresholds at 0; Flan-T5 is a tiny T5 distilled for
150 steps. The world, settings and commands are bench/recipe_hierarcaps.py's."""

from __future__ import annotations

import subprocess
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import FGDATA, REPO, assert_dataset_invariants, kill_run_when, make_config, run_cli
from recipe_hierarcaps import STEPS, fake_llm_env, stage_commands, write_world

from pipeline.core.schemas import conform
from pipeline.core.shards import DONE_DIR, finished_shards, list_shards, read_json
from pipeline.datasets.hierarcaps_csv import read_chains
from pipeline.errors import FgdataError
from pipeline.recipes import load_recipe
from pipeline.recipes.run import _Scheduler, plan_steps, run_recipe

# --- the bugs the end-to-end run found ----------------------------------------------------------


def test_a_rerun_finishes_a_streaming_step_whose_shards_are_all_done(tmp_path):
    """On a rerun after a later step failed (distill, say), a filter step whose every shard is done
    finishes in the scheduler's first pass; it used to wait for a pass that never came (nothing in
    flight), so the rerun stopped with "could not start: their inputs never finished"."""
    from pipeline.models.tiny import build_tiny_nli

    csv = REPO / "sample" / "hierarcaps" / "handwritten_train.csv"
    nli = build_tiny_nli(tmp_path / "nli", [csv.read_text()])
    recipe_file = tmp_path / "short.yaml"
    recipe_file.write_text(yaml.safe_dump({"steps": [
        {"name": "imported", "stage": "hierarcaps-import", "input": "SOURCE"},
        {"name": "valid", "stage": "hierarcaps-filter", "input": "imported"},
    ]}))
    overrides = [f"hierarcaps.nli_model={nli}", "hierarcaps.min_entailment=0", "run.progress=false"]
    run_recipe(load_recipe(str(recipe_file)), csv, tmp_path / "out", overrides=[*overrides, "run.executor=local"])
    with ExitStack() as held:  # the steps' output locks, released at the end as run_recipe does
        runs = plan_steps(load_recipe(str(recipe_file)), csv, tmp_path / "out", None, overrides, overwrite=False, held=held)
        scheduler = _Scheduler(runs)
        for run in runs:  # one pass of the loop: nothing is left to run, so nothing goes in flight
            scheduler._advance(run)
        assert not scheduler.in_flight and not any(run.queue for run in runs)
        assert [run.finished for run in runs] == [True, True]


def write_chains(directory: Path, keys: list[str], chains: list[list[str]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"key": key, "split": "train", "tiers": tiers, "source": "test"} for key, tiers in zip(keys, chains)]
    pq.write_table(conform(rows, "hierarcaps"), directory / "part-00000.parquet")
    return directory


def test_distill_keeps_the_first_inputs_chain_of_a_key_and_counts_the_rest(tmp_path):
    """The recipe seeds and augments the same captions, so seed-valid and augmented-valid share
    every key: distill trains on the first input's chain of each key and reports the others (it used
    to refuse, so `fgdata run hierarcaps` never got past distill). Other readers still refuse."""
    from pipeline.models.tiny import build_tiny_t5
    from pipeline.train.distill import distill

    keys = [f"captions-{i:09d}" for i in range(6)]
    seeded = write_chains(tmp_path / "seed-valid", keys, [["dog", f"red dog {i}", f"red dog {i} on a mat", f"a small red dog {i} on a mat"] for i in range(6)])
    augmented = write_chains(tmp_path / "augmented-valid", [*keys[:4], "other"], [["cat", "grey cat", "grey cat on a sofa", "a grey cat asleep on a sofa"]] * 5)
    with pytest.raises(FgdataError, match="the same key appears more than once"):
        read_chains([seeded, augmented])
    counts = Counter()
    chains = read_chains([seeded, augmented], counts=counts, first_of_each_key=True)
    assert [key for key, _, _ in chains] == [*keys, "other"] and chains[0][1][0] == "dog" and chains[-1][1][0] == "cat"
    assert counts == {"skipped_duplicate_key": 4}
    base = build_tiny_t5(tmp_path / "t5", ["dog red cat grey mat sofa a small on asleep"])
    settings = make_config(f"distill.base_model={base}", "distill.max_steps=2", "distill.eval_fraction=0.2").distill
    report = distill([seeded, augmented], tmp_path / "distilled", settings, progress=False)
    assert report["chains_dropped"] == {"skipped_duplicate_key": 4}
    assert report["chains"]["train"] + report["chains"]["held_out"] == 7


# --- end to end: the recipe on Ray against the stage-by-stage commands ---------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hierarcaps-recipe")
    captions, settings = write_world(root / "world")
    # torch on one thread, as Ray runs the recipe's distill task: on a busy 2-core machine the distill
    # command's two threads made it ~30x slower (bench/results/recipe_vs_stages_hierarcaps.json)
    return {"root": root, "captions": captions, "settings": settings, "env": {**fake_llm_env(), "OMP_NUM_THREADS": "1"}}


@pytest.fixture(scope="module")
def stage_by_stage(world):
    """The eight single-stage commands, one after another, as a user types them."""
    out = world["root"] / "stages"
    for step, command in stage_commands(world["captions"], out, world["settings"]).items():
        result = run_cli(*command, env_extra=world["env"])
        assert result.returncode == 0, f"{step}: {result.stderr[-2000:]}"
    return out


def start_recipe(world, out: Path, *extra: str) -> subprocess.Popen:
    args = [str(FGDATA), "run", "hierarcaps", str(world["captions"]), str(out), "--config", str(world["settings"]), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=world["env"])


def rows_of(path: Path, out: Path) -> list[dict]:
    """A shard's rows with the output folder's path written as OUT (generate's `source` names the
    distilled model by its path, OUT/distilled on either side)."""
    return [{k: v.replace(str(out), "OUT") if isinstance(v, str) else v for k, v in row.items()} for row in pq.read_table(path).to_pylist()]


def assert_same_datasets(out: Path, reference: Path) -> None:
    for step in STEPS:
        shards = [p.name for p in list_shards(reference / step)]
        assert len(shards) == 5 and [p.name for p in list_shards(out / step)] == shards, step
        for shard, theirs in zip(list_shards(out / step), list_shards(reference / step)):
            assert rows_of(shard, out) == rows_of(theirs, reference), f"{step}/{shard.name}"
            assert rows_of(out / step / "_rejects" / shard.name, out) == rows_of(reference / step / "_rejects" / shard.name, reference)
        assert_dataset_invariants(out / step)
        assert finished_shards(out / step) == set(shards)
        manifest = read_json(out / step / "_manifest.json")
        assert manifest["executor"] == "ray" and manifest["rows_out"] == read_json(reference / step / "_manifest.json")["rows_out"]
    # the same distilled model: the stages after it are compared on equal footing
    assert (out / "distilled" / "model.safetensors").read_bytes() == (reference / "distilled" / "model.safetensors").read_bytes()
    report = read_json(out / "distilled" / "distill.json")
    assert report["finished"] and report["chains_dropped"] == {"skipped_duplicate_key": read_json(out / "augmented-valid" / "_manifest.json")["rows_out"]}


@pytest.mark.slow
def test_hierarcaps_recipe_writes_the_stage_by_stage_datasets(world, stage_by_stage, tmp_path):
    out = tmp_path / "out"
    run = start_recipe(world, out)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    assert_same_datasets(out, stage_by_stage)
    assert stdout.count("wrote ") == len(STEPS) and "distilled: finished" in stderr
    # every step had work: the fake answers pass seed and augment, the T5 writes chains, negatives pick some
    counts = {step: read_json(out / step / "_manifest.json") for step in STEPS}
    assert all(counts[step]["rows_out"] > 0 for step in STEPS), {step: c["rows_out"] for step, c in counts.items()}
    seed_rejects = sorted({r["reason"] for r in pq.read_table(out / "seed" / "_rejects").to_pylist()})
    assert counts["seed"]["rows_rejected"] == 2 and "empty_caption" in seed_rejects
    final = [row for shard in list_shards(out / "final") for row in pq.read_table(shard).to_pylist()]
    assert all(len(row["negative_tiers"]) == 4 for row in final)
    # augment waited for the whole of seed-valid; its manifest names it as the demonstrations
    assert {"path": str(out / "seed-valid"), "role": "demonstrations"}.items() <= read_json(out / "augmented" / "_manifest.json")["inputs"][1].items()


@pytest.mark.slow
def test_killed_hierarcaps_recipe_resumes_per_step_and_shard(world, stage_by_stage, tmp_path):
    out = tmp_path / "out"
    run = start_recipe(world, out, "--set", "run.max_shards_in_flight=1")
    kill_run_when(run, lambda: finished_shards(out / "seed-valid"), timeout=300, what="a filtered seed shard")
    before = {step: finished_shards(out / step) for step in STEPS}
    assert before["seed"] and before["seed-valid"] and not (out / "final" / "_manifest.json").exists()
    stamps = {(step, name): (out / step / DONE_DIR / f"{name}.done").stat().st_mtime_ns for step, names in before.items() for name in names}

    rerun = start_recipe(world, out)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-3000:]
    # finished (step, shard) pairs were skipped, not redone; the rest ran once
    assert {key: (out / key[0] / DONE_DIR / f"{key[1]}.done").stat().st_mtime_ns for key in stamps} == stamps
    done = len(before["seed-valid"])
    assert f"seed-valid: 5 shard(s) ({5 - done} run, {done} already finished)" in stdout.replace(f"wrote {out}/", "")
    assert_same_datasets(out, stage_by_stage)
    assert not list(out.rglob(".*.tmp-*"))
