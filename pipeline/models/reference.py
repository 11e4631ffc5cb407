"""Model references (hub id or local directory): early checks and random-weight labelling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.errors import FgdataError, first_line

# A model directory made by `fgdata tiny-model` carries this file: what it produces is noise
# from random weights, and every row it produces says so.
RANDOM_WEIGHTS_MARKER = "fgdata_random_weights.json"


def resolve_local_paths(settings, *names: str):
    """A copy of `settings` (a dataclass) with the named model settings absolute where they are
    local paths: Ray workers on other nodes, or in another working directory, must find the same
    files (hub ids and empty settings stay as they are). `settings` itself is left unchanged."""
    changed = {name: str(Path(value).resolve()) for name in names if (value := getattr(settings, name)) and Path(value).exists()}
    return dataclasses.replace(settings, **changed) if changed else settings


def absolute_local_paths(settings, *names: str) -> None:
    """`resolve_local_paths` in place, for settings a command owns (the trainers' own copies)."""
    resolved = resolve_local_paths(settings, *names)
    for name in names:
        setattr(settings, name, getattr(resolved, name))


def is_random_model(model: str) -> bool:
    return (Path(model) / RANDOM_WEIGHTS_MARKER).exists()


def check_model_reference(model: str, *, revision: str | None, trust_remote_code: bool) -> None:
    """Reads only the model's config, on the driver, so a wrong id or path stops the run before
    any actor starts (and before a large download)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise FgdataError(f"cannot use model {model!r}: {first_line(exc)} (give a hub id or a local model directory)") from None
