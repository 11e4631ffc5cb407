"""Referring expressions from a spaCy parse, in the manner of Kosmos-2's GRIT recipe.

Every noun chunk that names a visible object is an expression, nested ones included ("a man in a
blue jacket" and "a blue jacket": both are objects to box). A chunk is expanded to the right through
one attached prepositional attribute: "of" always ("a cup of coffee"), "in" only by something worn,
"with" only by something worn, a part or a marking (word lists from config); "a table with a mug" is
two objects. Locative prepositions ("on a desk"), conjunctions and clauses end the expression. Words
the small tagger took for nouns but that are the clause's verb ("a blue sailboat drifts") are cut
out of their chunk (_verb_tagged_as_noun); head nouns it took for verbs ("a teddy bear", "a trash
can") or left out of the chunk ("a fire hydrant") are put back in (_with_whole_head). Chunks headed
by a pronoun, an abstract or scene-level noun, or a number/date/place entity are dropped; the same
words again are merged into their first mention.

Negated noun phrases ("no people", "not a red car", "without chairs", "neither a cat nor a
dog", "there isn't a car", "free of furniture", "lacking a wheel") name what the image does NOT
show; grounding them would box something absent, so they are dropped and never used to expand
another expression. Every expression is limited to max_words words: a longer one keeps the
words nearest its head noun (the text encoder downstream would cut the far end silently).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

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
# Number agreement for the verb-tagged-as-noun guard: "a ... drifts" cannot be one noun phrase.
_SINGULAR_DETERMINERS = {"a", "an", "one", "each", "every", "this", "that", "another"}
_SINGULAR_NOUN_TAGS = {"NN", "NNP"}
_NOUN_TAGS = {"NN", "NNP", "NNS", "NNPS"}
_VERB_IN_CHUNK_TAGS = {"VBZ", "VBP", "VBD", "VBG"}
# "a few logs", "a dozen eggs": a singular determiner that does go with a plural noun
_COUNT_WORDS = {"few", "couple", "dozen", "hundred", "thousand", "lot", "number", "great", "good", "million"}
_FINITE_VERB_TAGS = {"VBZ", "VBP", "VBD", "MD"}
# Dependents only a verb takes: a "noun" with one of them is a verb the tagger mistook.
_VERB_ONLY_DEPS = {"dobj", "prt", "aux", "auxpass", "xcomp", "ccomp", "dative"}


@dataclass(frozen=True)
class ExpressionRules:
    abstract_heads: frozenset[str]
    quantifier_heads: frozenset[str]
    attribute_preps: frozenset[str]
    drop_entity_types: frozenset[str]
    max_words: int
    # Prepositions that join only a worn item ("a man in a blue jacket", not "strawberries in a
    # bowl") or a worn item, part or marking ("a kitten with blue eyes", not "a table with a mug").
    worn_preps: frozenset[str] = frozenset()
    part_preps: frozenset[str] = frozenset()
    worn_heads: frozenset[str] = frozenset()
    part_heads: frozenset[str] = frozenset()
    # Lemmas the pipeline's lemmatizer knows as verbs (for the verb-tagged-as-noun guard) and as
    # nouns (for the noun-tagged-as-verb one: "a teddy bear", "a trash can").
    verb_lemmas: frozenset[str] = frozenset()
    noun_lemmas: frozenset[str] = frozenset()


def extract_expressions(doc: Doc, rules: ExpressionRules, counters: Counter | None = None) -> list[dict]:
    """Expressions of one parsed caption; `counters` (if given) counts negated phrases dropped and
    phrases cut to max_words."""
    counters = Counter() if counters is None else counters
    phrases = _noun_phrases(doc, rules)
    starting_at = {phrase.span.start: phrase for phrase in phrases}
    spans: dict[tuple[int, int], tuple[Span, Token]] = {}
    for phrase in phrases:
        if not _is_groundable(phrase.root, rules):
            continue
        if is_negated(phrase.span, phrase.root):
            counters["phrases_negated"] += 1
            continue
        # Every noun phrase gives an expression, nested or not: "a man in a blue jacket" and
        # "a blue jacket" are both objects to box.
        whole = _expand(phrase, starting_at, rules)
        span = _limit(whole, rules.max_words)
        counters["phrases_truncated"] += span.start != whole.start
        spans[span.start, span.end] = (span, phrase.root)
    merged: dict[str, dict] = {}
    for span, root in sorted(spans.values(), key=lambda item: (item[0].start, -item[0].end)):
        key = _normalise(span)  # only the same words again are the same expression ("a dog" ... "the dog")
        if key in merged:
            merged[key]["mentions"] += 1
            continue
        merged[key] = {
            "text": span.text,
            "start": span.start_char,
            "end": span.end_char,
            "head": root.lemma_.lower(),
            "mentions": 1,
        }
    return list(merged.values())


class _Phrase(NamedTuple):
    span: Span
    root: Token  # the head noun; a piece cut before a verb has no root of its own in the parse
    source: Span  # the noun chunk it comes from


def _noun_phrases(doc: Doc, rules: ExpressionRules) -> list[_Phrase]:
    """spaCy's noun chunks, trimmed, and cut where the small tagger took the clause's verb for a
    noun ("a white hat slices tomatoes" is "a white hat" + "tomatoes"); plus the noun phrases the
    chunker never offers because their head is such a verb ("a striped shirt" in "a toddler in a
    striped shirt plays", parsed with "plays" as the object of "in")."""
    chunks = [_trim(c) for c in doc.noun_chunks]
    covered = {i for chunk in chunks for i in range(chunk.start, chunk.end)}
    chunks = [_with_whole_head(chunk, covered, rules) for chunk in chunks]
    covered = {i for chunk in chunks for i in range(chunk.start, chunk.end)}
    for token in doc:
        if token.i not in covered and token.i > 0 and _is_stranded_modifier(doc[token.i - 1], token):
            start = _left_edge_of_phrase(doc[token.i - 1], token)
            if not covered & set(range(start, token.i)):
                chunks.append(doc[start : token.i + 1])
    phrases = []
    for chunk in sorted(chunks, key=lambda c: c.start):
        last = chunk[-1]
        verb = last if last.tag_.startswith("VB") and not _is_mistagged_noun(last, rules) else _verb_tagged_as_noun(chunk, rules)
        if verb is None:
            # a chunk extended over its head has that head last; the parse may hang it elsewhere
            root = last if last.i >= chunk.root.i and _is_noun(last, rules) else chunk.root
            phrases.append(_Phrase(chunk, root, chunk))
            continue
        if verb.i > chunk.start:
            phrases.append(_Phrase(doc[chunk.start : verb.i], doc[verb.i - 1], chunk))
        if verb.i + 1 < chunk.end:
            phrases.append(_Phrase(doc[verb.i + 1 : chunk.end], chunk.root, chunk))
    return phrases


def _with_whole_head(chunk: Span, covered: set[int], rules: ExpressionRules) -> Span:
    """The chunk extended over the rest of its compound noun where the small parser ended it early:
    a singular noun it left out of every chunk ("a red fire | hydrant", "a red stop | sign") unless
    it takes a verb's object or particle ("a skateboarder | riding down a ramp"; a plural there is
    the verb: "a brown cow | grazes"), or a noun it tagged as a verb ("a teddy | bear", "a large
    plastic trash | can"; see _is_mistagged_noun)."""
    doc, end = chunk.doc, chunk.end
    while end < len(doc) and end not in covered and doc[end - 1].tag_ in _SINGULAR_NOUN_TAGS:
        following = doc[end]
        left_out_noun = following.tag_ in _SINGULAR_NOUN_TAGS and not any(c.dep_ in _VERB_ONLY_DEPS for c in following.children)
        if not (left_out_noun or _is_mistagged_noun(following, rules)):
            break
        end += 1
    return doc[chunk.start : end]


def _is_mistagged_noun(token: Token, rules: ExpressionRules) -> bool:
    """A word the small tagger read as a verb that is the head noun of the compound before it: it
    follows a singular noun, the lemmatizer knows it as a noun, and as a verb it could not follow
    that noun:
    - a base form that does not agree with a singular subject ("a teddy bear", "a bathroom sink"),
      unless that noun is one of several subjects ("a dog and a cat sleep") or a group ("the couple
      kiss");
    - a modal with no verb after it ("a trash can next to a bench", "a soda can.");
    - a word the lemmatizer knows as no verb at all ("a microwave oven")."""
    if token.i == 0 or token.lower_ not in rules.noun_lemmas:
        return False
    before = token.doc[token.i - 1]
    if before.tag_ not in _SINGULAR_NOUN_TAGS:
        return False
    if token.tag_ == "VBP":
        several = before.dep_ == "conj" or any(c.dep_ == "conj" for c in before.children)
        return not several and before.lemma_.lower() not in rules.quantifier_heads
    if token.tag_ == "MD":
        following = next((t for t in token.doc[token.i + 1 :] if t.tag_ != "RB"), None)  # "can also run"
        return following is None or following.tag_ != "VB"
    return token.tag_.startswith("VB") and bool(rules.verb_lemmas) and token.lemma_.lower() not in rules.verb_lemmas


def _is_noun(token: Token, rules: ExpressionRules) -> bool:
    return token.pos_ in _CONTENT_POS or _is_mistagged_noun(token, rules)


_NOUN_MODIFIER_DEPS = {"det", "amod", "compound", "poss", "nummod", "case", "nmod", "advmod"}


def _is_stranded_modifier(noun: Token, head: Token) -> bool:
    """A noun that modifies a verb the parser made the head of its phrase ("shirt" -> "plays")."""
    return noun.tag_ in {"NN", "NNS", "NNP", "NNPS"} and noun.dep_ == "compound" and noun.head == head and (
        head.tag_ in _VERB_IN_CHUNK_TAGS or head.tag_ in {"NN", "NNS"}
    )


def _left_edge_of_phrase(noun: Token, head: Token) -> int:
    """Start of the run of noun modifiers ("a striped") that ends at `noun`."""
    start = noun.i
    while start > head.sent.start:
        previous = noun.doc[start - 1]
        if previous.dep_ not in _NOUN_MODIFIER_DEPS or previous.is_punct or not (
            head.is_ancestor(previous) and previous.i < head.i
        ):
            break
        start -= 1
    return start


def _verb_tagged_as_noun(chunk: Span, rules: ExpressionRules) -> Token | None:
    """A word inside a noun chunk that reads as the sentence's verb, or None. Only a word the
    lemmatizer also knows as a verb qualifies, and only where number agreement or a missing verb
    rules the compound out, so true compounds ("tennis shoes on a floor", "apple slices") stay:
    - "a blue sailboat drifts", "a white hat slices tomatoes": a singular determiner cannot head a
      plural noun, so a plural after another word (not "a few") is a third-person verb;
    - "a girl with curly hair smiles at ...": a plural after a noun in a sentence that has no finite
      verb, with a noun before it to be the subject and words after it;
    - "pigeons peck at crumbs": a word that can be a verb closing the chunk after a plural noun, in
      a sentence that has no finite verb, with words after it;
    - "an older man shovels snow": a plural opening the chunk right after the clause's subject.
    "Has no finite verb" means none above the chunk in the parse: "gulls perch on posts, and hills
    rise" has one, in another clause."""
    doc = chunk.doc
    for token in chunk[1:]:  # "a white hat chopping onions": tagged a verb, after a noun
        if token.tag_ in _VERB_IN_CHUNK_TAGS and doc[token.i - 1].tag_ in _NOUN_TAGS and not _is_mistagged_noun(token, rules):
            return token
    first = chunk[0]
    if (
        len(chunk) > 1
        and first.tag_ == "NNS"
        and first.lemma_.lower() in rules.verb_lemmas
        and chunk.start > 0
        and doc[chunk.start - 1].dep_ in {"nsubj", "nsubjpass"}
    ):
        return first  # "an older man shovels snow": a subject right before it makes it the verb
    for token in chunk[1:]:
        before = doc[token.i - 1]
        if not rules.verb_lemmas or token.lemma_.lower() not in rules.verb_lemmas:
            continue
        sentence = token.sent
        # a finite verb above the chunk in the parse ("The dog sleeps next to apple slices")
        has_finite_verb = any(t.tag_ in _FINITE_VERB_TAGS for t in token.ancestors)
        continues = token.i + 1 < sentence.end and not doc[token.i + 1].is_punct
        if token.tag_ == "NNS":
            counted = any(t.lower_ in _COUNT_WORDS for t in doc[chunk.start : token.i])
            if chunk[0].lower_ in _SINGULAR_DETERMINERS and before.i > chunk.start and not counted:
                return token
            if before.tag_ in _NOUN_TAGS and not has_finite_verb and continues and _noun_before(chunk, sentence) and not _is_object(token):
                return token
        if (
            token.tag_ in _SINGULAR_NOUN_TAGS
            and token.i == chunk.end - 1
            and before.tag_ == "NNS"
            and not has_finite_verb
            and continues
        ):
            return token
    return None


def _is_object(token: Token) -> bool:
    """Whether a word is the object of a verb or of "of", so a noun: "holding two baseball bats in a
    field", "a plate of chicken wings and ..." (not "a girl with curly hair smiles at ...")."""
    return token.dep_ == "dobj" or (token.dep_ == "pobj" and token.head.lower_ == "of")


def _noun_before(chunk: Span, sentence: Span) -> bool:
    return any(t.pos_ in _CONTENT_POS for t in chunk.doc[sentence.start : chunk.start])


# Abstract heads that name an object as the head of a noun compound: "a street light", "a lap top",
# "a picture frame" (but "the light", "the top of a cake").
_OBJECTS_IN_COMPOUNDS = {"light", "top", "frame"}


def _is_groundable(root: Token, rules: ExpressionRules) -> bool:
    if not _is_noun(root, rules) or root.ent_type_ in rules.drop_entity_types:
        return False
    if not any(ch.isalpha() for ch in root.text):  # an emoji or symbol the tagger called a noun
        return False
    words = _words(root)
    if words & rules.abstract_heads and not (words & _OBJECTS_IN_COMPOUNDS and _compounded(root, rules)):
        return False
    has_of_phrase = any(c.dep_ == "prep" and c.lower_ == "of" for c in root.rights)
    return not (has_of_phrase and words & rules.quantifier_heads)


def _compounded(noun: Token, rules: ExpressionRules) -> bool:
    """Whether a noun heads a noun compound: a noun right before it modifies it, one that is no
    time or other dropped entity ("the early morning light" is lighting, not a lamp)."""
    before = noun.doc[noun.i - 1] if noun.i > 0 else None
    return (
        before is not None
        and before.tag_ in _NOUN_TAGS
        and before.dep_ == "compound"
        and before.head == noun
        and before.ent_type_ not in rules.drop_entity_types
    )


def _glued_word(token: Token) -> str:
    """The written word a token belongs to: "close-up" for the "up" of "close - up"."""
    start = token.i
    while start > 0 and not token.doc[start - 1].whitespace_:
        start -= 1
    return token.doc[start : token.i + 1].text.lower()


def _expand(phrase: _Phrase, starting_at: dict[int, _Phrase], rules: ExpressionRules) -> Span:
    """The phrase and one attached prepositional attribute ("a man" + "in a blue jacket"), or the
    phrase alone."""
    chunk, root = phrase.span, phrase.root
    preposition = next((c for c in root.rights if c.dep_ == "prep" and c.i == chunk.end), None)
    if preposition is None or preposition.lower_ not in rules.attribute_preps or preposition.lower_ in _NEGATING_PREPS:
        return chunk
    obj = next((c for c in preposition.children if c.dep_ == "pobj"), None)
    # The object must be the noun phrase right after the preposition, all of it modifying the
    # object ("in a blue jacket"); anything else means the parse is not a simple attribute. A
    # piece cut before a verb tagged as a noun stands for the chunk it was cut from.
    attribute = starting_at.get(preposition.i + 1)
    if obj is None or attribute is None or obj not in attribute.source or attribute.source.start != attribute.span.start:
        return chunk
    # "buildings in the distance": an attribute must name something visible too
    if not _is_groundable(attribute.root, rules) or attribute.span.end - chunk.start > rules.max_words:
        return chunk
    if _negated_noun(attribute.root, set()):  # "a man with no hat" is "a man"
        return chunk
    # "a table with a mug", "strawberries in a bowl": a second object, not an attribute
    words = _words(attribute.root)
    if preposition.lower_ in rules.worn_preps and not words & rules.worn_heads:
        return chunk
    if preposition.lower_ in rules.part_preps and not words & (rules.worn_heads | rules.part_heads):
        return chunk
    return chunk.doc[chunk.start : attribute.span.end]


def _words(token: Token) -> set[str]:
    return {token.lemma_.lower(), token.lower_, _glued_word(token)}


def is_negated(chunk: Span, root: Token | None = None) -> bool:
    """Whether a noun phrase (headed by `root`, by default its parse root) names something the
    caption says is absent."""
    before = chunk.doc[chunk.start - 1] if chunk.start > 0 else None
    # "..., not a red car": the parser often hangs "not" on some other word, so look at the text too
    if before is not None and before.lower_ in _NEGATORS and before.sent == chunk.root.sent:
        return True
    return _negated_noun(chunk.root if root is None else root, set())


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
