"""Property-based tests over the parsers of model output (hard negatives, hierarchy chains,
long captions): whatever the text, each returns a value or a reason, never raises, in bounded
time; and what a well-behaved model writes is read back exactly."""

import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.caption_quality import CaptionLimits, caption_problem
from pipeline.core.llm_output import MAX_OUTPUT_CHARS, parse_negatives
from pipeline.datasets.chains import SEPARATOR, complete_chain, split_tiers

NEGATIVE_REASONS = {"empty_output", "too_long", "unparseable", "empty_list"}
CHAIN_REASONS = {"empty_output", "too_long", "unparseable", "wrong_tier_count", "blank_tier", "repeated_tier", "last_tier_not_caption", "tier_too_long"}
# min_words=0: a text with no words at all once divided by zero
LIMITS = CaptionLimits(min_words=0, min_latin_fraction=0.6, min_english_fraction=0.08, max_ngram_repeats=4, min_distinct_trigrams=0.5)

# Pieces a broken or hostile answer is made of, each repeated up to 17,000 times: deep brackets
# (RecursionError at ~1,000), long digit runs (ValueError past 4,300), runs of newlines and
# spaces (regex backtracking), fences, arrows, list markers, quotes.
FRAGMENTS = ["[", "]", "{", "}", "[[", "]]", "```", "```json", "\n", " ", "\t", "\r\n", "1", "9", "1.", "- ", "* ", "• ", "=>", "->", ">", "→",
             '"', "'", ",", ":", "(", ")", "Tier 1:", "a", "red cup", "{\"negative\": ", "NaN", "1e999999", "\x00", "\u2028", "\ud800"]
hostile_text = st.lists(st.tuples(st.sampled_from(FRAGMENTS), st.integers(1, 17_000)), min_size=1, max_size=6).map(
    lambda parts: "".join(fragment * count for fragment, count in parts)
)
any_text = st.one_of(st.text(max_size=2000), hostile_text)
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# a generous per-call bound: linear parsing takes milliseconds at the size limit, the old regexes took seconds
SECONDS = 1.0


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


@PROPERTY
@given(any_text)
def test_negatives_parser_returns_a_value_or_a_reason(text):
    (parsed, reason), seconds = timed(parse_negatives, text)
    assert seconds < SECONDS
    if reason is None:
        assert parsed and all(isinstance(n, str) and n and (a is None or isinstance(a, str)) for n, a in parsed)
    else:
        assert parsed == [] and reason in NEGATIVE_REASONS
    if len(text) > MAX_OUTPUT_CHARS and text.strip():
        assert reason == "too_long"


@PROPERTY
@given(any_text, st.text(min_size=1, max_size=80))
def test_chain_parsers_return_a_value_or_a_reason(text, caption):
    (tiers, reason), seconds = timed(split_tiers, text)
    assert seconds < SECONDS
    assert (reason is None and all(isinstance(t, str) for t in tiers)) or (tiers == [] and reason in CHAIN_REASONS)
    chain, problem = complete_chain(text, caption)
    assert (problem is None and len(chain) == 4) or (chain == [] and problem[0] in CHAIN_REASONS and isinstance(problem[1], str))


@PROPERTY
@given(any_text, st.sampled_from(["stop", "length"]))
def test_caption_check_returns_none_or_a_reason(text, finish_reason):
    verdict, seconds = timed(caption_problem, text, finish_reason, LIMITS)
    assert seconds < SECONDS
    assert verdict is None or (isinstance(verdict, tuple) and all(isinstance(part, str) for part in verdict))


# plain phrases as a model writes them: letters, digits, spaces and a little punctuation
phrase = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters=" -,.!?"), min_size=1, max_size=60).filter(
    lambda s: s.strip() and s.strip()[0] not in "-" and not s.strip()[0].isdigit()
)


@PROPERTY
@given(st.lists(phrase, min_size=1, max_size=12), st.sampled_from(["{}", "```json\n{}\n```", "Sure! Here you go:\n{}\nHope it helps."]))
def test_negatives_written_as_json_read_back_exactly(negatives, wrapper):
    answer = wrapper.format(json.dumps([{"negative": n, "attribute": "colour"} for n in negatives]))
    assert parse_negatives(answer) == ([(n.strip(), "colour") for n in negatives], None)


tier = st.text(st.characters(whitelist_categories=("Ll", "Nd"), whitelist_characters=" "), min_size=1, max_size=30).filter(str.strip)


@PROPERTY
@given(st.lists(tier, min_size=2, max_size=6))
def test_chains_written_with_arrows_read_back_exactly(tiers):
    assert split_tiers(SEPARATOR.join(tiers)) == ([t.strip() for t in tiers], None)
