"""The model-stage base: one pool / batch count / prepare for every model stage, one reject
contract, timed shards, and planning that never changes the Config it is given."""

import copy
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, make_config

from pipeline.core.schemas import conform
from pipeline.core.shards import read_rejects, read_stats
from pipeline.runner import run_stage
from pipeline.stages.base import GeneratorStage, ModelStage, ShardResult, WorkUnit, reject, run_shard
from pipeline.stages.fggrn.ground import GroundStage
from pipeline.stages.fggrn.negatives import NegativesStage
from pipeline.stages.fggrn.recaption import RecaptionStage
from pipeline.stages.hierarcaps.augment import HierarcapsAugmentStage
from pipeline.stages.hierarcaps.filter import HierarcapsFilterStage
from pipeline.stages.hierarcaps.generate import HierarcapsGenerateStage
from pipeline.stages.hierarcaps.negatives import HierarcapsNegativesStage
from pipeline.stages.hierarcaps.seed import HierarcapsSeedStage

MODEL_STAGES = [
    RecaptionStage, GroundStage, NegativesStage, HierarcapsSeedStage, HierarcapsAugmentStage,
    HierarcapsFilterStage, HierarcapsNegativesStage, HierarcapsGenerateStage,
]


@pytest.mark.parametrize("stage_class", MODEL_STAGES, ids=lambda c: c.__name__)
def test_every_model_stage_takes_its_pool_and_batch_count_from_the_base(stage_class):
    assert issubclass(stage_class, ModelStage) and stage_class.uses_model
    # one copy of each: no stage writes its own
    assert stage_class.pool is ModelStage.pool
    assert stage_class.prepared_batches is ModelStage.prepared_batches


def test_pool_and_batches_follow_the_stage_section():
    config = make_config(
        "negatives.backend=vllm", "negatives.tensor_parallel_size=4", "negatives.batch_size=4",
        "hierarcaps.backend=vllm", "hierarcaps.tensor_parallel_size=2", "ground.num_actors=3",
    )
    # an LLM on vLLM spans its tensor-parallel group; the NLI model of the same section one GPU
    assert NegativesStage(Path(".")).pool(8, config).actors == 2
    assert NegativesStage(Path(".")).pool(8, config).gpus_per_actor == 4.0
    assert HierarcapsSeedStage(Path(".")).pool(8, config).gpus_per_actor == 2.0
    assert HierarcapsFilterStage(Path(".")).pool(8, config).gpus_per_actor == 1.0
    assert GroundStage(Path(".")).pool(8, config).actors == 3
    stage = NegativesStage(Path("."))
    assert stage.prepared_batches(WorkUnit("p", {"rows": 9}), config) == 3
    assert stage.prepared_batches(WorkUnit("p", {"rows": 0}), config) == 1  # a shard always has a batch


def test_the_default_prepare_batches_the_input_shard_by_the_sections_batch_size(tmp_path):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(5)]}), path)
    config = make_config("hierarcaps.batch_size=2")
    batches = HierarcapsFilterStage(tmp_path).prepare(WorkUnit(path.name, {"path": str(path), "rows": 5}), config)
    assert [[row["key"] for row in batch] for batch in batches] == [["k0", "k1"], ["k2", "k3"], ["k4"]]


def test_sampling_comes_from_the_section():
    config = make_config("recaption.temperature=0.3", "recaption.seed=7", "recaption.max_new_tokens=9")
    sampling = RecaptionStage(Path(".")).sampling(config)
    assert (sampling.temperature, sampling.seed, sampling.max_new_tokens, sampling.top_p) == (0.3, 7, 9, 1.0)


class _RejectEveryRow(ModelStage):
    """A model stage whose check turns every row down, slowly, to time the shard's parts."""

    name = "reject-every-row"
    output_kind = "hierarcaps"
    config_section = "hierarcaps"

    def plan(self, config):
        return []

    def lineage(self):
        return []

    def load_model(self, config):
        return None

    def process(self, unit, config, model=None, prepared=None):
        rejects, rows_in = [], 0
        for batch in prepared:
            rows_in += len(batch)
            time.sleep(0.05)  # the model
            rejects += [reject(row["key"], ("too_odd", f"{row['key']} is odd"), unit.name) for row in batch]
        return ShardResult(rows_in=rows_in, table=conform([], "hierarcaps"), rejects=rejects)


def _slow_batches(batches):
    for batch in batches:
        time.sleep(0.05)  # decoding, or waiting for the CPU task that decodes
        yield batch


