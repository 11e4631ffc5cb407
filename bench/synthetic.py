"""Deterministic synthetic text for benchmarks and tests: alt-text-like captions, and caption hierarchies."""

from __future__ import annotations

import random

_SUBJECTS = ["man", "woman", "child", "dog", "cat", "horse", "cyclist", "chef", "bird", "farmer", "student", "surfer"]
_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey", "orange", "pink"]
_SIZES = ["small", "large", "tall", "old", "young", "tiny", "wooden", "shiny"]
_CLOTHES = ["jacket", "hat", "dress", "shirt", "scarf", "helmet", "coat", "sweater"]
_OBJECTS = ["umbrella", "ball", "bicycle", "book", "cup", "guitar", "kite", "basket", "lamp", "bench", "table", "boat"]
_PLACES = ["street", "beach", "park", "kitchen", "field", "lake", "garden", "market", "station", "forest"]
_VERBS = ["holding", "carrying", "looking at", "sitting next to", "standing near", "walking past", "playing with"]
_TEMPLATES = [
    "A {s1} {subject} in a {c1} {cloth} {verb} a {s2} {c2} {obj} in a {place}.",
    "{Num} {c1} {obj}s on a {s1} {obj2} near the {place}.",
    "A {c1} {subject} with a {c2} {cloth} {verb} a {obj} while a {subject2} watches from the {place}.",
    "Close-up photo of a {s1} {c1} {obj} and a {c2} {obj2} on a {s2} table.",
    "The image shows a {subject} {verb} a {c1} {obj}; in the background, a {s1} {obj2} stands by the {place}.",
]
_NUMBERS = ["Two", "Three", "Four", "Several", "Many"]


def synthetic_captions(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        template = rng.choice(_TEMPLATES)
        captions.append(
            template.format(
                subject=rng.choice(_SUBJECTS), subject2=rng.choice(_SUBJECTS), c1=rng.choice(_COLOURS), c2=rng.choice(_COLOURS),
                s1=rng.choice(_SIZES), s2=rng.choice(_SIZES), cloth=rng.choice(_CLOTHES), verb=rng.choice(_VERBS),
                obj=rng.choice(_OBJECTS), obj2=rng.choice(_OBJECTS), place=rng.choice(_PLACES), Num=rng.choice(_NUMBERS),
            )
        )
    return captions


# A rule-generated world of caption hierarchies, for proving that distillation learns (tests) and
# for the hierarcaps benchmark. Every chain is `object => colour object => colour object place =>
# a size colour object verb place`, so the right answers are known: the one true chain for a
# caption, and every valid child of a tier.
OBJECTS = ["cup", "dog", "car", "chair", "bird", "lamp", "boat", "horse", "bottle", "clock", "kite", "bench"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange"]
PLACES = ["on the table", "in the kitchen", "near the river", "on the street", "in the garden", "by the window", "on the beach", "in the snow"]
SIZES = ["small", "large", "tiny", "big"]
VERBS = ["standing", "resting", "sitting", "waiting"]


def synthetic_chains(count: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    chains = []
    for _ in range(count):
        obj, colour, place = rng.choice(OBJECTS), rng.choice(COLOURS), rng.choice(PLACES)
        caption = f"a {rng.choice(SIZES)} {colour} {obj} {rng.choice(VERBS)} {place}"
        chains.append([obj, f"{colour} {obj}", f"{colour} {obj} {place}", caption])
    return chains


def is_valid_child(parent: str, child: str) -> bool:
    """Whether `child` is one of the world's specialisations of `parent` (the tier below it)."""
    words = parent.split()
    if not parent:
        return child in OBJECTS
    if len(words) == 1:
        return any(child == f"{c} {parent}" for c in COLOURS)
    if len(words) == 2:
        return any(child == f"{parent} {p}" for p in PLACES)
    colour, obj = words[0], words[1]
    place = parent[len(colour) + len(obj) + 2 :]
    return any(child == f"a {s} {colour} {obj} {v} {place}" for s in SIZES for v in VERBS)
