"""Rule-based hard negatives: swap one attribute word of a region phrase for another of its kind.

The CPU baseline and fallback of `fgdata negatives`: "a red cup" → "a blue cup" (colour),
"a wooden table" → "a metal table" (material), "two dogs" → "three dogs" (count). Exactly one
word changes, the head noun never does, and a phrase with no attribute from the lexicons gets none.
"""

from __future__ import annotations

import random
from itertools import zip_longest
from dataclasses import dataclass

from spacy.tokens import Doc

# Curated lexicons: words of one kind are interchangeable in a phrase and change what it depicts.
LEXICONS: dict[str, list[str]] = {
    "colour": ["red", "blue", "green", "yellow", "black", "white", "brown", "grey", "gray", "orange", "pink", "purple", "silver", "golden", "beige", "dark", "bright"],
    "material": ["wooden", "metal", "metallic", "plastic", "glass", "leather", "stone", "brick", "paper", "cotton", "woolen", "wool", "marble", "steel", "ceramic", "concrete", "fabric", "rubber"],
    "size": ["small", "large", "big", "tiny", "huge", "tall", "short", "long", "little", "giant", "thin", "thick", "wide", "narrow"],
    "count": ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "several", "many", "single"],
    "pattern": ["striped", "plain", "spotted", "checkered", "floral", "dotted", "patterned", "plaid", "paisley", "zigzag", "camouflage"],
    "texture": ["smooth", "rough", "shiny", "fluffy", "furry", "soft", "hard", "glossy", "matte", "bumpy", "silky", "velvety"],
    "state": ["open", "closed", "empty", "full", "wet", "dry", "broken", "lit", "folded", "sleeping", "standing", "sitting", "running"],
    "position": ["left", "right", "upper", "lower", "front", "back", "top", "bottom", "middle", "rear", "side"],
    "shape": ["round", "square", "rectangular", "triangular", "oval", "curved", "flat", "circular", "hexagonal", "spherical", "cylindrical", "octagonal", "conical", "pointed"],
    "age": ["old", "young", "new", "elderly", "modern", "vintage", "antique", "ancient", "youthful", "retro", "aged"],
}
_KIND_OF = {word: kind for kind, words in LEXICONS.items() for word in words}
# Words that would say the same thing, so swapping between them is no negative.
_SYNONYMS = [{"grey", "gray"}, {"big", "large"}, {"metal", "metallic", "steel"}, {"wool", "woolen"}, {"round", "circular", "spherical"}, {"tiny", "little", "small"}]


@dataclass(frozen=True)
class Swap:
    text: str
    attribute: str  # the kind of attribute changed: colour, material, ...
    original: str
    replacement: str


def _same_meaning(a: str, b: str) -> bool:
    return a == b or any(a in group and b in group for group in _SYNONYMS)


def _replace(doc: Doc, index: int, replacement: str) -> str:
    """The phrase with token `index` replaced, and a preceding a/an made to agree with it."""
    words = [t.text_with_ws for t in doc]
    words[index] = replacement + doc[index].whitespace_
    if index > 0 and doc[index - 1].lower_ in ("a", "an"):
        article = "an" if replacement[0].lower() in "aeiou" else "a"
        article = article.capitalize() if doc[index - 1].text[0].isupper() else article
        words[index - 1] = article + doc[index - 1].whitespace_
    return "".join(words)


def attribute_swaps(doc: Doc, head_index: int, limit: int, seed: int) -> list[Swap]:
    """Up to `limit` phrases that differ from `doc`'s text in exactly one attribute word."""
    rng = random.Random(f"{seed}:{doc.text}")  # same phrase, same seed → same negatives
    per_slot = []
    for token in doc:
        if token.i == head_index or token.lower_ not in _KIND_OF:
            continue
        kind = _KIND_OF[token.lower_]
        swaps = []
        for word in LEXICONS[kind]:
            if not _same_meaning(word, token.lower_):
                replacement = word.capitalize() if token.text[0].isupper() else word
                swaps.append(Swap(text=_replace(doc, token.i, replacement), attribute=kind, original=token.text, replacement=replacement))
        rng.shuffle(swaps)
        per_slot.append(swaps)
    # take one from each attribute in turn, so several attributes are covered before any repeats
    interleaved = [swap for group in zip_longest(*per_slot) for swap in group if swap is not None]
    return interleaved[:limit]
