import json
import re

import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_IMAGES, assert_dataset_invariants, make_config, read_rows

from pipeline.core.schemas import conform
from pipeline.core.shards import read_json
from pipeline.errors import FgdataError
from pipeline.models.nli import NliScorer
from pipeline.models.spacy_nlp import load_spacy
from pipeline.models.tiny import build_tiny_nli
from pipeline.runner import run_stage
from pipeline.stages.fggrn.attribute_swap import LEXICONS, attribute_swaps, contrasting_words
from pipeline.stages.fggrn.negative_checks import structure_problem, words
from pipeline.stages.fggrn.negatives import NegativesStage


def reason_of(problem):
    """A check's (reason, detail) read as its reason; the detail must say something."""
    if problem is None:
        return None
    reason, detail = problem
    assert isinstance(detail, str) and detail, problem
    return reason

SWAPPABLE = [
    ("a red cup", "cup"), ("a blue car", "car"), ("two small dogs", "dog"), ("a wooden table", "table"),
    ("a striped shirt", "shirt"), ("an old fisherman", "fisherman"), ("a tall lighthouse", "lighthouse"),
    ("three white sheep", "sheep"), ("a leather bag", "bag"), ("a round wall clock", "clock"),
    ("a glass vase", "vase"), ("a black laptop", "laptop"), ("a green tractor", "tractor"),
    ("a large wave", "wave"), ("a young girl in a pink dress", "girl"), ("a metal rail", "rail"),
    ("an empty bottle", "bottle"), ("a wet road", "road"), ("an open door", "door"), ("a brown horse", "horse"),
    ("a shiny guitar", "guitar"), ("a fluffy cat", "cat"), ("a square window", "window"),
    ("the left hand", "hand"), ("a plastic chair", "chair"), ("a marble counter", "counter"),
    ("four yellow taxis", "taxi"), ("a narrow street", "street"), ("a purple flower", "flower"),
    ("a thick book", "book"), ("a floral dress", "dress"), ("a stone bridge", "bridge"),
    ("a silver spoon", "spoon"), ("a tiny bird", "bird"), ("a checkered flag", "flag"),
    ("a broken window", "window"), ("an orange and white lighthouse", "lighthouse"),
    ("a small sailboat with a white sail", "sailboat"), ("a vintage typewriter", "typewriter"),
    ("a grey brick wall", "wall"), ("several parked cars", "car"), ("a ceramic mug", "mug"),
]
NOT_SWAPPABLE = [
    ("a man", "man"), ("the camera", "camera"), ("buildings", "building"), ("a model of the space shuttle", "model"),
    ("saline", "saline"), ("a tripod", "tripod"), ("students", "student"), ("an acoustic guitar", "guitar"),
]


def head_index(doc, head):
    return next(t.i for t in doc if t.lemma_.lower() == head or t.lower_.startswith(head))


def test_rule_based_swaps_change_exactly_one_attribute_of_fifty_phrases():
    assert len(SWAPPABLE) + len(NOT_SWAPPABLE) >= 50
    nlp = load_spacy("en_core_web_sm")
    for phrase, head in SWAPPABLE:
        doc = nlp(phrase)
        swaps = attribute_swaps(doc, head_index(doc, head), limit=10, seed=0)
        # 10, or fewer where the lexicon has fewer contradicting words (a tall lighthouse: only short)
        assert 1 <= len(swaps) <= 10, phrase
        seen = set()
        for swap in swaps:
            assert structure_problem(phrase, swap.text, head, seen) is None, (phrase, swap.text)
            seen.add(" ".join(words(swap.text)))
            before, after = words(phrase), words(swap.text)
            changed = [(a, b) for a, b in zip(before, after) if a != b and a not in ("a", "an")]
            # read from the texts: one word replaced by a word that contradicts it on a scale of
            # the attribute the swap names
            assert len(before) == len(after) and len(changed) == 1, swap
            (old_word, new_word), = changed
            assert old_word in LEXICONS[swap.attribute] and new_word in contrasting_words(old_word), swap
        assert attribute_swaps(doc, head_index(doc, head), limit=10, seed=0) == swaps  # deterministic
    for phrase, head in NOT_SWAPPABLE:
        doc = nlp(phrase)
        assert attribute_swaps(doc, head_index(doc, head), limit=10, seed=0) == [], phrase


