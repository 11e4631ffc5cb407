"""Caption cleaning shared by every stage that reads text."""

from __future__ import annotations

import html
import re
import unicodedata

_TAG = re.compile(r"<[^<>]{0,300}>")
_SPACES = re.compile(r"\s+")
# Control, format, surrogate and private-use characters carry no meaning in a caption
# and confuse tokenisers; whitespace among them becomes a plain space.
_DROPPED_CATEGORIES = {"Cc", "Cf", "Cs", "Co"}


def clean_caption(text: str | None) -> str | None:
    """Strips HTML tags and entities, control characters and runs of whitespace."""
    if text is None:
        return None
    text = html.unescape(_TAG.sub(" ", text))
    text = "".join(
        " " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) not in _DROPPED_CATEGORIES
    )
    return _SPACES.sub(" ", text).strip()


def latin_fraction(text: str) -> float:
    """Share of letters in Latin scripts (ASCII through Latin Extended); 1.0 when there are none."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 1.0
    return sum(ord(ch) < 0x250 for ch in letters) / len(letters)
