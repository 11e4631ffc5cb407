"""Parse an LLM's list of hard negatives, tolerating the ways real models wrap and break JSON.

Accepted: a JSON list of {"negative", "attribute"} objects or of strings, inside prose or code
fences, with trailing commas or single-quoted keys; failing that, a numbered or bulleted list.
Nothing is ever evaluated as code.

Model output is hostile input: the parsers here return a value or a reason and never raise,
and they run in time linear in the text (line by line, no regex that can backtrack across a
run of whitespace or newlines), after refusing text longer than any configured answer.
"""

from __future__ import annotations

import json
import re

# Far above any answer a configured max_new_tokens allows (512 tokens is ~2,500 characters):
# longer text is a runaway generation, refused before any parsing.
MAX_OUTPUT_CHARS = 32_000

_FENCE = "```"
_TRAILING_COMMA = re.compile(r",\s*([\]}])")  # each comma scans only the whitespace after it: linear
_LIST_MARKER = re.compile(r"[ \t]*(?:\d+[.)]|[-*•])[ \t]+")
_ATTRIBUTE = re.compile(r"(?:attribute\s*:\s*)?([A-Za-z ]+)")


def parse_negatives(text: str) -> tuple[list[tuple[str, str | None]], str | None]:
    """[(negative, attribute or None)] and None, or [] and a reason: empty_output / too_long /
    unparseable / empty_list."""
    if not isinstance(text, str) or not text.strip():
        return [], "empty_output"
    if len(text) > MAX_OUTPUT_CHARS:
        return [], "too_long"
    for candidate in json_candidates(text):
        items = _load_list(candidate)
        if items is not None:
            parsed = [item for item in map(_item, items) if item]
            return (parsed, None) if parsed else ([], "empty_list")
    lines = marked_lines(text)
    if lines:
        parsed = [item for item in (_split_attribute(line.strip('"')) for line in lines) if item[0]]
        return (parsed, None) if parsed else ([], "empty_list")
    return [], "unparseable"


def json_candidates(text: str) -> list[str]:
    """The inside of each closed ``` fence (a json label dropped), then the span from the first
    `[` to the last `]`."""
    parts = text.split(_FENCE)
    candidates = []
    for block in parts[1 : len(parts) - 1 : 2]:  # odd parts have a fence on both sides
        if block[:4] in ("json", "JSON"):
            block = block[4:]
        candidates.append(block.strip())
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    return candidates


def load_json(text: str):
    """The JSON value of `text`, or None when it is none. Numbers are dropped (read as None):
    no answer needs them, and one of 4,300+ digits makes `int()` raise. Nesting deep enough to
    exhaust the stack is no answer either."""
    try:
        return json.loads(text, parse_int=_no_number, parse_float=_no_number, parse_constant=_no_number)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None


def marked_lines(text: str) -> list[str]:
    """The text of each `1. …`, `2) …`, `- …`, `* …` or `• …` line, stripped."""
    items = []
    for line in text.splitlines():
        marker = _LIST_MARKER.match(line)
        if marker and line[marker.end() :].strip():
            items.append(line[marker.end() :].strip())
    return items


def _no_number(_text: str) -> None:
    return None


def _load_list(candidate: str):
    for attempt in (candidate, _TRAILING_COMMA.sub(r"\1", candidate), _TRAILING_COMMA.sub(r"\1", candidate).replace("'", '"')):
        value = load_json(attempt)
        if isinstance(value, dict):  # {"negatives": [...]}
            value = next((v for v in value.values() if isinstance(v, list)), None)
        if isinstance(value, list):
            return value
    return None


def _item(value) -> tuple[str, str | None] | None:
    if isinstance(value, str):
        return (value.strip(), None) if value.strip() else None
    if isinstance(value, dict):
        text = next((value[k] for k in ("negative", "phrase", "text", "caption") if isinstance(value.get(k), str)), None)
        attribute = value.get("attribute") if isinstance(value.get("attribute"), str) else None
        return (text.strip(), attribute.strip().lower() if attribute else None) if text and text.strip() else None
    return None


def _split_attribute(line: str) -> tuple[str, str | None]:
    """`a blue cup (colour)` or `a glass cup [attribute: material]` → (phrase, attribute)."""
    if line[-1:] in (")", "]"):
        start = max(line.rfind("("), line.rfind("["))
        match = _ATTRIBUTE.fullmatch(line[start + 1 : -1].strip()) if start >= 0 else None
        if match and match.group(1).strip():
            return line[:start].strip().strip('"'), match.group(1).strip().lower()
    return line, None
