"""Rule-based hard negatives: swap one attribute of a region phrase for a contradicting one.

The CPU baseline and fallback of `fgdata negatives`: "a red cup" → "a blue cup" (colour),
"a wooden table" → "a metal table" (material), "two dogs" → "three dogs" (count). Exactly one
attribute changes (one word, or one multi-word unit such as "stainless steel" or "navy blue"), the
head noun never does, only to a value that makes sense for the noun it describes, and a phrase with
no attribute from the lexicons gets none.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import zip_longest
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spacy.tokens import Doc, Token

# Curated lexicons. Each kind of attribute is one or more scales; a scale lists classes of words
# that contradict each other, and a class holds words that say the same thing (first = the word
# offered). A word is swapped only for a word of another class on one of its own scales:
# "large" → "small", never "huge" (same class: no contradiction) nor "tall" (another scale: a
# large wave may well be tall); and one word per class is offered, so a list never holds both
# "grey" and "gray". Hypernyms sit on no scale with their hyponyms (fabric is not offered for
# cotton, patterned not for striped, stone not for marble): they do not contradict them.
_HARD_MATERIALS = [("wooden",), ("metal", "metallic", "steel", "stainless steel", "iron", "cast iron", "wrought iron", "aluminum"),
                   ("plastic",), ("glass",), ("brick",), ("concrete",), ("ceramic", "porcelain"), ("wicker", "rattan"), ("bamboo",),
                   ("rubber",), ("paper", "cardboard"), ("foam",), ("leather",), ("fabric",)]
_HUES = [("red",), ("blue",), ("green",), ("yellow",), ("black",), ("white",), ("brown",), ("grey", "gray"), ("orange",), ("pink",),
         ("purple",), ("beige",)]
SCALES: dict[str, list[list[tuple[str, ...]]]] = {
    # hues only: dark/bright say nothing about the hue ("a bright jacket" may be blue). Silver is a
    # grey and gold a yellow or brown that shines: each contradicts the hues but those.
    "colour": [_HUES, [("silver",)] + [h for h in _HUES if h[0] != "grey"],
               [("golden", "gold")] + [h for h in _HUES if h[0] not in ("yellow", "brown", "orange", "beige")],
               [("silver",), ("golden", "gold")]],
    "lightness": [[("dark",), ("bright",)]],
    # knitted says how a fabric is made, not of what (a knitted sweater may be cotton): it contradicts
    # only what is never knitted
    "material": [_HARD_MATERIALS + [("stone",)], _HARD_MATERIALS + [("marble",)],
                 [("cotton",), ("woolen", "wool", "woollen"), ("silk", "silken"), ("leather",), ("denim",)],
                 [("knitted",), ("leather",), ("denim",)]],
    "size": [
        [("large", "big", "huge", "giant"), ("small", "tiny", "little")],
        [("tall",), ("short",)],
        [("long",), ("short",)],
        [("wide",), ("narrow",)],
        [("thick",), ("thin",)],
    ],
    # Exact plural numerals only: "several"/"many" contradict no numeral, and "single"/"one" would
    # need the noun and its article changed too ("two brown dogs" → "single brown dogs").
    "count": [[("two",), ("three",), ("four",), ("five",), ("six",), ("seven",), ("eight",), ("nine",), ("ten",)]],
    "pattern": [[("plain",), ("patterned",)],
                [("plain",), ("striped",), ("spotted", "dotted", "polka dot"), ("checkered", "plaid", "checked"), ("floral",),
                 ("paisley",), ("zigzag",), ("camouflage",)]],
    "texture": [[("smooth",), ("rough", "bumpy")], [("shiny", "glossy"), ("matte", "dull")], [("soft",), ("hard",)],
                [("fluffy", "furry", "fuzzy"), ("hairless",)], [("silky", "velvety"), ("coarse",)], [("curly",), ("straight",)]],
    "state": [[("open",), ("closed",)], [("empty",), ("full",)], [("wet",), ("dry",)], [("lit",), ("unlit",)],
              [("folded",), ("unfolded",)], [("broken",), ("intact",)], [("parked",), ("moving",)],
              [("standing",), ("sitting",), ("lying",), ("running",), ("walking",)], [("sleeping",), ("running",), ("walking",)]],
    "position": [[("left",), ("right",)], [("upper", "top"), ("lower", "bottom")], [("front",), ("back", "rear")]],
    "shape": [[("round", "circular"), ("square",), ("rectangular",), ("triangular",), ("oval",), ("hexagonal",), ("octagonal",)],
              [("curved",), ("straight",)]],
    # the age of a living thing, and of a thing: "an old man" is not "a vintage man" nor "a new man"
    "age": [
        [("old", "elderly", "aged"), ("young", "youthful")],
        [("old", "aged", "ancient", "antique", "vintage", "retro"), ("new", "modern")],
    ],
}
LEXICONS: dict[str, list[str]] = {
    kind: list(dict.fromkeys(word for scale in scales for group in scale for word in group)) for kind, scales in SCALES.items()
}
_KIND_OF = {word: kind for kind, words in LEXICONS.items() for word in words}
# Words that, before a lexicon word, make one attribute with it: "stainless steel", "navy blue",
# "dark blue". The unit is swapped whole ("a stainless steel fridge" → "a plastic fridge", never
# "a stainless marble fridge") and its first word is never swapped alone.
_COLOUR_PREFIXES = frozenset("navy sky royal baby light pale hot lime olive forest deep dark bright dusty".split())
_UNIT_PREFIXES = {"steel": {"stainless", "brushed"}, "iron": {"cast", "wrought"}, "dot": {"polka"},
                  **{w: _COLOUR_PREFIXES for w in LEXICONS["colour"]}}
# A word joined to another by one of these is part of a compound ("bright-red", "2-year-old",
# "black-and-white", "red/white"): swapping one part breaks it ("a bright-bright car").
_JOINERS = frozenset("-‐‑–—/")

# What an attribute may describe: a curated table of noun classes keyed by the lemma of the noun the
# attribute modifies (not the region's head: in "a man in a blue jacket" blue describes a jacket).
# A noun not listed is a "thing". WordNet would be broader, but no PyPI package ships its data
# offline (wn and nltk download it at run time).
NOUN_CLASSES: dict[str, str] = {
    word: cls
    for cls, words in {
        "person": "man woman person people boy girl child kid baby toddler player fisherman chef worker officer soldier student teacher "
        "doctor nurse rider skier surfer skateboarder snowboarder biker cyclist driver pedestrian lady gentleman guy adult "
        "teenager tourist crowd family couple bride groom athlete runner dancer musician guitarist singer vendor farmer "
        "cowboy referee pitcher batter catcher umpire goalkeeper customer passenger spectator",
        "animal": "dog puppy cat kitten horse pony cow calf sheep lamb goat pig bear elephant giraffe zebra lion tiger monkey deer "
        "fox wolf rabbit mouse squirrel animal cattle bull donkey camel",
        "bird": "bird parrot duck swan goose pigeon seagull gull owl eagle chicken hen rooster penguin flamingo",
        "plant": "tree plant flower rose tulip bush shrub grass leaf palm fern cactus sunflower daisy",
        "food": "apple banana pizza cake bread sandwich donut doughnut cookie fruit vegetable carrot broccoli tomato salad soup "
        "pasta spaghetti burger hotdog egg cheese meat steak lemon strawberry grape potato rice chocolate",
        "clothing": "shirt jacket coat dress skirt hat cap scarf sweater hoodie jeans pants trousers shorts shoe boot sock glove tie "
        "suit uniform vest jersey blouse sneaker sandal",
        "textile": "towel blanket curtain rug carpet pillow cushion bag backpack flag umbrella sheet tablecloth kite tent",
        "vehicle": "car truck bus taxi van train bicycle bike motorcycle boat ship sailboat airplane plane tractor scooter cart jeep tram",
        "furniture": "table desk shelf cabinet dresser counter bookshelf wardrobe",
        "seat": "chair bench stool",
        "upholstered": "sofa couch armchair bed",
        "building": "building house wall bridge fence roof tower skyscraper church booth floor lighthouse barn cabin "
        "hut shed staircase stairs column pillar balcony",
        "opening": "door gate window",
        "device": "laptop computer phone telephone camera clock watch lamp television tv monitor keyboard guitar piano typewriter "
        "remote radio candle sign",
        "appliance": "refrigerator fridge oven microwave dishwasher stove toaster",
        "vessel": "cup mug bowl plate vase glass",
        "bottle": "bottle jar",
        "basket": "basket box crate",
        "utensil": "bucket pot pan spoon fork knife tray can",
        "body": "hand hair eye face head arm leg foot mouth nose beard ear finger",
        "scene": "sky water sea ocean wave road street beach field sand snow mountain hill river lake path sidewalk cloud",
    }.items()
    for word in words.split()
}
_FURNITURE = {"furniture", "seat", "upholstered"}
_CONTAINERS = {"vessel", "bottle", "basket", "utensil"}
_HARD = {"thing", "vehicle", "building", "opening", "device", "appliance"} | _FURNITURE | _CONTAINERS
_OBJECTS = _HARD | {"clothing", "textile"}
_LIVING = {"person", "animal", "bird"}
_ALL = _OBJECTS | _LIVING | {"plant", "food", "body", "scene"}
_TALL = _LIVING | {"plant", "building", "opening", "seat", "appliance", "device", "vessel", "bottle"}  # a short man, lamp, glass


def _fits(words: str, classes: set[str]) -> dict[str, set[str]]:
    return {word: classes for word in words.split()}


# The noun classes each offered word makes sense for ("a furry watch", "a running plate" and "a
# youthful booth" are no negatives: they describe nothing one could see). A word not listed fits all.
FITS: dict[str, set[str]] = {
    **_fits("red blue green yellow black white brown grey orange pink purple beige", _OBJECTS | {"bird"}),
    **_fits("silver", _HARD),
    **_fits("golden", _HARD | {"animal", "bird", "food", "body", "plant"}),
    **_fits("dark bright", _OBJECTS | {"scene"}),
    # materials by what things are made of: no "fabric table", "stone armchair", "wooden fridge", "wicker bottle"
    **_fits("wooden", _HARD - {"appliance", "bottle"}), **_fits("metal", _HARD),
    **_fits("plastic", {"thing", "furniture", "seat", "upholstered", "device", "appliance", "textile"} | _CONTAINERS),
    **_fits("glass", {"thing", "furniture", "building", "opening", "vessel", "bottle"}),
    **_fits("stone marble", {"thing", "furniture", "seat", "building"}), **_fits("concrete", {"building", "seat"}),
    **_fits("brick", {"building"}), **_fits("ceramic", {"thing", "vessel", "bottle"}), **_fits("paper", {"thing", "vessel", "basket"}),
    **_fits("wicker bamboo", _FURNITURE | {"basket"}), **_fits("rubber foam", {"thing"}),
    **_fits("leather", {"seat", "upholstered", "clothing", "textile"}), **_fits("fabric", {"upholstered", "textile"}),
    **_fits("cotton woolen silk denim", {"clothing", "textile"}),
    **_fits("large small", _ALL - {"person"}),  # "a large girl" for "a little girl" is no contradiction anyone writes
    # "short" is a height or a length by what it describes: one sense per noun class
    **_fits("tall", _TALL), **_fits("long", _ALL - _TALL),
    **_fits("knitted", {"clothing", "textile"}),
    **_fits("wide narrow", _ALL - _LIVING),
    **_fits("plain patterned checkered floral paisley zigzag camouflage", {"thing", "clothing", "textile", "upholstered", "vessel"}),
    **_fits("striped spotted", {"thing", "clothing", "textile", "upholstered", "vessel", "animal"}),
    **_fits("smooth rough", _HARD | {"scene", "textile"}), **_fits("shiny matte", _HARD),
    **_fits("soft hard", {"thing", "upholstered", "food"}), **_fits("fluffy", {"animal", "bird", "textile"}),
    **_fits("hairless", {"animal"}), **_fits("silky coarse", {"body", "textile", "clothing"}), **_fits("curly", {"body"}),
    **_fits("open closed", _HARD | {"body"}), **_fits("empty full", {"thing", "vehicle", "furniture"} | _CONTAINERS),
    **_fits("lit unlit", {"thing", "device", "building"}), **_fits("folded unfolded", {"thing", "clothing", "textile", "seat"}),
    **_fits("broken intact", _HARD), **_fits("parked moving", {"vehicle"}),
    **_fits("standing sitting lying running walking sleeping", _LIVING),
    **_fits("round square rectangular triangular oval hexagonal octagonal curved", _HARD | {"food"}),
    **_fits("straight", _HARD | {"food", "body"}),
    **_fits("young", _LIVING), **_fits("new", _OBJECTS),
}
# natural colours of living things and food: "a blue cat", "a beige parrot"'s kin are no negatives
for _cls, _words in {"animal": "black white brown grey", "food": "red green yellow brown",
                     "plant": "red green yellow orange brown white purple pink blue", "body": "black brown grey white blue green red",
                     "scene": "blue grey white green brown black yellow"}.items():
    for _w in _words.split():
        FITS[_w] = FITS[_w] | {_cls}


@dataclass(frozen=True)
class Swap:
    text: str
    attribute: str  # the kind of attribute changed: colour, material, ...


def same_meaning(a: str, b: str) -> bool:
    """Whether two attribute words say the same thing ("grey"/"gray", "large"/"huge")."""
    a, b = a.lower(), b.lower()
    return a == b or any(a in group and b in group for scales in SCALES.values() for scale in scales for group in scale)


def contrasting_words(word: str, noun_class: str | None = None) -> list[str]:
    """One word per class that contradicts `word` on one of its scales, in lexicon order; with
    `noun_class`, only words that make sense for a noun of that class."""
    word = word.lower()
    offered: list[str] = []
    for scale in SCALES.get(_KIND_OF.get(word, ""), []):
        if any(word in group for group in scale):
            offered += [group[0] for group in scale if word not in group and group[0] not in offered]
    fitting = (w for w in offered if noun_class is None or noun_class in FITS.get(w, _ALL))
    return [w for w in fitting if not same_meaning(w, word)]


def noun_class(lemma: str) -> str:
    """The class of a noun by its lemma (NOUN_CLASSES); "thing" for a noun not listed."""
    lemma = lemma.lower()
    if lemma in NOUN_CLASSES:
        return NOUN_CLASSES[lemma]
    if lemma.endswith(("man", "men", "person", "people")):  # fireman, businesswoman, salesperson
        return "person"
    return "thing"


def _cased(word: str, like: str) -> str:
    """`word` in the casing of `like`: RED → BLUE, Red → Blue, red → blue."""
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word.capitalize() if like[:1].isupper() else word


def _in_compound(doc: Doc, start: int, end: int) -> bool:
    text = doc.text
    left, right = doc[start].idx, doc[end - 1].idx + len(doc[end - 1].text)
    return (left > 0 and text[left - 1] in _JOINERS) or (right < len(text) and text[right] in _JOINERS)


def _described_noun(token: Token, kind: str) -> Token | None:
    """The noun an attribute word describes: through adjective, compound and conjunct links to the
    noun after it ("a dark wooden door", "an orange and white lighthouse"), or the noun a participle
    follows ("a man sitting on a wall"). None when the word is no modifier of a noun ("a man holding
    a glass": the glass is an object, and "holding a wooden" is no phrase)."""
    if kind == "position" and token.dep_ == "pobj":
        return token  # "on the left" → "on the right": describes a place, not a noun
    if token.dep_ == "acl" and token.tag_ in ("VBG", "VBN") and token.head.pos_ in ("NOUN", "PROPN"):
        return token.head
    t = token
    for _ in range(6):
        if t.dep_ not in ("amod", "compound", "nummod", "conj", "advmod", "npadvmod", "nmod", "quantmod") or t.head is t:
            return None
        t = t.head
        if t.pos_ in ("NOUN", "PROPN"):
            while t.dep_ == "compound" and t.head.pos_ in ("NOUN", "PROPN") and t.head.i > t.i:
                t = t.head  # "a grey metal bench": grey describes the bench
            return t if t.i > token.i else None
    return None


def _replace(doc: Doc, start: int, end: int, replacement: str) -> str:
    """The phrase with tokens start..end replaced, and a preceding a/an made to agree with it."""
    words = [t.text_with_ws for t in doc]
    words[start:end] = [replacement + doc[end - 1].whitespace_]
    if start > 0 and doc[start - 1].lower_ in ("a", "an"):
        article = "an" if replacement[0].lower() in "aeiou" else "a"
        before = doc[start - 1].text
        # a one-letter "A" is capitalised or shouted: the new word tells which
        article = article.upper() if before.isupper() and replacement.isupper() else _cased(article, before)
        words[start - 1] = article + doc[start - 1].whitespace_
    return "".join(words)


def _attribute_spans(doc: Doc, head_index: int) -> list[tuple[int, int, str]]:
    """(start, end, lexicon entry) of each attribute of the phrase: one token, or a unit of a prefix
    and a lexicon word ("stainless steel", "navy blue"); never the head, never inside a compound."""
    spans = []
    for token in doc:
        if token.i == head_index or token.lower_ not in _KIND_OF:
            continue
        nxt = doc[token.i + 1] if token.i + 1 < len(doc) else None
        if nxt is not None and token.lower_ in _UNIT_PREFIXES.get(nxt.lower_, ()):
            continue  # "dark" of "dark blue": the unit is swapped whole, at "blue"
        start = token.i
        if start > 0 and doc[start - 1].lower_ in _UNIT_PREFIXES.get(token.lower_, ()):
            start -= 1
        entry = " ".join(t.lower_ for t in doc[start : token.i + 1])
        spans.append((start, token.i + 1, entry if entry in _KIND_OF else token.lower_))
    return [s for s in spans if not _in_compound(doc, s[0], s[1])]


def attribute_swaps(doc: Doc, head_index: int, limit: int, seed: int) -> list[Swap]:
    """Up to `limit` phrases that differ from `doc`'s text in exactly one attribute."""
    rng = random.Random(f"{seed}:{doc.text}")  # same phrase, same seed → same negatives
    per_slot = []
    for start, end, entry in _attribute_spans(doc, head_index):
        kind, last = _KIND_OF[entry], doc[end - 1]
        noun = _described_noun(last, kind)
        if noun is None:
            continue
        cls = "any" if noun is last else noun_class(noun.lemma_)
        swaps = [
            Swap(text=_replace(doc, start, end, _cased(word, doc[start].text)), attribute=kind)
            for word in contrasting_words(entry, None if cls == "any" else cls)
        ]
        rng.shuffle(swaps)
        per_slot.append(swaps)
    # take one from each attribute in turn, so several attributes are covered before any repeats
    interleaved = [swap for group in zip_longest(*per_slot) for swap in group if swap is not None]
    return interleaved[:limit]