def test_articles_agree_with_the_new_word():
    nlp = load_spacy("en_core_web_sm")
    texts = {swap.text for swap in attribute_swaps(nlp("an old fisherman"), 2, limit=10, seed=0)}
    assert "a young fisherman" in texts and not any(t.startswith("an young") for t in texts)
    assert {swap.text for swap in attribute_swaps(nlp("a young fisherman"), 2, limit=10, seed=0)} == {"an old fisherman"}


def swap_texts(phrase: str, head: str, limit: int = 40) -> list[str]:
    doc = load_spacy("en_core_web_sm")(phrase)
    return [swap.text for swap in attribute_swaps(doc, head_index(doc, head), limit=limit, seed=0)]


# Issue 21's bad rule-based negatives: (phrase, head, texts that must never be offered, one that still must be).
BAD_SWAPS = [
    ("a bright-red car", "car", ["a bright-bright car", "a blue-red car", "a bright-blue car"], None),
    ("a bright-red car with a wooden door", "car", ["a bright-bright car with a wooden door"], "a bright-red car with a metal door"),
    ("a 2-year-old child", "child", ["a 2-year-retro child", "a 2-year-young child"], None),
    ("a 2-year-old child in a red coat", "child", ["a 2-year-new child in a red coat"], "a 2-year-old child in a blue coat"),
    ("a black-and-white dog", "dog", ["a white-and-white dog", "a black-and-black dog"], None),
    ("a small black-and-white dog", "dog", ["a small white-and-white dog"], "a large black-and-white dog"),
    ("a red/white flag", "flag", ["a red/red flag", "a white/white flag"], None),
    ("a single bird", "bird", ["an eight bird", "a many bird", "a two bird"], None),
    ("a single red bird", "bird", ["an eight red bird", "a many red bird"], "a single blue bird"),
    ("two brown dogs", "dog", ["single brown dogs"], "three brown dogs"),
    ("A RED CAR", "car", ["A Purple CAR", "A Blue CAR", "A purple CAR", "An ORANGE CAR"], "A BLUE CAR"),
    ("A RED CAR", "car", [], "AN ORANGE CAR"),
    ("A red car", "car", ["A Purple car", "AN orange car"], "An orange car"),
    ("a red car", "car", ["a gray car"], "a grey car"),  # one spelling per colour
    ("a gray car", "car", ["a grey car", "a gray car"], "a red car"),
    ("an old man", "man", ["an elderly man", "an aged man", "an ancient man", "an antique man", "a vintage man"], "a young man"),
    ("a young man", "man", ["a youthful man"], "an old man"),
    ("a large horse", "horse", ["a huge horse", "a giant horse", "a big horse", "a tall horse", "a thin horse"], "a small horse"),
    ("an antique clock", "clock", ["a vintage clock", "a retro clock", "an old clock", "a young clock"], "a new clock"),
    ("a metal fence", "fence", ["a steel fence", "a metallic fence"], "a wooden fence"),
    ("a red car", "car", [], "a blue car"),
]


@pytest.mark.parametrize("phrase, head, never, still", BAD_SWAPS, ids=[f"{c[0]}:{c[3]}" for c in BAD_SWAPS])
def test_rule_based_swaps_keep_compounds_number_case_and_meaning(phrase, head, never, still):
    texts = swap_texts(phrase, head)
    assert not set(never) & set(texts), texts
    if still is None:
        assert texts == [], texts  # the only attribute sits inside a compound or is a singular count
    else:
        assert still in texts, texts
    assert len({" ".join(words(t)) for t in texts}) == len(texts)  # no two of one meaning ("grey"/"gray")
    assert not ({"a grey car", "a gray car"} <= set(texts))


@pytest.mark.parametrize(
    "positive, negative, reason",
    [
        ("a large horse", "a huge horse", "same_meaning"),
        ("an old man", "an elderly man", "same_meaning"),
        ("a grey car", "a gray car", "same_meaning"),
        ("an antique clock", "a vintage clock", "same_meaning"),
        ("a young girl", "a youthful girl", "same_meaning"),
        ("a large horse", "a small horse", None),
        ("an old man", "a young man", None),
    ],
)
def test_near_synonyms_from_any_backend_are_no_negatives(positive, negative, reason):
    head = positive.split()[-1]
    assert reason_of(structure_problem(positive, negative, head, set())) == reason


