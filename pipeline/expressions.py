"""Referring expressions from a spaCy parse, in the manner of Kosmos-2's GRIT recipe.

Each noun chunk is expanded to the right through one attached prepositional attribute
("a man" + "in a blue jacket"), never through conjunctions or clauses; chunks headed by a
pronoun, an abstract or scene-level noun, or a number/date/place entity are dropped; only
maximal spans are kept and repeated expressions are merged into their first mention.
"""

from __future__ import annotations

from dataclasses import dataclass

from spacy.tokens import Doc, Span, Token

_CONTENT_POS = {"NOUN", "PROPN"}
# Inside the prepositional attribute, only the object's own modifiers follow along;
# a second preposition, a clause or a conjunction ends the expression.
_ATTRIBUTE_DEPS = {"pobj", "det", "amod", "compound", "nummod", "poss", "case", "advmod", "npadvmod", "quantmod", "nmod", "predet"}
_LEADING_DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "some"}


@dataclass(frozen=True)
class ExpressionRules:
    abstract_heads: frozenset[str]
    quantifier_heads: frozenset[str]
    drop_entity_types: frozenset[str]
    max_words: int


def extract_expressions(doc: Doc, rules: ExpressionRules) -> list[dict]:
    spans = [_expand(chunk, rules) for chunk in doc.noun_chunks if _is_groundable(chunk.root, rules)]
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
    doc, root = chunk.doc, chunk.root
    attribute = next((c for c in root.rights if c.dep_ == "prep" and c.i == chunk.end), None)
    if attribute is None:
        return chunk
    end = _attribute_end(attribute)
    if end == attribute.i + 1 or end - chunk.start > rules.max_words:
        return chunk  # a dangling preposition or an over-long span: the bare chunk grounds better
    return doc[chunk.start : end]


def _attribute_end(preposition: Token) -> int:
    """End (exclusive) of the contiguous run of tokens that belong to the prepositional phrase."""
    members = {preposition.i}
    frontier = [preposition]
    while frontier:
        token = frontier.pop()
        for child in token.children:
            if child.dep_ in _ATTRIBUTE_DEPS and child.i > preposition.i:
                members.add(child.i)
                frontier.append(child)
    end = preposition.i + 1
    while end in members:
        end += 1
    return end


def _normalise(span: Span) -> str:
    words = span.text.lower().split()
    if len(words) > 1 and words[0] in _LEADING_DETERMINERS:
        words = words[1:]
    return " ".join(words)
