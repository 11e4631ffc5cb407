"""Checks on a generated long caption: empty, cut off, too short, degenerate, not English."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.core.text import latin_fraction

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_CHAR_RUN = re.compile(r"(.)\1{14,}")
# Words almost every English sentence has; a caption of 8+ words with none of them is not English.
_ENGLISH_FUNCTION_WORDS = frozenset(
    "a an the of in on with and at by to from is are its it this that there near under over behind "
    "next beside above below into onto while has have his her their".split()
)


@dataclass(frozen=True)
class CaptionLimits:
    min_words: int
    min_latin_fraction: float
    min_english_fraction: float
    max_ngram_repeats: int  # consecutive repeats of the same 1..8-gram
    min_distinct_trigrams: float  # distinct / total trigrams, for captions of 20+ words


def caption_problem(text: str, finish_reason: str, limits: CaptionLimits) -> tuple[str, str] | None:
    """(reason, detail) for a caption that must not be kept, or None."""
    text = text.strip()
    if not text:
        return "empty_output", "the model generated no text"
    if finish_reason == "length":
        return "truncated", "generation stopped at the token limit, the caption is cut off"
    if _CHAR_RUN.search(text):
        return "degenerate", f"a character repeated 15+ times: {_CHAR_RUN.search(text).group(0)[:20]!r}"
    fraction = latin_fraction(text)  # before counting words: scripts without spaces have "few words"
    if fraction < limits.min_latin_fraction:
        return "not_english", f"only {fraction:.0%} of letters are Latin script"
    words = caption_words(text)
    if not words or len(words) < limits.min_words:  # no words at all would divide by zero below
        return "too_short", f"{len(words)} words, fewer than {limits.min_words}"
    loop = repeated_ngram(words, limits.max_ngram_repeats)
    if loop:
        return "degenerate", f"repetition loop: {loop!r} repeated {limits.max_ngram_repeats}+ times"
    if len(words) >= 20:
        trigrams = list(zip(words, words[1:], words[2:]))
        distinct = len(set(trigrams)) / len(trigrams)
        if distinct < limits.min_distinct_trigrams:
            return "degenerate", f"only {distinct:.0%} of word trigrams are distinct"
    english = english_fraction(words)
    if english < limits.min_english_fraction:
        return "not_english", f"only {english:.0%} of words are common English function words"
    return None


def caption_words(text: str) -> list[str]:
    """The lower-cased words of a text (letters and digits; inner apostrophes and hyphens kept)."""
    return [w.lower() for w in _WORD.findall(text)]


def english_fraction(words: list[str]) -> float:
    """Share of the words that are common English function words; 0.0 for no words."""
    return sum(word in _ENGLISH_FUNCTION_WORDS for word in words) / len(words) if words else 0.0


def repeated_ngram(words: list[str], repeats: int, max_n: int = 8) -> str | None:
    """The first n-gram (n <= max_n) that occurs `repeats` times in a row, or None."""
    for n in range(1, max_n + 1):
        for start in range(0, len(words) - n * repeats + 1):
            gram = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(1, repeats)):
                return " ".join(gram)
    return None
