"""Versioned prompt templates from prompts/ (or a user's file), with the hash rows record."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import FgdataError
from pipeline.resources import resource_dir


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
