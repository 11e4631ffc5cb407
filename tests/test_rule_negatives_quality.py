"""The rules backend's negatives against a hand check (issue 14): tests/data/negatives_handcheck.jsonl
holds 42 region phrases and a person's verdict on every negative the rules offer for them (valid =
contradicts the phrase on one attribute, grammatical, sensible for the object). A negative the rules
offer that nobody judged fails the test: change the rules, judge what they newly offer."""

import json
from pathlib import Path

import pytest

from pipeline.models.spacy_nlp import load_spacy
from pipeline.stages.fggrn.attribute_swap import attribute_swaps, noun_class
from pipeline.stages.fggrn.negative_checks import meaning_problem

HANDCHECK = Path(__file__).parent / "data" / "negatives_handcheck.jsonl"


@pytest.fixture(scope="module")
def nlp():
    return load_spacy("en_core_web_sm")


def negatives(nlp, phrase: str, head: str, limit: int = 10) -> list[str]:
    doc = nlp(phrase)
    index = next(t.i for t in doc if t.lemma_.lower() == head or t.lower_.startswith(head))
    return [swap.text for swap in attribute_swaps(doc, index, limit=limit, seed=0)]


def test_hand_checked_valid_rate_is_at_least_95_percent(nlp):
    rows = [json.loads(line) for line in HANDCHECK.read_text().splitlines()]
    assert len(rows) >= 40
    judged, valid, unjudged, ten_or_more = 0, 0, [], 0
    for row in rows:
        offered = negatives(nlp, row["phrase"], row["head"])
        ten_or_more += len(offered) >= 10
        for text in offered:
            verdict = row["verdicts"].get(text)
            if verdict is None:
                unjudged.append((row["phrase"], text))
                continue
            judged += 1
            valid += verdict == "valid"
    assert not unjudged, f"judge these and add them to {HANDCHECK.name}: {unjudged}"
    assert judged >= 200 and valid / judged >= 0.95, (valid, judged)
    assert ten_or_more >= 10  # still a full list for many regions (14 of 42 when judged)


@pytest.mark.parametrize(
    "phrase, head, never, still",
    [
        ("a man in a bright jacket", "man", ["a man in a blue jacket", "a man in a red jacket"], "a man in a dark jacket"),
        ("a red car", "car", ["a dark car", "a bright car"], "a blue car"),
        ("three ducks", "duck", ["several ducks", "many ducks"], "four ducks"),
        ("four yellow taxis", "taxi", ["several yellow taxis"], "five yellow taxis"),
        ("a stainless steel refrigerator", "refrigerator", ["a stainless marble refrigerator", "a stainless plastic refrigerator"], "a plastic refrigerator"),
        ("a man in a navy blue jacket", "man", ["a man in a navy red jacket"], "a man in a red jacket"),
        ("a shiny gold watch", "watch", ["a furry gold watch", "a fluffy gold watch", "a soft gold watch"], "a matte gold watch"),
        ("a broken white plate", "plate", ["a running white plate", "a sleeping white plate", "a closed white plate"], "an intact white plate"),
        ("an old telephone booth", "booth", ["a young telephone booth", "a youthful telephone booth"], "a new telephone booth"),
        ("a woolen scarf", "scarf", ["a brick scarf", "a glass scarf", "a fabric scarf"], "a cotton scarf"),
        ("an orange cat", "cat", ["a blue cat", "a purple cat"], "a black cat"),
        ("a round wooden table", "table", ["a cylindrical wooden table", "a flat wooden table", "a round fabric table"], "a square wooden table"),
        ("a man holding a glass", "man", ["a man holding a wooden"], None),
        ("a square window on the left", "window", ["a square window on the bottom", "a square window on the lower"], "a square window on the right"),
    ],
)
def test_rules_offer_only_contradicting_sensible_grammatical_values(nlp, phrase, head, never, still):
    texts = negatives(nlp, phrase, head, limit=40)
    assert not set(never) & set(texts), texts
    assert (still in texts) if still else texts == [], texts


def test_no_two_negatives_of_one_list_say_the_same(nlp):
    for row in map(json.loads, HANDCHECK.read_text().splitlines()):
        accepted = []
        for text in negatives(nlp, row["phrase"], row["head"], limit=40):
            assert meaning_problem(row["phrase"], text, accepted, None, 1.0) is None, (row["phrase"], text, accepted)
            accepted.append(text)


def test_noun_classes():
    assert [noun_class(w) for w in ("man", "fireman", "puppy", "watch", "plate", "booth", "gizmo")] == [
        "person", "person", "animal", "device", "vessel", "building", "thing"]
