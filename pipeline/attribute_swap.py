"""Rule-based hard negatives: swap one attribute word of a region phrase for another of its kind.

The CPU baseline and fallback of `fgdata negatives`: "a red cup" → "a blue cup" (colour),
"a wooden table" → "a metal table" (material), "two dogs" → "three dogs" (count). Exactly one
word changes, the head noun never does, and a phrase with no attribute from the lexicons gets none.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import zip_longest
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spacy.tokens import Doc

# Curated lexicons. Each kind of attribute is one or more scales; a scale lists classes of words
# that contradict each other, and a class holds words that say the same thing (first = the word
# offered). A word is swapped only for a word of another class on one of its own scales:
# "large" → "small", never "huge" (same class: no contradiction) nor "tall" (another scale: a
# large wave may well be tall); and one word per class is offered, so a list never holds both
# "grey" and "gray".
SCALES: dict[str, list[list[tuple[str, ...]]]] = {
    "colour": [[("red",), ("blue",), ("green",), ("yellow",), ("black",), ("white",), ("brown",), ("grey", "gray"), ("orange",),
                ("pink",), ("purple",), ("silver",), ("golden",), ("beige",), ("dark",), ("bright",)]],
    "material": [[("wooden",), ("metal", "metallic", "steel"), ("plastic",), ("glass",), ("leather",), ("stone",), ("brick",),
                  ("paper",), ("cotton",), ("woolen", "wool"), ("marble",), ("ceramic",), ("concrete",), ("fabric",), ("rubber",),
                  ("wicker",), ("bamboo",), ("foam",)]],
    "size": [
        [("large", "big", "huge", "giant"), ("small", "tiny", "little")],
        [("tall",), ("short",)],
        [("long",), ("short",)],
        [("wide",), ("narrow",)],
        [("thick",), ("thin",)],
    ],
    # Plural counts only: "single" would need the noun and its article changed too ("a single
    # bird" → "an eight bird", and "two dogs" → "single dogs").
    "count": [[("two",), ("three",), ("four",), ("five",), ("six",), ("seven",), ("eight",), ("nine",), ("ten",), ("several",), ("many",)]],
    "pattern": [[("striped",), ("plain",), ("spotted", "dotted"), ("checkered",), ("floral",), ("patterned",), ("plaid",), ("paisley",),
                 ("zigzag",), ("camouflage",)]],
    "texture": [[("smooth",), ("rough",), ("shiny", "glossy"), ("fluffy",), ("furry",), ("soft",), ("hard",), ("matte",), ("bumpy",),
                 ("silky",), ("velvety",)]],
    "state": [[("open",), ("closed",), ("empty",), ("full",), ("wet",), ("dry",), ("broken",), ("lit",), ("folded",), ("sleeping",),
               ("standing",), ("sitting",), ("running",)]],
    "position": [[("left",), ("right",), ("upper",), ("lower",), ("front",), ("back",), ("top",), ("bottom",), ("middle",), ("rear",), ("side",)]],
    "shape": [[("round", "circular", "spherical"), ("square",), ("rectangular",), ("triangular",), ("oval",), ("curved",), ("flat",),
               ("hexagonal",), ("cylindrical",), ("octagonal",), ("conical",), ("pointed",)]],
    # the age of a person, and of a thing: "an old man" is not "a vintage man"
    "age": [
        [("old", "elderly", "aged"), ("young", "youthful")],
        [("old", "aged", "ancient", "antique", "vintage", "retro"), ("new", "modern")],
    ],
}
LEXICONS: dict[str, list[str]] = {
    kind: list(dict.fromkeys(word for scale in scales for group in scale for word in group)) for kind, scales in SCALES.items()
}
_KIND_OF = {word: kind for kind, words in LEXICONS.items() for word in words}
# A word joined to another by one of these is part of a compound ("bright-red", "2-year-old",
# "black-and-white", "red/white"): swapping one part breaks it ("a bright-bright car").
_JOINERS = frozenset("-‐‑–—/")


@dataclass(frozen=True)
class Swap:
    text: str
    attribute: str  # the kind of attribute changed: colour, material, ...
    original: str
    replacement: str


def same_meaning(a: str, b: str) -> bool:
    """Whether two attribute words say the same thing ("grey"/"gray", "large"/"huge")."""
    a, b = a.lower(), b.lower()
    return a == b or any(a in group and b in group for scales in SCALES.values() for scale in scales for group in scale)


def contrasting_words(word: str) -> list[str]:
    """One word per class that contradicts `word` on one of its scales, in lexicon order."""
    word = word.lower()
    offered: list[str] = []
    for scale in SCALES.get(_KIND_OF.get(word, ""), []):
        if any(word in group for group in scale):
            offered += [group[0] for group in scale if word not in group and group[0] not in offered]
    return [w for w in offered if not same_meaning(w, word)]


def _cased(word: str, like: str) -> str:
    """`word` in the casing of `like`: RED → BLUE, Red → Blue, red → blue."""
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word.capitalize() if like[:1].isupper() else word


def _in_compound(doc: Doc, index: int) -> bool:
    token, text = doc[index], doc.text
    end = token.idx + len(token.text)
    return (token.idx > 0 and text[token.idx - 1] in _JOINERS) or (end < len(text) and text[end] in _JOINERS)


def _replace(doc: Doc, index: int, replacement: str) -> str:
    """The phrase with token `index` replaced, and a preceding a/an made to agree with it."""
    words = [t.text_with_ws for t in doc]
    words[index] = replacement + doc[index].whitespace_
    if index > 0 and doc[index - 1].lower_ in ("a", "an"):
        article = "an" if replacement[0].lower() in "aeiou" else "a"
        before = doc[index - 1].text
        # a one-letter "A" is capitalised or shouted: the new word tells which
        article = article.upper() if before.isupper() and replacement.isupper() else _cased(article, before)
        words[index - 1] = article + doc[index - 1].whitespace_
    return "".join(words)


def attribute_swaps(doc: Doc, head_index: int, limit: int, seed: int) -> list[Swap]:
    """Up to `limit` phrases that differ from `doc`'s text in exactly one attribute word."""
    rng = random.Random(f"{seed}:{doc.text}")  # same phrase, same seed → same negatives
    per_slot = []
    for token in doc:
        if token.i == head_index or token.lower_ not in _KIND_OF or _in_compound(doc, token.i):
            continue
        kind = _KIND_OF[token.lower_]
        swaps = []
        for word in contrasting_words(token.lower_):
            replacement = _cased(word, token.text)
            swaps.append(Swap(text=_replace(doc, token.i, replacement), attribute=kind, original=token.text, replacement=replacement))
        rng.shuffle(swaps)
        per_slot.append(swaps)
    # take one from each attribute in turn, so several attributes are covered before any repeats
    interleaved = [swap for group in zip_longest(*per_slot) for swap in group if swap is not None]
    return interleaved[:limit]
