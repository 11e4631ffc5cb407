"""Caption hierarchies: parse a model's chain of tiers, check its shape, and check it with NLI.

A chain runs from generic to specific (`animal => goat => goat on an island => <caption>`);
each tier must be entailed by the next one.
"""

from __future__ import annotations

import re

from pipeline.core.llm_output import MAX_OUTPUT_CHARS, load_json

SEPARATOR = " => "
# Task prefixes of the two distilled Flan-T5 directions: caption -> its generic tiers, and tier -> the next, more specific one
TO_GENERAL = "generalize: "
TO_SPECIFIC = "specify: "
# Whitespace is stripped from the parts afterwards, never matched around an arrow: `\s*` on
# both sides backtracks over every run of spaces and made 16,000-space answers take seconds.
_ARROWS = re.compile(r"=>|->|→|>")
_NUMBERED = re.compile(r"[ \t]*(?:(?:tier|level)[ \t]*)?\d+[ \t]*[.):-]", re.I)


def split_tiers(text: str) -> tuple[list[str], str | None]:
    """The tiers of an answer written as `a => b => c`, a numbered list or a JSON list, as written
    (no shape check yet), or a reason it holds no chain. Never raises; linear in the text."""
    if not isinstance(text, str) or not text.strip():
        return [], "empty_output"
    if len(text) > MAX_OUTPUT_CHARS:
        return [], "too_long"
    candidates = []
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        value = load_json(text[start : end + 1])
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            candidates.append(value)
    lines = text.splitlines()
    numbered = [line[match.end() :].strip() for line in lines if (match := _NUMBERED.match(line))]
    if len(numbered) >= 2:
        candidates.append(numbered)
    for line in lines:
        if _ARROWS.search(line):
            # prose before a colon ("Here is the hierarchy: a => b") is not a tier
            chain_part = line.split(":", 1)[1] if ":" in line.split("=>")[0] else line
            candidates.append(_ARROWS.split(chain_part))
    if not candidates:
        return [], "unparseable"
    return [tier.strip().strip('"').strip() for tier in candidates[0]], None


def complete_chain(text: str, caption: str, tiers: int = 4) -> tuple[list[str], tuple[str, str] | None]:
    """A model writes the tiers above a caption; the caption is the last tier. An answer that
    repeats the caption as its last tier is read the same way. Returns (chain, None), or ([],
    (reason, detail)) where the detail quotes the answer."""
    answered = f"model answered {text[:300]!r}" if isinstance(text, str) else f"model answered {type(text).__name__}"
    above, reason = split_tiers(text)
    if reason:
        return [], (reason, answered)
    if len(above) == tiers and normal_text(above[-1]) == normal_text(caption):
        above = above[:-1]
    chain = [*above, caption.strip()]
    problem = chain_shape_problem(chain, tiers, caption)
    return ([], (problem[0], f"{answered}; {problem[1]}")) if problem else (chain, None)


def normal_text(text: str) -> str:
    return " ".join(text.lower().split())


# How much longer (in words) a tier may be than the next, more specific one. Specific does not
# mean longer: the official HierarCaps chains run `baked goods => cake`, `type of place of
# retail => store` (5 words over 1) and end in captions up to 3 words shorter than the tier above
# them. Over all 24,479 official chains (test and expanded) a tier is at most 4 words longer than
# the next; twice that is left as margin. The rule only stops answers that put prose or the
# caption in a generic tier; whether the tiers really narrow is the NLI filter's call.
MAX_EXTRA_WORDS = 8


def chain_shape_problem(chain: list[str], tiers: int = 4, caption: str | None = None) -> tuple[str, str] | None:
    """Why a generated chain is not one, as (reason, detail), or None if its shape is fine: the rule
    for model output (seed, augment, generate). Curated chains (`hierarcaps import`) are never judged by it."""
    if len(chain) != tiers:
        return "wrong_tier_count", f"{len(chain)} tiers, not {tiers}"
    if any(not tier.strip() for tier in chain):
        return "blank_tier", f"tier {next(i for i, tier in enumerate(chain) if not tier.strip()) + 1} is blank"
    # case and spacing only: the official data has 56 chains whose tiers differ by punctuation
    # alone (`riders in their gear => riders in their gear .`), 336 by punctuation or an article
    lowered = [normal_text(tier) for tier in chain]
    if len(set(lowered)) != len(lowered):
        return "repeated_tier", "two tiers are the same text (case and spacing aside)"
    if caption is not None and lowered[-1] != normal_text(caption):
        return "last_tier_not_caption", f"the last tier {chain[-1][:200]!r} is not the caption"
    words = [len(tier.split()) for tier in chain]
    for i, (earlier, later) in enumerate(zip(words, words[1:])):
        if earlier > later + MAX_EXTRA_WORDS:
            return "tier_too_long", f"tier {i + 1} has {earlier} words, over {MAX_EXTRA_WORDS} more than tier {i + 2}'s {later}"
    return None


def entailment_pairs(chain: list[str]) -> list[tuple[str, str]]:
    """(premise, hypothesis) per consecutive pair: the more specific tier must entail the generic one."""
    return [(chain[i + 1], chain[i]) for i in range(len(chain) - 1)]


def chain_nli_problem(chain: list[str], entailment: list[float], threshold: float) -> tuple[str, str] | None:
    """("not_entailed", detail naming the first generic tier its more specific neighbour does not
    entail, with the score), or None when every tier is entailed. `entailment` is per
    `entailment_pairs(chain)`."""
    for i, score in enumerate(entailment):
        if score < threshold:
            return "not_entailed", f"tier {i + 2} ({chain[i + 1]!r}) entails tier {i + 1} ({chain[i]!r}) with only {score:.2f} < {threshold}"
    return None
