"""`fgdata run RECIPE`: recipe files are checked before any work; a recipe run on Ray writes the
same datasets as the single-stage commands, and a killed run resumes per (step, shard)."""

from __future__ import annotations

import os
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import FGDATA, SAMPLE_IMAGES, assert_dataset_invariants, kill_run_when, run_cli

from pipeline.config import MAX_CONFIG_BYTES, load_config
from pipeline.core.shards import finished_shards, read_json
from pipeline.errors import FgdataError
from pipeline.recipes import bundled_recipes, load_recipe, parse_recipe
from pipeline.recipes.run import make_stage
from pipeline.runner import run_stage


def write_recipe(path: Path, steps: list) -> Path:
    path.write_text(yaml.safe_dump({"steps": steps}))
    return path


FGGRN_STEPS = [
    {"name": "images", "stage": "ingest", "input": "SOURCE"},
    {"name": "phrases", "stage": "phrases", "input": "images"},
    {"name": "regions", "stage": "ground", "input": "phrases", "images": "images"},
    {"name": "fggrn", "stage": "negatives", "input": "regions"},
]


def test_bundled_recipes_parse_in_run_order():
    assert {"fggrn", "hierarcaps"} <= set(bundled_recipes())
    fggrn = load_recipe("fggrn")
    assert [s.name for s in fggrn.steps] == ["images", "kept", "screened", "captions", "phrases", "regions", "fggrn"]
    # duplicates and NSFW images are gone before the first GPU model, and ground reads the screened pixels
    assert [s.stage for s in fggrn.steps[:4]] == ["ingest", "dedup", "screen", "recaption"]
    assert fggrn.steps[3].inputs == {"input": ("screened",)}
    assert fggrn.steps[5].inputs == {"input": ("phrases",), "images": ("screened",)}
    hierarcaps = load_recipe("hierarcaps")
    names = [s.name for s in hierarcaps.steps]
    assert names.index("distilled") < names.index("generated") and names[-1] == "final"
    assert hierarcaps.steps[names.index("distilled")].inputs["input"] == ("seed-valid", "augmented-valid")


def test_steps_listed_out_of_order_run_after_their_inputs(tmp_path):
    recipe = load_recipe(str(write_recipe(tmp_path / "mine.yaml", [FGGRN_STEPS[3], FGGRN_STEPS[1], FGGRN_STEPS[2], FGGRN_STEPS[0]])))
    assert [s.name for s in recipe.steps] == ["images", "phrases", "regions", "fggrn"]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"name": "a", "stage": "imagine", "input": "SOURCE"}], "unknown stage 'imagine'"),
        ([{"name": "a", "stage": "ground", "input": "SOURCE"}], "missing its input 'images'"),
        ([{"name": "a", "stage": "phrases"}], "missing its input 'input'"),
        ([{"name": "a", "stage": "phrases", "input": "nowhere"}], "reads 'nowhere'"),
        ([{"name": "a", "stage": "phrases", "input": "b"}, {"name": "b", "stage": "phrases", "input": "a"}], "cycle: a -> b -> a"),
        ([{"name": "a", "stage": "phrases", "input": "a"}], "cycle: a -> a"),
        ([{"name": "a", "stage": "ingest", "input": "SOURCE"}, {"name": "a", "stage": "phrases", "input": "SOURCE"}], "two steps are named 'a'"),
        ([{"name": "../up", "stage": "ingest", "input": "SOURCE"}], "needs a name"),
        ([{"name": "a", "stage": "phrases", "input": "SOURCE", "images": "SOURCE"}], "unknown key 'images'"),
        ([{"name": "a", "stage": "phrases", "input": ["SOURCE", "SOURCE"]}], "missing its input 'input'"),
        ([{"name": "a", "stage": "ingest", "input": "SOURCE", "set": "ingest.rows_per_shard=2"}], "'set' must be a list"),
        (["ingest"], "step 1 must be a mapping"),
        ([], "non-empty list"),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path, steps, message):
    with pytest.raises(FgdataError, match=message) as caught:
        load_recipe(str(write_recipe(tmp_path / "bad.yaml", steps)))
    assert "\n" not in str(caught.value)


