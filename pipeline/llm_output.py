"""Parse an LLM's list of hard negatives, tolerating the ways real models wrap and break JSON.

Accepted: a JSON list of {"negative", "attribute"} objects or of strings, inside prose or code
fences, with trailing commas or single-quoted keys; failing that, a numbered or bulleted list.
Nothing is ever evaluated as code.
"""

from __future__ import annotations

import json
import re

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+(.+?)\s*$", re.M)
_ATTRIBUTE_SUFFIX = re.compile(r"\s*[\(\[]\s*(?:attribute\s*:\s*)?([A-Za-z ]+?)\s*[\)\]]\s*$")


def parse_negatives(text: str) -> tuple[list[tuple[str, str | None]], str | None]:
    """[(negative, attribute or None)] and None, or [] and a reason: empty_output / unparseable / empty_list."""
    if not text or not text.strip():
        return [], "empty_output"
    for candidate in _json_candidates(text):
        items = _load_list(candidate)
        if items is not None:
            parsed = [item for item in map(_item, items) if item]
            return (parsed, None) if parsed else ([], "empty_list")
    lines = _LIST_ITEM.findall(text)
    if lines:
        return [_split_attribute(line.strip().strip('"')) for line in lines], None
    return [], "unparseable"


def _json_candidates(text: str) -> list[str]:
    candidates = [block.strip() for block in _FENCE.findall(text)]
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    return candidates


def _load_list(candidate: str):
    for attempt in (candidate, _TRAILING_COMMA.sub(r"\1", candidate), _TRAILING_COMMA.sub(r"\1", candidate).replace("'", '"')):
        try:
            value = json.loads(attempt)
        except json.JSONDecodeError:
            continue
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
    match = _ATTRIBUTE_SUFFIX.search(line)
    if match:
        return line[: match.start()].strip().strip('"'), match.group(1).strip().lower()
    return line, None
