"""Phrase splitting against 46 captions labelled by hand for this test (tests/data/phrase_labels.jsonl).

Labels follow the documented rules: maximal expressions for concrete objects, expanded by one
attribute preposition (of, with, in) while locatives ("on a desk") start a second
expression; no pronoun, abstract/scene-level, number, date or place chunks.
"""

import json
from pathlib import Path

from pipeline.config import PhrasesConfig
from pipeline.expressions import extract_expressions
from pipeline.stages.phrases import load_pipeline, rules_from

LABELS = [json.loads(line) for line in (Path(__file__).parent / "data" / "phrase_labels.jsonl").read_text().splitlines()]
# en_core_web_sm 3.8.0 measured 0.96 precision / 0.94 recall here; what it misses are its
# tagging errors ("retriever" and "croissant" tagged ADJ). The floors leave room for parser
# noise across spaCy patch releases. Without attribute expansion this set scores 0.72/0.81 and
# without the abstract-noun filter 0.86/0.91, both below; the quantifier and entity rules
# change fewer phrases here and have their own tests in test_phrases.py.
PRECISION_FLOOR = 0.90
RECALL_FLOOR = 0.88


def test_phrase_precision_and_recall_on_hand_labelled_captions(capsys):
    nlp = load_pipeline(PhrasesConfig().spacy_model)
    rules = rules_from(PhrasesConfig())
    assert len(LABELS) >= 40
    true_positive = predicted = expected = 0
    misses = []
    for item, doc in zip(LABELS, nlp.pipe([item["caption"] for item in LABELS])):
        found = extract_expressions(doc, rules)
        for phrase in found:  # spans index the caption exactly
            assert item["caption"][phrase["start"] : phrase["end"]] == phrase["text"]
        got = {p["text"].lower() for p in found}
        want = {p.lower() for p in item["phrases"]}
        true_positive += len(got & want)
        predicted += len(got)
        expected += len(want)
        if got != want:
            misses.append(f"{item['caption']}\n   extra {sorted(got - want)}  missing {sorted(want - got)}")
    precision, recall = true_positive / predicted, true_positive / expected
    with capsys.disabled():
        print(f"\nphrase quality on {len(LABELS)} captions: precision {precision:.3f}, recall {recall:.3f}")
        print("\n".join(misses))
    assert precision >= PRECISION_FLOOR and recall >= RECALL_FLOOR
