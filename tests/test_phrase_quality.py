"""Phrase splitting against captions labelled by hand for these tests.

tests/data/phrase_labels_{dev,test}.jsonl (issue 14): 152 captions written for this project, each
with its kind (short alt-text, COCO-style sentence, multi-sentence MLLM-style paragraph), split in
two halves of 76. The test half was written and committed before any rule was tuned; rules were
tuned on the dev half only. Their labels follow the rules documented in README ("How captions
become phrases"):
- every noun phrase that names a concrete, visible object is an expression, nested ones included
  ("a man in a blue jacket" and "a blue jacket"); no pronoun, abstract/scene-level, number, date,
  place or negated phrase; a quantity word before "of" gives way to what it counts ("students");
- a phrase is expanded by one attribute: "of" always ("a glass of wine"), "in" only by something
  worn ("a girl in a pink dress"), "with" only by something worn, a part or a marking ("a kitten
  with blue eyes"); "a table with a mug" and "strawberries in a bowl" are two objects;
- no verb is part of a phrase ("a chef in a white hat slices tomatoes");
- the same words again (up to a leading determiner) are one expression, its first mention.

tests/data/phrase_labels.jsonl: the older 46 captions, labelled with maximal expressions only (no
nested phrases), so they are scored on the maximal expressions of the output.
"""

import json
from pathlib import Path

import pytest
from conftest import phrase_precision_recall

from pipeline.config import PhrasesConfig
from pipeline.models.spacy_nlp import load_spacy
from pipeline.stages.fggrn.expressions import extract_expressions
from pipeline.stages.fggrn.phrases import rules_from

DATA = Path(__file__).parent / "data"


def _labels(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


# (file, floors for precision and recall, whether the output is reduced to maximal expressions).
# en_core_web_sm 3.8.0 measured, test half (never tuned on): 0.950 / 0.953; dev half: 0.969 /
# 0.949; old set: 0.953 / 0.962 (before issue 14: 0.962 / 0.943 there, 0.881 / 0.721 on the test
# half and 0.820 / 0.631 on the dev half). Its misses are its tagging errors ("tattoo" read as an adverb, "surfboard" as an
# adjective). The floors leave room for parser noise across spaCy patch releases.
SETS = [
    ("phrase_labels_test.jsonl", 0.90, 0.90, False),
    ("phrase_labels_dev.jsonl", 0.90, 0.90, False),
    ("phrase_labels.jsonl", 0.90, 0.88, True),
]


def _maximal(found: list[dict]) -> list[dict]:
    return [p for p in found if not any(o is not p and o["start"] <= p["start"] and p["end"] <= o["end"] for o in found)]


@pytest.mark.parametrize("name, precision_floor, recall_floor, maximal_only", SETS)
def test_phrase_precision_and_recall_on_hand_labelled_captions(name, precision_floor, recall_floor, maximal_only, capsys):
    labels = _labels(name)
    nlp = load_spacy(PhrasesConfig().spacy_model)
    rules = rules_from(PhrasesConfig())
    found_per_caption = []
    for item, doc in zip(labels, nlp.pipe([item["caption"] for item in labels])):
        found = extract_expressions(doc, rules)
        for phrase in found:  # spans index the caption exactly
            assert item["caption"][phrase["start"] : phrase["end"]] == phrase["text"]
        found_per_caption.append(_maximal(found) if maximal_only else found)
    precision, recall, misses = phrase_precision_recall(labels, found_per_caption)
    with capsys.disabled():
        print(f"\nphrase quality on {name} ({len(labels)} captions): precision {precision:.3f}, recall {recall:.3f}")
        print("\n".join(misses))
    assert precision >= precision_floor and recall >= recall_floor


def test_new_label_set_size_kinds_and_split():
    dev, test = _labels("phrase_labels_dev.jsonl"), _labels("phrase_labels_test.jsonl")
    assert len(dev) + len(test) >= 150
    assert not {item["caption"] for item in dev} & {item["caption"] for item in test}
    for half in (dev, test):
        kinds = [item["kind"] for item in half]
        assert {kind: kinds.count(kind) for kind in set(kinds)} == {"alt": 30, "coco": 32, "mllm": 14}
        for item in half:  # every label is a span of its caption
            assert all(phrase in item["caption"] for phrase in item["phrases"]), item["caption"]
