"""Structure checks every hard negative must pass, whichever backend wrote it."""

from __future__ import annotations

import re
from difflib import SequenceMatcher
from typing import Callable, Iterable

from pipeline.core.text import latin_fraction
from pipeline.stages.fggrn.attribute_swap import same_meaning

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
# what a phrase is never written with: identifiers ("a_red_cup") and markup, as a small LLM writes them
_NOT_PROSE = re.compile(r"[_{}\[\]<>|\\=*#@$^~`]")
_FUNCTION_WORDS = frozenset("a an the of in on with and at by to from its this that these those some".split())
# The plural spaCy's lemmatizer keeps as its own lemma: a head stored as "person" (a region from another
# pipeline or importer) is still the head of "two old people".
_SUPPLETIVE_PLURALS = {"people": "person"}


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def structure_problem(
    positive: str,
    negative: str,
    head: str,
    seen: set[str],
    max_changed_words: int = 3,
    lemmas: Callable[[str], Iterable[str]] = lambda word: (),
) -> tuple[str, str] | None:
    """Why `negative` is no valid hard negative of `positive`, as (reason, detail) (None when it is).

    `seen` holds the normalised negatives already accepted for this region (for duplicates);
    `lemmas` gives a word's noun lemmas, so the head lemma "woman" is found in "two women".
    """
    pos, neg = words(positive), words(negative)
    if not neg:
        return "empty", "the negative has no words"
    if latin_fraction(negative) < 0.6:
        return "not_english", "under 60% of its letters are Latin script"
    if neg == pos:
        return "same_as_positive", "the same words as the positive"
    if " ".join(neg) in seen:
        return "duplicate", "the same words as an accepted negative"
    if _NOT_PROSE.search(negative):
        return "not_plain_text", "written with _ or markup characters, not as a phrase"
    if _only_words_removed(pos, neg):  # "a tall giraffe" -> "a giraffe": the positive implies it
        return "only_words_removed", "it drops words of the positive and adds none: no attribute contradicts it"
    if not keeps_head(neg, head.lower(), lemmas):
        return "object_changed", f"the head noun {head!r} is gone"  # only an attribute may change
    if abs(len(neg) - len(pos)) > max(3, len(pos) // 2):
        return "length_mismatch", f"{len(neg)} words against the positive's {len(pos)}"
    if _only_words_removed(neg, pos):  # "a wall clock" -> "a blurred photo of a wall clock": may still be true
        return "only_words_added", "it keeps every word of the positive and adds some: no attribute contradicts it"
    changed = _changed_content_words(pos, neg)
    if changed == 0:
        return "only_function_words_changed", "no content word changed"
    if _only_synonyms_changed(pos, neg):  # "a large horse" → "a huge horse" contradicts nothing
        return "same_meaning", "every changed word is in the same meaning class of the attribute lexicons"
    if changed > max_changed_words:
        return "too_many_changes", f"{changed} content words changed, over {max_changed_words}"
    places = _changed_places(pos, neg)
    if places > 1:  # "a red cup on a wooden table" → "a blue cup on a metal table": two attributes
        return "more_than_one_attribute", f"content words changed in {places} separate places"
    return None


def keeps_head(negative: list[str], head: str, lemmas: Callable[[str], Iterable[str]]) -> bool:
    """Whether one of the negative's words is the head noun: its lemma, the lemma with an ending
    ("dogs"), or a form the lemmatizer takes back to it ("women", "geese", "teeth")."""
    return any(w.startswith(head) or _SUPPLETIVE_PLURALS.get(w) == head or head in lemmas(w) for w in negative)


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


def _only_words_removed(positive: list[str], negative: list[str]) -> bool:
    """Whether the negative's content words are some of the positive's, fewer of them ("the car" for
    "a silver car"); with the two swapped, whether it only adds words."""
    kept = [w for w in negative if w not in _FUNCTION_WORDS]
    return _content(kept) < _content(positive) and set(kept) <= set(positive)


def _content(span: list[str]) -> int:
    return sum(w not in _FUNCTION_WORDS for w in span)


def _changed_places(positive: list[str], negative: list[str]) -> int:
    """Runs of changed words that change a content word: one attribute is one run."""
    opcodes = SequenceMatcher(a=positive, b=negative, autojunk=False).get_opcodes()
    return sum(op != "equal" and bool(_content(positive[i1:i2]) or _content(negative[j1:j2])) for op, i1, i2, j1, j2 in opcodes)


def _changed_content_words(positive: list[str], negative: list[str]) -> int:
    changed = 0
    for op, i1, i2, j1, j2 in SequenceMatcher(a=positive, b=negative, autojunk=False).get_opcodes():
        if op != "equal":
            changed += max(_content(positive[i1:i2]), _content(negative[j1:j2]))
    return changed


def replaced_spans(before: str, after: str) -> list[tuple[str, str]] | None:
    """The (old, new) content-word spans where `after` replaces words of `before` (articles and other
    function words left out: "a grey" → "an orange" compares grey with orange, as calibrated), or None
    when it also adds or removes content words (then it says more or less, not the same in other words)."""
    a, b = words(before), words(after)
    spans = []
    for op, i1, i2, j1, j2 in SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        old, new = ([w for w in span if w not in _FUNCTION_WORDS] for span in (a[i1:i2], b[j1:j2]))
        if bool(old) != bool(new):
            return None
        if old:
            spans.append((" ".join(old), " ".join(new)))
    return spans or None


def reworded(before: str, after: str, similarity: Callable[[str, str], float], threshold: float) -> bool:
    """Whether every span `after` replaces in `before` is a near-synonym of it by embedding similarity."""
    spans = replaced_spans(before, after)
    return bool(spans) and all(similarity(old, new) >= threshold for old, new in spans)


def meaning_problem(
    positive: str, negative: str, accepted: list[str], similarity: Callable[[str, str], float] | None, threshold: float
) -> tuple[str, str] | None:
    """Why `negative` says what the positive or an accepted negative of the same region already says,
    as (reason, detail) (None when it does not). Runs after `structure_problem`, before NLI: a near-duplicate of a negative
    would get the same NLI verdict, so dropping it first loses nothing.

    `same_meaning_embedding`: only near-synonyms of the positive's words replaced ("a gray car" for
    "a grey car"); `near_duplicate`: an accepted negative reworded within one of the lexicons' meaning
    classes ("a huge horse" after "a large horse"); `near_duplicate_embedding`: the same by embedding
    ("a metallic chair" after "a metal chair"). `similarity` None: lexicons only."""
    if similarity is not None and reworded(positive, negative, similarity, threshold):
        return "same_meaning_embedding", f"the replaced words embed within similarity {threshold} of the positive's"
    for earlier in accepted:
        if _only_synonyms_changed(words(earlier), words(negative)):
            return "near_duplicate", f"the accepted {earlier!r} reworded within a meaning class of the lexicons"
        if similarity is not None and reworded(earlier, negative, similarity, threshold):
            return "near_duplicate_embedding", f"the accepted {earlier!r} reworded (similarity {threshold}+)"
    return None


def embedding_texts(positive: str, negatives: list[str]) -> set[str]:
    """Every span `meaning_problem` may compare for these candidates, to embed them in one batch."""
    texts = set()
    for i, negative in enumerate(negatives):
        for before in (positive, *negatives[:i]):
            texts.update(t for span in replaced_spans(before, negative) or [] for t in span)
    return texts
