"""Versioned prompt templates from prompts/ (or a user's file), with the hash rows record."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.resources import resource_dir
from pipeline.errors import FgdataError


@dataclass(frozen=True)
class Prompt:
    name: str  # "<name>.v<version>" for a bundled prompt, the file path for a user's
    text: str
    sha256: str


def load_prompt(name_or_path: str) -> Prompt:
    """`recaption_long.v1` names prompts/recaption_long.v1.txt; anything with a / or .txt is a path."""
    if "/" in name_or_path or name_or_path.endswith(".txt"):
        path = Path(name_or_path)
        name = str(path.resolve())
    else:
        path = resource_dir("prompts") / f"{name_or_path}.txt"
        name = name_or_path
    if not path.is_file():
        bundled = sorted(p.stem for p in resource_dir("prompts").glob("*.txt"))
        raise FgdataError(f"prompt {name_or_path!r} not found ({path}); bundled prompts: {', '.join(bundled)}")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise FgdataError(f"prompt file {path} is empty")
    return Prompt(name=name, text=text, sha256=hashlib.sha256(text.encode()).hexdigest()[:16])


def fill_template(template: str, values: dict[str, str]) -> str:
    """Fills each `{name}` of `values` in one pass over the template. Text put in is never read
    again, so a caption holding `{phrase}` stays verbatim; other braces (JSON in a user's
    template, an unknown `{name}`) are left as they are, which str.format would not allow."""
    if not values:
        return template
    placeholder = re.compile("|".join(re.escape("{" + name + "}") for name in values))
    return placeholder.sub(lambda match: values[match.group()[1:-1]], template)
