"""Personal data in caption text: e-mail addresses, phone numbers, URLs and street addresses.

Patterns, not a model: they catch the common written forms (alt-text scraped with a shop's contact
line, a photographer's e-mail) and err towards flagging. Each is bounded so no caption makes them
backtrack for long.
"""

from __future__ import annotations

import re

PATTERNS: dict[str, re.Pattern] = {
    "email": re.compile(r"\b[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}\b"),
    "url": re.compile(r"\b(?:https?://|www\.)[^\s<>\"']{1,2000}|\b[\w-]{1,63}\.(?:com|org|net|io|co|de|uk|fr|info|biz)(?:/[^\s<>\"']{0,2000})?\b", re.IGNORECASE),
    # 7 to 15 digits in groups (E.164 at most 15), optionally +country and (area): "+1 (555) 123-4567"
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w])"),
    "street_address": re.compile(
        r"\b\d{1,5}(?:\s+[A-Z][a-z]{1,20}){1,4}\s+(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl)\b\.?"
    ),
}
# a phone number has at least this many digits: "2 3" or "10-12" are counts and ranges, not numbers
_MIN_PHONE_DIGITS = 7


def find_personal_data(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of each match, in text order; overlapping matches keep the first found."""
    found: list[tuple[str, int, int]] = []
    for kind, pattern in PATTERNS.items():
        for match in pattern.finditer(text):
            if kind == "phone" and sum(c.isdigit() for c in match.group()) < _MIN_PHONE_DIGITS:
                continue
            if not any(start < match.end() and match.start() < end for _, start, end in found):
                found.append((kind, match.start(), match.end()))
    return sorted(found, key=lambda span: span[1])


def mask_personal_data(text: str, spans: list[tuple[str, int, int]]) -> str:
    """`text` with each span replaced by its kind in brackets: "mail [email]"."""
    out, last = [], 0
    for kind, start, end in spans:
        out += [text[last:start], f"[{kind}]"]
        last = end
    return "".join(out) + text[last:]
