"""Data printed on a terminal: keys, captions, phrases, strata, reasons and details come from the
data (scraped captions, a verdicts file, a file name), so they are hostile input there too.

A terminal obeys the control characters in what it prints: ESC starts sequences that recolour,
retitle the window, move the cursor over earlier output or (in some terminals) write files; CR
and BS overwrite a line; bidi overrides make text read differently from its bytes (a reason that
shows "valid" but holds "dilav"). So every such character a data value holds is shown escaped,
the way Python's repr spells it (`\\x1b`, `\\u202e`), never sent to the terminal.
"""

from __future__ import annotations

import logging
import re

# C0 (tab and newline included: one value stays on one line), DEL and C1 (0x9b is a one-byte CSI);
# the bidi marks, embeddings, overrides and isolates; the line and paragraph separators; and lone
# surrogates (an undecodable file name's bytes), which would make printing fail rather than show.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(value) -> str:
    """`str(value)` with every control, bidi and separator character escaped (`\\x1b`, `\\u202e`):
    safe to print, one line, and the same text otherwise."""
    return _UNSAFE.sub(lambda match: ascii(match.group())[1:-1], str(value))


def printable_lines(text) -> str:
    """`printable` line by line: a message of several lines (a stage's failed shards) keeps its
    line breaks, and nothing else it quotes from data reaches the terminal raw."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


class PrintableFormatter(logging.Formatter):
    """Log lines escaped as `printable_lines` escapes them: their arguments are often data (a key,
    a path, the error a shard failed with)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable_lines(super().format(record))