def test_recipe_file_is_read_like_a_settings_file(tmp_path):
    with pytest.raises(FgdataError, match="not a regular file"):
        load_recipe(str(tmp_path))
    big = tmp_path / "big.yaml"
    big.write_text("#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(FgdataError, match="over 1 MiB"):
        load_recipe(str(big))
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("steps: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(FgdataError, match="not valid YAML"):
        load_recipe(str(unsafe))
    with pytest.raises(FgdataError, match="no recipe 'fgrgn'"):
        load_recipe("fgrgn")
    with pytest.raises(FgdataError, match="unknown key 'stages'"):
        parse_recipe({"stages": []}, "x", "x.yaml")


def test_every_step_kind_builds_its_stage():
    from pipeline.recipes import STEP_KINDS
    from pipeline.recipes.run import DISTILL, Step

    for kind, spec in STEP_KINDS.items():
        step = Step(name="x", stage=kind, inputs={key: ("SOURCE",) for key in spec.inputs})
        stage = make_stage(step, {key: [Path("/nowhere") / key] for key in spec.inputs})
        assert (stage is None) == (kind == DISTILL), kind
        if stage is not None:
            assert stage.name == kind, (kind, stage.name)


def test_which_stages_stream_shard_by_shard():
    """N -> N stages plan one input shard at a time; the others plan their input whole (dedup groups
    duplicates across all shards)."""
    streaming = {"screen", "recaption", "phrases", "ground", "negatives", "hierarcaps-filter", "hierarcaps-negatives"}
    for recipe in ("fggrn", "hierarcaps"):
        for step in load_recipe(recipe).steps:
            paths = {key: [Path("/nowhere") / ref for ref in refs] for key, refs in step.inputs.items()}
            stage = make_stage(step, paths)
            if stage is not None:
                assert stage.streams == (step.stage in streaming), step.stage


def test_cli_refuses_a_bad_recipe_before_any_work(tmp_path):
    recipe = write_recipe(tmp_path / "bad.yaml", [{"name": "x", "stage": "ground", "input": "SOURCE"}])
    result = run_cli("run", str(recipe), str(SAMPLE_IMAGES), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: recipe {recipe}: step 'x' (ground) is missing its input 'images' (SOURCE or a step)"]
    assert not (tmp_path / "out").exists()


# --- end to end: the recipe on Ray against the stage-by-stage commands ---------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.models.tiny import build_tiny_clip_text, build_tiny_nli

    root = tmp_path_factory.mktemp("recipe")
    texts = [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")] * 10
    settings = {
        "ingest": {"rows_per_shard": 4},
        "ground": {"text_encoder": str(build_tiny_clip_text(root / "clip", texts)), "detector": "yolov8s-worldv2.yaml", "score_threshold": 0},
        "negatives": {"backend": "rules", "nli_model": str(build_tiny_nli(root / "nli", texts)), "min_contradiction": 0},
        "run": {"progress": False},
    }
    config_file = root / "settings.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    return {"root": root, "config": config_file, "recipe": write_recipe(root / "fggrn-short.yaml", FGGRN_STEPS)}


@pytest.fixture(scope="module")
def stage_by_stage(setup, ray_session):
    """The single-stage commands' datasets with the same settings, each stage its own Ray run as the
    commands run them (model stages on Ray: a detector's float rounding depends on its threads)."""
    out = setup["root"] / "stages"
    paths = {"SOURCE": SAMPLE_IMAGES}
    for step in load_recipe(str(setup["recipe"])).steps:
        inputs = {key: [paths[ref] for ref in refs] for key, refs in step.inputs.items()}
        paths[step.name] = out / step.name
        run_stage(make_stage(step, inputs), paths[step.name], load_config(setup["config"], ["run.executor=ray", "run.num_cpus=2"]))
    return out


def start_recipe(setup, out, *extra) -> subprocess.Popen:
    args = [str(FGDATA), "run", str(setup["recipe"]), str(SAMPLE_IMAGES), str(out), "--config", str(setup["config"]), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def assert_same_datasets(out: Path, reference: Path) -> None:
    for step in ("images", "phrases", "regions", "fggrn"):
        shards = sorted(p.name for p in (reference / step / "train").glob("part-*.parquet"))
        assert len(shards) >= 4 and sorted(p.name for p in (out / step / "train").glob("part-*.parquet")) == shards
        for name in shards:
            assert pq.read_table(out / step / "train" / name).to_pylist() == pq.read_table(reference / step / "train" / name).to_pylist(), f"{step}/{name}"
            assert pq.read_table(out / step / "_rejects" / name).to_pylist() == pq.read_table(reference / step / "_rejects" / name).to_pylist()
        assert_dataset_invariants(out / step)
        manifest = read_json(out / step / "_manifest.json")
        assert manifest["executor"] == "ray" and manifest["rows_out"] == read_json(reference / step / "_manifest.json")["rows_out"]
    assert (out / "fggrn" / "DATACARD.md").exists()


@pytest.mark.slow
def test_recipe_writes_the_stage_by_stage_datasets(setup, stage_by_stage, tmp_path):
    run = start_recipe(setup, tmp_path / "out")
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert_same_datasets(tmp_path / "out", stage_by_stage)
    assert stdout.count("wrote ") == 4
    # every model step started its actor pool once for the whole job
    assert stderr.count("ground: 1 model actor(s)") == 1 and stderr.count("negatives: 1 model actor(s)") == 1
    assert read_json(tmp_path / "out" / "regions" / "_manifest.json")["inputs"][0]["path"] == str(tmp_path / "out" / "phrases")


def test_a_shard_moves_on_as_soon_as_it_is_done(setup, tmp_path):
    """phrases plans shard N once images shard N is done, before images has finished."""
    from pipeline.recipes.run import _Scheduler, plan_steps

    recipe = load_recipe(str(setup["recipe"]))
    with ExitStack() as held:  # the folders the recipe holds while it runs
        runs = plan_steps(recipe, SAMPLE_IMAGES, tmp_path / "out", setup["config"], ["run.executor=local"], overwrite=False, held=held)
        images, phrases, regions = runs[0], runs[1], runs[2]
        run_stage(images.stage, images.out_dir, images.config)  # all image shards written, as if the job had done them
        scheduler = _Scheduler(runs)
        scheduler._advance(images)
        images.done, images.finished = {"part-00001.parquet"}, False
        scheduler._advance(phrases)
        assert phrases.names == images.names and [u.name for u in phrases.queue] == ["part-00001.parquet"]
        scheduler._advance(regions)  # phrases has no shard done yet: nothing for ground
        assert regions.names == images.names and not regions.queue
        assert not phrases.finished and not regions.finished


@pytest.mark.slow
def test_killed_recipe_resumes_per_step_and_shard(setup, stage_by_stage, tmp_path):
    out = tmp_path / "out"
    run = start_recipe(setup, out, "--set", "run.max_shards_in_flight=1")
    kill_run_when(run, lambda: finished_shards(out / "regions"), timeout=240, what="a grounded shard")
    before = {step: finished_shards(out / step) for step in ("images", "phrases", "regions", "fggrn")}
    total = len(list((stage_by_stage / "images" / "train").glob("part-*.parquet")))
    assert before["regions"] and len(before["fggrn"]) < total and not (out / "fggrn" / "_manifest.json").exists()
    stamps = {(step, name): (out / step / "_done" / f"{name}.done").stat().st_mtime_ns for step, names in before.items() for name in names}

    rerun = start_recipe(setup, out)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    # finished (step, shard) pairs were skipped, not redone; the rest ran once
    assert {key: (out / key[0] / "_done" / f"{key[1]}.done").stat().st_mtime_ns for key in stamps} == stamps
    assert f"regions: {total} shard(s) ({total - len(before['regions'])} run, {len(before['regions'])} already finished)" in stdout.replace("wrote " + str(out) + "/", "")
    assert_same_datasets(out, stage_by_stage)
    assert not list(out.rglob(".*.tmp-*"))
