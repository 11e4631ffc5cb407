"""A rule-generated world of caption hierarchies, for proving that distillation learns.

Every chain is `object => colour object => colour object place => a size colour object verb place`,
so the right answers are known: the one true chain for a caption, and every valid child of a tier.
"""

from __future__ import annotations

import random

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
