"""Referring expressions from a spaCy parse, in the manner of Kosmos-2's GRIT recipe.

Each noun chunk is expanded to the right through one attached prepositional attribute
("a man" + "in a blue jacket"): a preposition that says what the object is, has or wears
(of, with, in, ... from config) followed by a noun and its own left modifiers. Locative
prepositions ("on a desk"), conjunctions and clauses end the expression, because what they
introduce is a second object that gets an expression of its own. Chunks headed by a
pronoun, an abstract or scene-level noun, or a number/date/place entity are dropped; only
maximal spans are kept and repeated expressions are merged into their first mention.
"""

from __future__ import annotations

from dataclasses import dataclass

from spacy.tokens import Doc, Span, Token

_CONTENT_POS = {"NOUN", "PROPN"}
_LEADING_DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "some"}


@dataclass(frozen=True)
class ExpressionRules:
    abstract_heads: frozenset[str]
    quantifier_heads: frozenset[str]
    attribute_preps: frozenset[str]
    drop_entity_types: frozenset[str]
    max_words: int


def extract_expressions(doc: Doc, rules: ExpressionRules) -> list[dict]:
    chunks = [_trim(chunk) for chunk in doc.noun_chunks]
    spans = [_expand(chunk, rules) for chunk in chunks if _is_groundable(chunk.root, rules)]
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
    if preposition is None or preposition.lower_ not in rules.attribute_preps:
        return chunk
    obj = next((c for c in preposition.children if c.dep_ == "pobj"), None)
    # "buildings in the distance": an attribute must name something visible too
    if obj is None or not _is_groundable(obj, rules) or obj.i + 1 - chunk.start > rules.max_words:
        return chunk
    # Everything between the preposition and its object must modify that object
    # ("in a blue jacket"); anything else means the parse is not a simple attribute.
    if any(not obj.is_ancestor(token) for token in chunk.doc[preposition.i + 1 : obj.i]):
        return chunk
    return chunk.doc[chunk.start : obj.i + 1]


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