def test_rejects_are_built_by_one_helper_and_counted_by_reason(tmp_path):
    assert reject("k", ("too_odd", "why"), "src") == {"key": "k", "reason": "too_odd", "detail": "why", "source": "src"}
    stats = run_shard(_RejectEveryRow(), WorkUnit("part-00000.parquet", {}), str(tmp_path), make_config(),
                      prepared=_slow_batches([[{"key": "a"}], [{"key": "b"}]]))
    assert stats["counters"] == {"rejected_too_odd": 2}
    assert read_rejects(tmp_path).to_pylist()[1] == {"key": "b", "reason": "too_odd", "detail": "b is odd", "source": "part-00000.parquet"}


def test_a_shard_times_prepare_model_and_write_within_its_seconds(tmp_path):
    stats = run_shard(_RejectEveryRow(), WorkUnit("part-00000.parquet", {}), str(tmp_path), make_config(),
                      prepared=_slow_batches([[{"key": "a"}], [{"key": "b"}]]))
    timings = stats["timings"]
    assert set(timings) == {"prepare_s", "model_s", "write_s"}
    assert timings["prepare_s"] >= 0.1 and timings["model_s"] >= 0.1 and timings["write_s"] > 0
    assert sum(timings.values()) <= stats["seconds"]
    assert read_stats(tmp_path)["part-00000.parquet"]["timings"] == timings  # written with the shard


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from pipeline.models.tiny import build_tiny_llm

    prompt = (REPO / "prompts" / "hierarcaps_seed.v1.txt").read_text()
    return build_tiny_llm(tmp_path_factory.mktemp("models") / "llm", [prompt] * 20)


def test_planning_never_changes_the_config_and_the_hash_covers_the_resolved_paths(tiny_llm, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_llm.parent)
    captions = tmp_path / "captions.txt"
    captions.write_text("a brown dog asleep on a red sofa\ntwo boats in a harbour\n")
    config = make_config(f"hierarcaps.model={tiny_llm.name}", "hierarcaps.max_new_tokens=4")  # a relative local path
    before = copy.deepcopy(config)
    stage = HierarcapsSeedStage(captions)
    stage.plan(config)
    assert config == before
    resolved = stage.resolve(config)
    assert config == before and resolved.hierarcaps.model == str(tiny_llm.resolve())
    assert resolved.sections_hash(stage.config_sections) != config.sections_hash(stage.config_sections)

    summary = run_stage(stage, tmp_path / "seed", config)
    assert config == before
    manifest = json.loads((summary.out_dir / "_manifest.json").read_text())
    assert manifest["config"]["hierarcaps"]["model"] == str(tiny_llm.resolve())  # what the workers loaded
    (stats,) = read_stats(summary.out_dir).values()
    assert set(stats["timings"]) == {"prepare_s", "model_s", "write_s"}  # the in-process executor times the same parts
    assert sum(stats["timings"].values()) <= stats["seconds"] and stats["timings"]["model_s"] > 0


def test_plan_of_every_settings_section_leaves_the_config_alone(tmp_path, monkeypatch):
    """Ground and negatives resolve several model settings; their plans refuse bad input before
    touching anything either way."""
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    config = make_config("ground.text_encoder=model", "ground.owl_model=model", "negatives.nli_model=model", "negatives.model=model")
    before = copy.deepcopy(config)
    for stage in (GroundStage(tmp_path / "none"), NegativesStage(tmp_path / "none")):
        resolved = stage.resolve(config)
        assert config == before
        section = resolved.ground if isinstance(stage, GroundStage) else resolved.negatives
        paths = [section.text_encoder, section.owl_model] if isinstance(stage, GroundStage) else [section.nli_model, section.model]
        assert paths == [str(tmp_path / "model")] * 2 and all(os.path.isabs(p) for p in paths)


def test_seed_and_augment_are_separate_stages():
    assert HierarcapsSeedStage.name == "hierarcaps-seed" and HierarcapsAugmentStage.name == "hierarcaps-augment"
    assert HierarcapsSeedStage.prompt_setting == "seed_prompt" and HierarcapsAugmentStage.prompt_setting == "augment_prompt"
    assert isinstance(HierarcapsSeedStage(Path(".")), GeneratorStage)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_model_stage_on_ray_times_the_same_parts(tiny_llm, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a brown dog asleep on a red sofa\ntwo boats in a harbour\n")
    config = make_config(f"hierarcaps.model={tiny_llm}", "hierarcaps.max_new_tokens=4", "run.executor=ray")
    summary = run_stage(HierarcapsSeedStage(captions), tmp_path / "seed", config)
    (stats,) = read_stats(summary.out_dir).values()
    # on Ray prepare_s is the actor's wait for the CPU task's batches
    assert set(stats["timings"]) == {"prepare_s", "model_s", "write_s"}
    assert sum(stats["timings"].values()) <= stats["seconds"] and stats["timings"]["model_s"] > 0
