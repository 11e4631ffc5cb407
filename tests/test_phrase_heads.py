"""Phrases keep their whole head noun on everyday photo captions full of compound nouns (issue 27).

tests/data/phrase_heads.jsonl: 118 COCO-style captions written for this test (no dataset text),
rich in compound nouns ("fire hydrant", "trash can", "lap top", "street light"), each labelled by
hand with its expressions under the rules of tests/test_phrase_quality.py (nested phrases
included, "of" always joins, "in" only what is worn, "with" only what is worn or a part).

A predicted phrase is correct when it equals a labelled one (case aside): precision = correct /
predicted, recall = correct / labelled, over the whole set. en_core_web_sm 3.8.0 measured: before
issue 27 0.955 / 0.938 (heads cut where the tagger read "bear", "sink", "can", "oven" as verbs or
the verb guard took "bats", "games", "wings" for verbs; "street light", "lap top" dropped as
abstract); after 0.997 / 0.993 (left: "a polar bear swimming", "a half eaten donut" missed).
"""

import json
from pathlib import Path

import pytest
from conftest import phrase_precision_recall

from pipeline.config import PhrasesConfig
from pipeline.models.spacy_nlp import load_spacy
from pipeline.stages.fggrn.expressions import extract_expressions
from pipeline.stages.fggrn.phrases import rules_from

LABELS = [json.loads(line) for line in (Path(__file__).parent / "data" / "phrase_heads.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def parsed():
    nlp = load_spacy(PhrasesConfig().spacy_model)
    rules = rules_from(PhrasesConfig())
    return [extract_expressions(doc, rules) for doc in nlp.pipe([item["caption"] for item in LABELS])]


def test_the_set_is_large_and_every_label_is_a_span_of_its_caption():
    assert len(LABELS) >= 100
    assert len({item["caption"] for item in LABELS}) == len(LABELS)
    for item in LABELS:
        assert all(phrase in item["caption"] for phrase in item["phrases"]), item["caption"]


def test_phrases_keep_their_compound_heads_precision_and_recall(parsed, capsys):
    precision, recall, misses = phrase_precision_recall(LABELS, parsed)
    with capsys.disabled():
        print(f"\nphrase heads ({len(LABELS)} captions): precision {precision:.3f}, recall {recall:.3f}")
        print("\n".join(misses))
    assert precision >= 0.95 and recall >= 0.95


@pytest.mark.parametrize(
    "caption, phrase",
    [
        ("A man holding two baseball bats in a field.", "two baseball bats"),
        ("Some wine glasses and a bottle on a table.", "Some wine glasses"),
        ("Kids playing video games on a couch.", "video games"),
        ("Two stuffed teddy bears on a bed.", "Two stuffed teddy bears"),
        ("A large plastic trash can next to a bench.", "A large plastic trash can"),
        ("A silver lap top on a desk.", "A silver lap top"),
        ("A street light next to a road.", "A street light"),
    ],
)
def test_the_reported_captions_keep_the_whole_head(caption, phrase):
    doc = load_spacy(PhrasesConfig().spacy_model)(caption)
    assert phrase in [p["text"] for p in extract_expressions(doc, rules_from(PhrasesConfig()))]


@pytest.mark.parametrize(
    "caption, phrases",
    [
        # a true verb after a noun stays a verb
        ("A dog can catch a frisbee.", ["A dog", "a frisbee"]),
        ("A dog and a cat sleep on a sofa.", ["A dog", "a cat", "a sofa"]),
        ("The couple kiss on a bridge.", ["The couple", "a bridge"]),
        ("A brown cow grazes near a fence.", ["A brown cow", "a fence"]),
        ("A skateboarder riding down a concrete ramp.", ["A skateboarder", "a concrete ramp"]),
        ("A girl with curly hair smiles at the camera.", ["A girl with curly hair", "curly hair", "the camera"]),
        # light and top alone are no objects, nor a light named by a time
        ("The light on the top of a cake.", ["a cake"]),
        ("The photograph shows the early morning light over a lake.", ["a lake"]),
    ],
)
def test_true_verbs_and_abstract_heads_stay_out(caption, phrases):
    doc = load_spacy(PhrasesConfig().spacy_model)(caption)
    assert [p["text"] for p in extract_expressions(doc, rules_from(PhrasesConfig()))] == phrases


@pytest.mark.parametrize(
    "caption",
    ["can", "Can can can.", "bear bear", "a a can can", "trash can", "A can.", "sink", "light top frame", "A soda can can",
     "A TRASH CAN", "a teddy bear bear bear bear", "🐻 bear", "A can - can"],
)
def test_odd_captions_give_spans_of_the_caption(caption):
    doc = load_spacy(PhrasesConfig().spacy_model)(caption)
    for phrase in extract_expressions(doc, rules_from(PhrasesConfig())):
        assert caption[phrase["start"] : phrase["end"]] == phrase["text"] and phrase["head"]
