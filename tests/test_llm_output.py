"""33 messy LLM answers written for this test: the exact parse, then each candidate's verdict."""

import time

import pytest

from pipeline.core.llm_output import parse_negatives
from pipeline.stages.fggrn.negative_checks import structure_problem

GOOD = '[{"negative": "a blue cup", "attribute": "colour"}, {"negative": "a red mug", "attribute": "object"}]'
EXPECTED_GOOD = [("a blue cup", "colour"), ("a red mug", "object")]

CASES = [
    ("clean json", GOOD, EXPECTED_GOOD, None),
    ("code fence", f"```json\n{GOOD}\n```", EXPECTED_GOOD, None),
    ("bare fence", f"```\n{GOOD}\n```", EXPECTED_GOOD, None),
    ("prose before", f"Sure! Here are the negatives:\n{GOOD}", EXPECTED_GOOD, None),
    ("prose around", f"Here you go:\n{GOOD}\nLet me know if you need more.", EXPECTED_GOOD, None),
    ("trailing comma", '[{"negative": "a blue cup", "attribute": "colour"},]', [("a blue cup", "colour")], None),
    ("trailing comma in object", '[{"negative": "a blue cup", "attribute": "colour",}]', [("a blue cup", "colour")], None),
    ("single quotes", "[{'negative': 'a blue cup', 'attribute': 'colour'}]", [("a blue cup", "colour")], None),
    ("list of strings", '["a blue cup", "a green cup"]', [("a blue cup", None), ("a green cup", None)], None),
    ("wrapped in object", '{"negatives": ["a blue cup"]}', [("a blue cup", None)], None),
    ("other key names", '[{"phrase": "a blue cup", "attribute": "Colour"}]', [("a blue cup", "colour")], None),
    ("numbered list", "1. a blue cup\n2. a green cup\n3) a tiny cup", [("a blue cup", None), ("a green cup", None), ("a tiny cup", None)], None),
    ("bulleted list", "- a blue cup\n* a green cup\n• a tiny cup", [("a blue cup", None), ("a green cup", None), ("a tiny cup", None)], None),
    ("numbered with attributes", "1. a blue cup (colour)\n2. a glass cup [material]", [("a blue cup", "colour"), ("a glass cup", "material")], None),
    ("numbered with quotes", '1. "a blue cup"\n2. "a green cup"', [("a blue cup", None), ("a green cup", None)], None),
    ("empty string", "", [], "empty_output"),
    ("whitespace", "  \n ", [], "empty_output"),
    ("empty list", "[]", [], "empty_list"),
    ("list of blanks", '["", "  "]', [], "empty_list"),
    ("objects without text", '[{"attribute": "colour"}]', [], "empty_list"),
    ("refusal", "I'm sorry, I can't help with that.", [], "unparseable"),
    ("truncated json", '[{"negative": "a blue cup", "attribute": "col', [], "unparseable"),
    ("python code", "__import__('os').system('echo hacked')", [], "unparseable"),
    ("mixed types", '["a blue cup", 42, null, {"negative": "a green cup"}]', [("a blue cup", None), ("a green cup", None)], None),
    ("five hundred items", "[" + ", ".join(f'"a cup number {i}"' for i in range(500)) + "]", [(f"a cup number {i}", None) for i in range(500)], None),
]

# what the structure checks say about typical candidates for the positive "a red cup"
VERDICTS = [
    ("a blue cup", None),
    ("a red cup", "same_as_positive"),
    ("A RED CUP", "same_as_positive"),
    ("a red mug", "object_changed"),
    ("一个蓝色的杯子", "not_english"),
    ("une tasse bleue", "object_changed"),
    ("a blue cup with a long handle on a wooden table in the kitchen", "length_mismatch"),
    ("a big shiny deep blue cup", "too_many_changes"),  # 4 content words for 1
]


@pytest.mark.parametrize("name, text, expected, reason", CASES, ids=[c[0] for c in CASES])
def test_parse(name, text, expected, reason):
    assert parse_negatives(text) == (expected, reason)


@pytest.mark.parametrize("negative, verdict", VERDICTS)
def test_candidate_verdicts(negative, verdict):
    problem = structure_problem("a red cup", negative, "cup", seen=set())
    assert (problem and problem[0]) == verdict


def test_there_are_at_least_thirty_cases():
    assert len(CASES) + len(VERDICTS) >= 30


# Hostile answers from issue 12: each once escaped as an exception or took seconds.
HOSTILE = [
    ("100,000 nested brackets", "[" * 100_000, ([], "too_long")),
    ("nested brackets under the size limit", "[" * 5_000 + "]" * 5_000, ([], "unparseable")),  # was RecursionError
    ("integer of 5,000 digits", "[" + "1" * 5_000 + "]", ([], "empty_list")),  # was ValueError
    ("16,000 newlines", "x" + "\n" * 16_000 + "x", ([], "unparseable")),
    ("31,000 newlines", "x" + "\n" * 31_000 + "x", ([], "unparseable")),
    ("spaces after a fence", "```json" + " " * 16_000, ([], "unparseable")),
    ("spaces inside an attribute", "- a cup (" + " " * 16_000 + "colour)", ([("a cup", "colour")], None)),
    ("item after 16,000 blank lines", "Here:" + "\n" * 16_000 + "1. a blue cup (colour)", ([("a blue cup", "colour")], None)),
    ("runaway generation", "- a blue cup\n" * 5_000, ([], "too_long")),
]


@pytest.mark.parametrize("name, text, expected", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_answers_parse_fast(name, text, expected):
    start = time.perf_counter()
    assert parse_negatives(text) == expected
    assert time.perf_counter() - start < 1.0  # the old regexes took 2 s at 16,000 newlines, 8 s at 32,000