@pytest.mark.parametrize(
    "negative, reason",
    [
        ("a blue cup", None),
        ("a red cup", "same_as_positive"),
        ("A  Red  cup", "same_as_positive"),
        ("", "empty"),
        ("a red mug", "object_changed"),
        ("the red cup", "only_function_words_changed"),
        ("a huge shiny blue ceramic cup", "too_many_changes"),
        ("a seen cup", "duplicate"),
        ("a red cup that someone left on the table next to the window of the kitchen", "length_mismatch"),
        # what SmolLM2-135M wrote (bench/results/real_llm_answers.jsonl): words dropped, identifiers
        ("a cup", "only_words_removed"),
        ("the cup", "only_words_removed"),
        ("cup", "only_words_removed"),
        ("a red cup on a table", "only_words_added"),
        ("a photo of a red cup", "only_words_added"),
        ("a_blue_cup", "not_plain_text"),
        ("a {blue} cup", "not_plain_text"),
        ("a blue-green cup", None),
    ],
)
def test_structure_checks(negative, reason):
    assert reason_of(structure_problem("a red cup", negative, "cup", seen={"a seen cup"})) == reason


def test_length_mismatch_is_its_own_reason():
    assert structure_problem("a cup", "a cup of the of the of the", "cup", set()) == ("length_mismatch", "8 words against the positive's 2")


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory):
    texts = [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")] * 10
    return build_tiny_nli(tmp_path_factory.mktemp("models") / "nli", texts)


def test_nli_labels_follow_the_models_own_label_names(tiny_nli, tmp_path):
    """Checkpoints order contradiction/entailment/neutral differently; scores must follow id2label."""
    config = json.loads((tiny_nli / "config.json").read_text())
    reordered = tmp_path / "reordered"
    reordered.mkdir()
    for item in tiny_nli.iterdir():
        (reordered / item.name).write_bytes(item.read_bytes())
    config["id2label"] = {"0": "entailment", "1": "neutral", "2": "contradiction"}
    config["label2id"] = {"entailment": 0, "neutral": 1, "contradiction": 2}
    (reordered / "config.json").write_text(json.dumps(config))
    pair = [("a man holds a red cup", "a man holds a blue cup")]
    original, moved = NliScorer(str(tiny_nli)).score(pair)[0], NliScorer(str(reordered)).score(pair)[0]
    assert sum(original.values()) == pytest.approx(1.0)
    # the same logits, named differently: what was index 0 (contradiction) is now called entailment
    assert moved["entailment"] == pytest.approx(original["contradiction"])
    assert moved["contradiction"] == pytest.approx(original["neutral"])


def region_row(key, caption, phrases):
    regions = []
    for text, head in phrases:
        start = caption.index(text)
        regions.append({"phrase": text, "start": start, "end": start + len(text), "head": head, "box": [1.0, 1.0, 9.0, 9.0], "box_norm": [0.1, 0.1, 0.9, 0.9], "score": 0.9})
    return {"key": key, "short_caption": caption, "long_caption": None, "phrase_source": "short_caption", "width": 10, "height": 10,
            "regions": regions, "detector": "test", "detector_is_random": True, "grounding": "{}"}


@pytest.fixture
def regions_dir(tmp_path):
    rows = [
        region_row("a", "A red cup on a wooden table.", [("A red cup", "cup"), ("a wooden table", "table")]),
        region_row("b", "A man and a dog.", [("A man", "man"), ("a dog", "dog")]),
        region_row("c", "An empty room.", []),
    ]
    path = tmp_path / "regions"
    path.mkdir()
    pq.write_table(conform(rows, "regions"), path / "part-00000.parquet")
    return path


@pytest.mark.usefixtures("ray_session")
def test_negatives_end_to_end_with_a_random_nli_model(tiny_nli, regions_dir, tmp_path):
    out = tmp_path / "fggrn"
    summary = run_stage(NegativesStage(regions_dir), out, make_config("negatives.backend=rules", f"negatives.nli_model={tiny_nli}", "negatives.per_region=5", "negatives.nli_rule=not_entailed"))
    assert (summary.rows_in, summary.rows_out) == (3, 3)
    assert_dataset_invariants(out)
    rows = {r["key"]: r for r in read_rows(out)}
    cup, table = rows["a"]["regions"]
    assert cup["negatives_flag"] == "ok" and len(cup["negatives"]) == 5
    assert all(n["text"].endswith(" cup") and n["entailment"] < 0.5 for n in cup["negatives"])
    assert {n["attribute"] for n in table["negatives"]} == {"material"}
    assert [r["negatives_flag"] for r in rows["b"]["regions"]] == ["no_swappable_attribute"] * 2
    assert rows["c"]["regions"] == [] and rows["a"]["nli_is_random"]
    manifest = read_json(out / "_manifest.json")
    assert manifest["counters"]["negatives"] == 10 and manifest["counters"]["regions_no_swappable_attribute"] == 2


@pytest.mark.usefixtures("ray_session")
def test_nli_filter_drops_entailed_negatives_and_flags_the_region(tiny_nli, regions_dir, tmp_path):
    out = tmp_path / "fggrn"
    run_stage(NegativesStage(regions_dir), out, make_config("negatives.backend=rules", f"negatives.nli_model={tiny_nli}", "negatives.nli_rule=not_entailed", "negatives.max_entailment=0"))
    cup = read_rows(out)[0]["regions"][0]
    assert cup["negatives"] == [] and cup["negatives_flag"] == "too_few_valid"
    # every candidate: the 13 colours for the cup (up to negatives.candidates=20, not just per_region)
    # + the 7 materials a table can be made of (no fabric/brick/paper table)
    assert read_json(out / "_manifest.json")["counters"]["dropped_entailed"] == 20


def test_bad_negatives_settings_stop_before_any_work(tiny_nli, regions_dir, tmp_path):
    with pytest.raises(FgdataError, match="negatives.backend must be rules, transformers or vllm"):
        run_stage(NegativesStage(regions_dir), tmp_path / "o", make_config("negatives.backend=gpt"))
    with pytest.raises(FgdataError, match="cannot use model '/no/nli'"):
        run_stage(NegativesStage(regions_dir), tmp_path / "o", make_config("negatives.backend=rules", "negatives.nli_model=/no/nli"))
    with pytest.raises(FgdataError, match="cannot use model '/no/llm'"):
        run_stage(NegativesStage(regions_dir), tmp_path / "o", make_config(f"negatives.nli_model={tiny_nli}", "negatives.model=/no/llm"))
    assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("ray_session")
def test_export_fgclip_layout(tiny_nli, regions_dir, tmp_path):
    from conftest import image_bytes

    from pipeline.datasets.fgclip_export import export_fgclip, region_description

    fggrn = tmp_path / "fggrn"
    run_stage(NegativesStage(regions_dir), fggrn, make_config("negatives.backend=rules", f"negatives.nli_model={tiny_nli}", "negatives.min_valid=1", "negatives.min_contradiction=0"))
    images = tmp_path / "images"
    images.mkdir()
    rows = [{"key": k, "image": image_bytes(), "width": 10, "height": 10, "format": "JPEG", "short_caption": None, "source": "t"} for k in ("a", "b")]
    pq.write_table(conform(rows, "images"), images / "part-00000.parquet")
    out = tmp_path / "export"
    # these rows have no long caption: refused before anything is written, unless allowed
    with pytest.raises(FgdataError, match="1 of 1 images .* have no long caption.*--allow-missing-long-captions"):
        export_fgclip(fggrn, out, images, negatives_needed=10, progress=False, require_negatives=True)
    assert not out.exists()
    summary = export_fgclip(fggrn, out, images, negatives_needed=10, progress=False, allow_missing_long_captions=True, require_negatives=True)
    # "b" (a man, a dog) has no box with 10 negatives: --require-negatives leaves it out
    assert (summary["items"], summary["missing_images"], summary["missing_long_captions"]) == (1, ["c"], 1)
    assert summary["left_out_keys"] == {"no_usable_box": [], "no_box_with_negatives": ["b"]}
    items = json.loads((out / "fgclip.json").read_text())
    first = items[0]
    assert first["caption"] == "A red cup on a wooden table." and first["short_caption"] == "A red cup on a wooden table."
    assert (out / first["f_path"]).read_bytes() == rows[0]["image"]
    cup = first["bbox_info"][0]
    assert cup["bbox"] == [0.1, 0.1, 0.9, 0.9] and cup["short_expr"] == "a red cup"
    assert cup["long_expr"] == "a red cup on a wooden table"
    assert cup["flag_short_neg"] == 1 and list(cup["short_expr_negs"]) == [str(i) for i in range(10)]
    assert all(n.endswith(" cup") for n in cup["short_expr_negs"].values())
    table = first["bbox_info"][1]
    # a table can be made of 7 other materials (no fabric/brick/paper table): fewer than 10, so no short negatives flag
    assert (table["short_expr"], table["long_expr"], table["flag_short_neg"]) == ("a wooden table", "a wooden table", 0)
    assert region_description("A dog runs. A red cup sits here! Done", 12, 21) == "A red cup sits here"


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from pathlib import Path

    from pipeline.models.tiny import build_tiny_llm

    prompt = (Path(__file__).parent.parent / "prompts" / "hard_negatives.v1.txt").read_text()
    texts = [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")] * 10 + [prompt] * 10
    return build_tiny_llm(tmp_path_factory.mktemp("models") / "llm", texts)


@pytest.mark.usefixtures("ray_session")
def test_llm_backend_end_to_end_with_a_random_model(tiny_nli, tiny_llm, regions_dir, tmp_path):
    out = tmp_path / "fggrn"
    settings = ["negatives.backend=transformers", f"negatives.model={tiny_llm}", f"negatives.nli_model={tiny_nli}", "negatives.max_new_tokens=24"]
    summary = run_stage(NegativesStage(regions_dir), out, make_config(*settings))
    assert (summary.rows_in, summary.rows_out) == (3, 3)
    assert_dataset_invariants(out)
    manifest = read_json(out / "_manifest.json")
    # a random model writes noise: nothing parses, every region is flagged with why, nothing is silently lost
    flags = {k: v for k, v in manifest["counters"].items() if k.startswith("regions_")}
    assert sum(flags.values()) == 4 and "regions_ok" not in flags
    assert sum(v for k, v in manifest["counters"].items() if k.startswith("llm_") and k != "llm_wrong_count") == 4
    assert sum(v for k, v in flags.items() if k.startswith("regions_llm_")) == 4
    assert manifest["provenance"]["random_weights"] == [True]
    backend = read_rows(out)[0]["negatives_backend"]
    assert str(tiny_llm) in backend and "prompt hard_negatives.v1 sha256:" in backend and '"temperature": 0.7' in backend


def test_prompts_are_filled_without_format_and_share_their_prefix():
    from pipeline.core.prompts import load_prompt
    from pipeline.stages.fggrn.negatives import fill_prompt

    template = load_prompt("hard_negatives.v1").text
    first = fill_prompt(template, 10, "A red cup on a table.", "A red cup")
    second = fill_prompt(template, 10, "A dog.", "a dog")
    assert "write 10 new phrases" in first and first.endswith("Phrase: A red cup")
    shared = len(first) - len(first.split("Caption:")[1])
    assert first[:shared] == second[:shared]  # the instructions come first, identical, for prefix caching
    assert fill_prompt('{"negative": "..."} {phrase}', 3, "c", "p") == '{"negative": "..."} p'


def test_vllm_text_adapter_asks_for_structured_json(tiny_llm, monkeypatch):
    import sys
    from pathlib import Path

    from pipeline.models.generation import Sampling
    from pipeline.stages.fggrn.negatives import answer_schema

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fakes"))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm  # the FAKE from tests/fakes

    from pipeline.models.text_lm import VllmLM

    vllm.CALLS.clear()
    model = VllmLM(str(tiny_llm), revision=None, trust_remote_code=False, dtype="auto", tensor_parallel_size=4)
    results = model.generate(["Phrase: a red cup"], Sampling(max_new_tokens=100, temperature=0.7, top_p=0.9, seed=3), json_schema=answer_schema(10))
    (_, llm_kwargs), (_, params), (_, call) = vllm.CALLS
    assert llm_kwargs["enable_prefix_caching"] is True and llm_kwargs["tensor_parallel_size"] == 4
    assert json.loads(params["structured_outputs"].kwargs["json"]) == answer_schema(10)
    assert {k: params[k] for k in ("max_tokens", "temperature", "top_p", "seed")} == {"max_tokens": 100, "temperature": 0.7, "top_p": 0.9, "seed": 3}
    assert call["prompts"][0].endswith("Phrase: a red cup<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert results[0].text == "fake output 0"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_demo_sample_from_images_to_fggrn_and_resume(tiny_nli, tmp_path):
    from pipeline.models.tiny import build_tiny_clip_text
    from pipeline.stages.fggrn.ground import GroundStage
    from pipeline.stages.fggrn.ingest import IngestStage
    from pipeline.stages.fggrn.phrases import PhrasesStage

    clip = build_tiny_clip_text(tmp_path / "clip", [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")] * 10)
    run_stage(IngestStage(SAMPLE_IMAGES), tmp_path / "images", make_config("ingest.rows_per_shard=8"))
    run_stage(PhrasesStage(tmp_path / "images"), tmp_path / "phrases", make_config())
    ground = ("ground.detector=yolov8s-worldv2.yaml", f"ground.text_encoder={clip}", "ground.score_threshold=0")
    run_stage(GroundStage(tmp_path / "phrases"), tmp_path / "regions", make_config(*ground))
    settings = make_config("negatives.backend=rules", f"negatives.nli_model={tiny_nli}", "negatives.min_contradiction=0")  # random NLI: threshold open
    first = run_stage(NegativesStage(tmp_path / "regions"), tmp_path / "fggrn", settings)
    assert (first.rows_in, first.rows_out, first.rows_rejected) == (17, 17, 0)
    assert_dataset_invariants(tmp_path / "fggrn")
    rows = read_rows(tmp_path / "fggrn")
    again = run_stage(NegativesStage(tmp_path / "regions"), tmp_path / "fggrn", settings)
    assert (again.shards_run, again.shards_skipped) == (0, 3) and read_rows(tmp_path / "fggrn") == rows
    assert any(region["negatives"] for row in rows for region in row["regions"])


def test_transformers_adapter_holds_answers_to_the_json_schema_as_vllm_does(tiny_llm):
    # a RANDOM model writes noise; held to the schema token by token (xgrammar), its noise is the
    # schema's JSON, or is cut at max_new_tokens inside it. Without the schema it is not JSON at all.
    from pipeline.models.generation import Sampling
    from pipeline.models.text_lm import TransformersLM
    from pipeline.stages.fggrn.negatives import answer_schema

    model = TransformersLM(str(tiny_llm), revision=None, trust_remote_code=False, dtype="auto")
    prompts = ["Phrase: a red cup", "Phrase: two small dogs on a green lawn", "Phrase: a wooden table"]
    for temperature in (0.0, 0.7):
        sampling = Sampling(max_new_tokens=120, temperature=temperature, top_p=0.95, seed=1)
        held = model.generate(prompts, sampling, json_schema=answer_schema(2))
        first_keys = [re.match(r'\[\s*(?:\{\s*"(\w+)")?', answer.text) for answer in held]
        # the schema's property order, as vLLM keeps it: "negative" first (sampling gets that far)
        assert all(m and m.group(1) in (None, "negative") for m in first_keys) and (temperature == 0 or all(m.group(1) for m in first_keys))
        for answer in held:
            assert answer.text.startswith("["), answer.text
            if answer.finish_reason == "stop":
                items = json.loads(answer.text)
                assert isinstance(items, list) and len(items) <= 2
                assert all(isinstance(i, dict) and {"negative", "attribute"} <= set(i) and isinstance(i["negative"], str) for i in items)
    free = model.generate(prompts, Sampling(max_new_tokens=40, temperature=0.0, top_p=1.0, seed=1))
    assert not any(answer.text.startswith("[") for answer in free)
