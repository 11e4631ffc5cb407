"""Structure checks every hard negative must pass, whichever backend wrote it."""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from pipeline.attribute_swap import same_meaning
from pipeline.text import latin_fraction

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_FUNCTION_WORDS = frozenset("a an the of in on with and at by to from its this that these those some".split())


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def structure_problem(positive: str, negative: str, head: str, seen: set[str], max_changed_words: int = 3) -> str | None:
    """Why `negative` is no valid hard negative of `positive` (None when it is).

    `seen` holds the normalised negatives already accepted for this region (for duplicates).
    """
    pos, neg = words(positive), words(negative)
    if not neg:
        return "empty"
    if latin_fraction(negative) < 0.6:
        return "not_english"
    if neg == pos:
        return "same_as_positive"
    if " ".join(neg) in seen:
        return "duplicate"
    if head.lower() not in neg and not any(w.startswith(head.lower()) for w in neg):
        return "object_changed"  # the head noun must stay: only an attribute may change
    if abs(len(neg) - len(pos)) > max(3, len(pos) // 2):
        return "length_mismatch"
    changed = _changed_content_words(pos, neg)
    if changed == 0:
        return "only_function_words_changed"
    if _only_synonyms_changed(pos, neg):
        return "same_meaning"  # "a large horse" → "a huge horse" contradicts nothing
    if changed > max_changed_words:
        return "too_many_changes"
    return None


def _only_synonyms_changed(positive: list[str], negative: list[str]) -> bool:
    """Whether every changed word was replaced, one for one, by a word of the same meaning class
    in the attribute lexicons (whichever backend wrote the negative)."""
    pairs = []
    for op, i1, i2, j1, j2 in SequenceMatcher(a=positive, b=negative, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        if op != "replace" or i2 - i1 != j2 - j1:
            return False
        pairs += [(a, b) for a, b in zip(positive[i1:i2], negative[j1:j2]) if a != b and a not in _FUNCTION_WORDS]
    return bool(pairs) and all(same_meaning(a, b) for a, b in pairs)


def _content(span: list[str]) -> int:
    return sum(w not in _FUNCTION_WORDS for w in span)


def _changed_content_words(positive: list[str], negative: list[str]) -> int:
    changed = 0
    for op, i1, i2, j1, j2 in SequenceMatcher(a=positive, b=negative, autojunk=False).get_opcodes():
        if op != "equal":
            changed += max(_content(positive[i1:i2]), _content(negative[j1:j2]))
    return changed
