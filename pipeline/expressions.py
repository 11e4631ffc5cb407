"""Referring expressions from a spaCy parse, in the manner of Kosmos-2's GRIT recipe.

Each noun chunk is expanded to the right through one attached prepositional attribute
("a man" + "in a blue jacket"): a preposition that says what the object is, has or wears
(of, with, in, ... from config) followed by a noun and its own left modifiers. Locative
prepositions ("on a desk"), conjunctions and clauses end the expression, because what they
introduce is a second object that gets an expression of its own. Chunks headed by a
pronoun, an abstract or scene-level noun, or a number/date/place entity are dropped; only
maximal spans are kept and repeated expressions are merged into their first mention.

Negated noun phrases ("no people", "not a red car", "without chairs", "neither a cat nor a
dog", "there isn't a car", "free of furniture", "lacking a wheel") name what the image does NOT
show; grounding them would box something absent, so they are dropped and never used to expand
another expression. Every expression is limited to max_words words: a longer one keeps the
words nearest its head noun (the text encoder downstream would cut the far end silently).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from spacy.tokens import Doc, Span, Token

_CONTENT_POS = {"NOUN", "PROPN"}
_LEADING_DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "some"}
# Words right before a noun phrase that put it out of the picture ("not a car", "nor a dog").
_NEGATORS = {"not", "n't", "never", "no", "without", "nor", "neither"}
# Determiners and pre-conjunctions inside a noun phrase that do the same ("no people", "neither a cat").
_NEGATING_DETERMINERS = {"no", "neither"}
# "without X", and "free of X" / "none of the X": the object of these names something absent.
_NEGATING_PREPS = {"without"}
_NEGATIVE_NOUNS = {"none", "nothing", "nobody", "neither", "nowhere"}
_ABSENCE_HEADS = {"free", "devoid", "empty", "clear", *_NEGATIVE_NOUNS}
_ABSENCE_VERBS = {"lack"}
# "a car is not visible": the subject of a negated copula with one of these is absent too.
_PRESENCE_WORDS = {"visible", "present", "seen", "shown", "pictured", "depicted", "there", "included"}
_OBJECT_DEPS = {"dobj", "attr", "oprd", "dative", "pobj"}


@dataclass(frozen=True)
class ExpressionRules:
    abstract_heads: frozenset[str]
    quantifier_heads: frozenset[str]
    attribute_preps: frozenset[str]
    drop_entity_types: frozenset[str]
    max_words: int


def extract_expressions(doc: Doc, rules: ExpressionRules, counters: Counter | None = None) -> list[dict]:
    """Expressions of one parsed caption; `counters` (if given) counts negated phrases dropped and
    phrases cut to max_words."""
    counters = Counter() if counters is None else counters
    chunks = [_trim(chunk) for chunk in doc.noun_chunks]
    spans = []
    for chunk in chunks:
        if not _is_groundable(chunk.root, rules):
            continue
        if is_negated(chunk):
            counters["phrases_negated"] += 1
            continue
        span = _limit(_expand(chunk, rules), rules.max_words)
        counters["phrases_truncated"] += span.start != chunk.start
        spans.append(span)
    maximal = [s for s in spans if not any(o is not s and o.start <= s.start and s.end <= o.end for o in spans)]
    merged: dict[str, dict] = {}
    for span in maximal:
        key = _normalise(span)
        if key in merged:
            merged[key]["mentions"] += 1
            continue
        merged[key] = {
            "text": span.text,
            "start": span.start_char,
            "end": span.end_char,
            "head": span.root.lemma_.lower(),
            "mentions": 1,
        }
    return list(merged.values())


def _is_groundable(root: Token, rules: ExpressionRules) -> bool:
    if root.pos_ not in _CONTENT_POS or root.ent_type_ in rules.drop_entity_types:
        return False
    if not any(ch.isalpha() for ch in root.text):  # an emoji or symbol the tagger called a noun
        return False
    words = {root.lemma_.lower(), root.lower_, _glued_word(root)}
    if words & rules.abstract_heads:
        return False
    has_of_phrase = any(c.dep_ == "prep" and c.lower_ == "of" for c in root.rights)
    return not (has_of_phrase and words & rules.quantifier_heads)


def _glued_word(token: Token) -> str:
    """The written word a token belongs to: "close-up" for the "up" of "close - up"."""
    start = token.i
    while start > 0 and not token.doc[start - 1].whitespace_:
        start -= 1
    return token.doc[start : token.i + 1].text.lower()


def _expand(chunk: Span, rules: ExpressionRules) -> Span:
    root = chunk.root
    preposition = next((c for c in root.rights if c.dep_ == "prep" and c.i == chunk.end), None)
    if preposition is None or preposition.lower_ not in rules.attribute_preps or preposition.lower_ in _NEGATING_PREPS:
        return chunk
    obj = next((c for c in preposition.children if c.dep_ == "pobj"), None)
    # "buildings in the distance": an attribute must name something visible too
    if obj is None or not _is_groundable(obj, rules) or obj.i + 1 - chunk.start > rules.max_words:
        return chunk
    if _negated_noun(obj, set()):  # "a man with no hat" is "a man"
        return chunk
    # Everything between the preposition and its object must modify that object
    # ("in a blue jacket"); anything else means the parse is not a simple attribute.
    if any(not obj.is_ancestor(token) for token in chunk.doc[preposition.i + 1 : obj.i]):
        return chunk
    return chunk.doc[chunk.start : obj.i + 1]


def is_negated(chunk: Span) -> bool:
    """Whether a noun phrase names something the caption says is absent."""
    before = chunk.doc[chunk.start - 1] if chunk.start > 0 else None
    # "..., not a red car": the parser often hangs "not" on some other word, so look at the text too
    if before is not None and before.lower_ in _NEGATORS and before.sent == chunk.root.sent:
        return True
    return _negated_noun(chunk.root, set())


def _negated_noun(noun: Token, visited: set[int]) -> bool:
    if noun.i in visited:  # conj chains are trees, but a bad parse must not loop
        return False
    visited.add(noun.i)
    if noun.lower_ in _NEGATIVE_NOUNS:
        return True  # "None of the chairs ...": the tagger calls "None" a noun
    children = list(noun.children)
    if any(c.lower_ in _NEGATING_DETERMINERS and c.dep_ in {"det", "preconj", "advmod"} for c in children):
        return True  # "no people", "neither a cat"
    if any(c.dep_ == "neg" for c in children):
        return True  # "not a car" parsed as the noun's own negation
    head = noun.head
    if noun.dep_ == "pobj":
        if head.lower_ in _NEGATING_PREPS:
            return True  # "without chairs"
        if head.lower_ == "of" and head.head.lower_ in _ABSENCE_HEADS:
            return True  # "free of furniture", "none of the chairs"
    if noun.dep_ == "dobj" and head.lemma_.lower() in _ABSENCE_VERBS:
        return True  # "lacking a front wheel"
    verb = head.head if noun.dep_ == "pobj" and head.dep_ == "prep" else head  # "not on the sofa"
    if noun.dep_ in _OBJECT_DEPS and verb.pos_ in {"VERB", "AUX"} and _has_negation(verb):
        return True  # "isn't a car", "not wearing a hat", "not on the sofa"
    if noun.dep_ in {"nsubj", "nsubjpass"} and _has_negation(head) and _says_present(head):
        return True  # "a car is not visible"
    if noun.dep_ == "conj" and _shares_negation(noun):
        return _negated_noun(head, visited)  # "no cars or people", "neither a cat nor a dog"
    return False


def _has_negation(token: Token) -> bool:
    return any(c.dep_ == "neg" for c in token.children)


def _says_present(verb: Token) -> bool:
    return verb.lemma_.lower() in {"see", "show", "picture", "depict", "include"} or any(
        c.dep_ in {"acomp", "advmod", "attr"} and c.lower_ in _PRESENCE_WORDS for c in verb.children
    )


def _shares_negation(conj: Token) -> bool:
    """Whether a conjunct falls under its head's negation: "no cars or people" and "without a fork,
    a knife" do; "not a dog but a cat" does not, nor "no windows and a red sofa" (an own
    determiner after "and" starts a new, positive phrase)."""
    links = {c.lower_ for c in (*conj.head.children, *conj.children) if c.dep_ == "cc"}
    if links & {"but", "yet"}:
        return False
    if links & {"or", "nor"}:
        return True
    if "and" in links or "&" in links:
        return not any(c.dep_ in {"det", "poss"} for c in conj.children)
    return True


def _limit(span: Span, max_words: int) -> Span:
    """The span cut to its last max_words words (the head noun ends an English noun phrase), with
    punctuation and conjunctions left dangling at the new start trimmed."""
    words = [t for t in span if not t.is_punct]
    if len(words) <= max_words:
        return span
    start = words[-max_words].i
    while start < span.end - 1 and (span.doc[start].is_punct or span.doc[start].dep_ == "cc"):
        start += 1
    return span.doc[start : span.end]


def _trim(span: Span) -> Span:
    """Drops emoji, symbols and punctuation that the tagger glued to either end of a span."""
    start, end = span.start, span.end
    while end - start > 1 and not any(ch.isalnum() for ch in span.doc[end - 1].text):
        end -= 1
    while end - start > 1 and not any(ch.isalnum() for ch in span.doc[start].text):
        start += 1
    return span.doc[start:end]


def _normalise(span: Span) -> str:
    words = span.text.lower().split()
    if len(words) > 1 and words[0] in _LEADING_DETERMINERS:
        words = words[1:]
    return " ".join(words)
