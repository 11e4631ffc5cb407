"""Locates the prompts/ and schemas/ folders in a source checkout or an installed wheel."""

from functools import cache
from pathlib import Path

from pipeline.errors import FgdataError

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # pipeline/, this file is in pipeline/core/


@cache
def resource_dir(name: str) -> Path:
    # A wheel carries them inside the package; an editable install or a checkout
    # has them at the repository root, next to the package.
    for candidate in (_PACKAGE_DIR / "_resources" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FgdataError(f"fgdata's {name}/ folder is missing from the installation at {_PACKAGE_DIR}")


def schema_path(kind: str) -> Path:
    return resource_dir("schemas") / f"{kind}.json"
