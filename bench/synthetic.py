"""Deterministic alt-text-like captions for benchmarks and long-running tests."""

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
