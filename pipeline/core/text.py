"""Caption cleaning shared by every stage that reads text.

`clean_caption` is idempotent: cleaning a cleaned caption changes nothing. Ingest cleans the
captions it stores, and phrases and recaption clean whatever they read again, because their
input may come from elsewhere (an LLM's long caption, a user's own shards). Cleaning twice must
not decode entities twice: "&amp;lt;i&amp;gt;" would become "&lt;i&gt;" at ingest, "<i>" in
phrases, and an empty tag after that. So one call repeats its passes until the text stops
changing, and what it returns is already the fixed point. Escaped markup is treated as markup
("&lt;b&gt;red&lt;/b&gt;" -> "red"): in a caption it is residue of a scraped page, not text.
"""

from __future__ import annotations

import html
import re
import unicodedata

# Each pass either leaves the text alone or makes it shorter, so this only bounds the cost of
# pathological nesting (real captions settle in two or three passes: escaped twice, then clean).
_MAX_PASSES = 8

# Script and style bodies are code, not description; an unclosed one runs to the end of the text
# as it would in a browser. Comments and CDATA likewise.
_CODE_ELEMENT = re.compile(r"<(script|style)\b[^>]{0,300}>.*?(?:</\1\s*>|$)", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?(?:-->|$)|<!\[CDATA\[.*?(?:\]\]>|$)", re.DOTALL)
# A tag starts with a letter ("<b>", "</a>", "<br/>") or "!"/"?" ("<!DOCTYPE html>"), so a
# comparison such as "a < b > c" is text and survives.
_TAG = re.compile(r"</?[A-Za-z][^<>]{0,300}>|<[!?][^<>]{0,300}>")
# Terminal escape sequences: CSI ("ESC[31m", also the one-byte CSI), OSC ("ESC]...BEL") and the
# two-byte forms. Dropping only the ESC character, as the control-character rule would, leaves
# "[31m" glued to the next word.
_ANSI = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")
# The same colour codes after an older cleaner dropped their ESC ("with[31mred[0m"); "[5m]" (five
# metres in brackets) is left alone.
_ORPHAN_SGR = re.compile(r"\[\d{1,3}(?:;\d{1,3})*m(?!\])")
# Markdown: images and links keep their text, emphasis and code marks go, line markers go.
_MD_IMAGE_OR_LINK = re.compile(r"!?\[([^\[\]]{0,500})\]\([^()\s]{0,2000}(?:\s+\"[^\"]*\")?\)")
_MD_REFERENCE_LINK = re.compile(r"!?\[([^\[\]]{1,500})\]\[[^\[\]]{0,100}\]")
_MD_EMPHASIS = re.compile(r"(?<![\w*~`])(\*{1,3}|_{1,3}|~~|`+)(?=\S)(.{1,300}?)(?<=\S)\1(?![\w*~`])")
_MD_LINE_MARK = re.compile(r"^[ \t]*(?:#{1,6}[ \t]+|>[ \t]?|[-*+][ \t]+|\d{1,3}[.)][ \t]+|[-*_=]{3,}[ \t]*$)", re.MULTILINE)
# URLs name no visible object; a scheme ("https://", "ftp://"), "www.", or a pseudo-scheme.
_URL = re.compile(r"(?:\b[A-Za-z][A-Za-z0-9+.-]{1,20}://|\bwww\.|\b(?:mailto|javascript|data):)[^\s<>\"']*", re.IGNORECASE)
_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]")
# "&amp;amp;lt;" (escaped again at every hop between systems): one run of escaped ampersands is
# one "&", so any depth decodes in a single pass instead of one level per pass.
_ESCAPED_AMPERSANDS = re.compile(r"&(?:amp;|#0*38;|#[xX]0*26;)+")
_SPACES = re.compile(r"\s+")
# Control, format, surrogate and private-use characters carry no meaning in a caption
# and confuse tokenisers; whitespace among them becomes a plain space.
_DROPPED_CATEGORIES = {"Cc", "Cf", "Cs", "Co"}


def clean_caption(text: str | None) -> str | None:
    """Caption text without markup: NFKC-normalised ("ａ ｒｅｄ ｃａｒ" -> "a red car"), HTML tags,
    script/style bodies and entities, markdown, URLs, terminal escapes and control characters
    removed, whitespace collapsed. Idempotent (see the module docstring)."""
    if text is None:
        return None
    for _ in range(_MAX_PASSES):
        cleaned = _clean_once(text)
        if cleaned == text:
            break
        text = cleaned
    return text


def _clean_once(text: str) -> str:
    # NFKC first, so fullwidth "＜script＞" or "ｈｔｔｐｓ：／／" is caught by the rules below.
    text = unicodedata.normalize("NFKC", text)
    text = _CODE_ELEMENT.sub(" ", text)
    text = _COMMENT.sub(" ", text)
    text = _TAG.sub(" ", text)
    text = html.unescape(_ESCAPED_AMPERSANDS.sub("&", text))  # markup it reveals is cleaned next pass
    text = _ANSI.sub("", text)
    text = _ORPHAN_SGR.sub("", text)
    text = _MD_IMAGE_OR_LINK.sub(r" \1 ", text)  # before URLs: the link text survives its target
    text = _MD_REFERENCE_LINK.sub(r" \1 ", text)
    text = _MD_LINE_MARK.sub("", text)  # before whitespace is collapsed: these marks open a line
    text = _MD_EMPHASIS.sub(r"\2", text)
    text = _URL.sub(" ", text)
    text = _EMPTY_BRACKETS.sub(" ", text)
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
