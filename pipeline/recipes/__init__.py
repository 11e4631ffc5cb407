"""Recipes: a whole chain of stages as one command (`fgdata run fggrn SOURCE OUT`).

A recipe is a small YAML file: its `steps`, each a stage with its inputs (SOURCE, the command's
argument, or another step) and optional `set` overrides for that step alone. Step NAME writes
OUT/NAME/, a normal fgdata dataset the single-stage commands read. fggrn.yaml and hierarcaps.yaml
ship inside the package; any other path is read as the user's own recipe. Everything here is
checked before any work: unknown stages or keys, missing or unknown inputs, cycles.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import read_yaml
from pipeline.errors import FgdataError, shown

BUNDLED_DIR = Path(__file__).parent
SOURCE = "SOURCE"
# A step's name is a folder under OUT: no separators, no dot-files.
_STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# The bundled recipes have 4 and 6 steps; a longer list is a generated file gone wrong.
MAX_STEPS = 200


@dataclass(frozen=True)
class StepKind:
    """What a recipe step of one stage takes: its named inputs, which of them may list several
    datasets, and the settings an input stands for (e.g. generate's `model` is hierarcaps.generator)."""

    inputs: tuple[str, ...] = ("input",)
    many: tuple[str, ...] = ()
    settings: dict[str, str] = field(default_factory=dict)


STEP_KINDS = {
    "ingest": StepKind(),
    "dedup": StepKind(),
    "screen": StepKind(),
    "recaption": StepKind(),
    "phrases": StepKind(),
    "ground": StepKind(inputs=("input", "images")),
    "negatives": StepKind(),
    "hierarcaps-import": StepKind(),
    "hierarcaps-seed": StepKind(),
    "hierarcaps-augment": StepKind(inputs=("input", "demonstrations")),
    "hierarcaps-filter": StepKind(),
    "hierarcaps-distill": StepKind(many=("input",)),
    "hierarcaps-generate": StepKind(inputs=("input", "model"), settings={"model": "hierarcaps.generator"}),
    "hierarcaps-negatives": StepKind(),
}


@dataclass(frozen=True)
class Step:
    name: str
    stage: str
    inputs: dict[str, tuple[str, ...]]  # input name -> SOURCE and/or step names
    overrides: tuple[str, ...] = ()  # `set`: key=value for this step only

    def upstream(self) -> list[str]:
        """The steps this one reads, in order, once each."""
        return list(dict.fromkeys(ref for refs in self.inputs.values() for ref in refs if ref != SOURCE))


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    steps: tuple[Step, ...]  # in an order where every step comes after the steps it reads


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A bundled recipe by name (fggrn, hierarcaps), else the user's recipe file at that path."""
    if name_or_path in bundled_recipes():
        bundled = BUNDLED_DIR / f"{name_or_path}.yaml"
        return parse_recipe(read_yaml(bundled, what="recipe"), name_or_path, str(bundled))
    path = Path(name_or_path)
    # os.path.exists: a name too long for the file system is "no", where Path.exists raises
    if not os.path.exists(path) and path.suffix not in (".yaml", ".yml"):
        raise FgdataError(f"no recipe {shown(name_or_path)}: give one of {', '.join(bundled_recipes())} or the path of a recipe .yaml file")
    return parse_recipe(read_yaml(path, what="recipe"), path.stem, str(path))


def parse_recipe(data: dict, name: str, where: str) -> Recipe:
    unknown = _first_unknown(data, {"description", "steps"})
    if unknown is not None:
        raise FgdataError(f"recipe {where}: unknown key {shown(unknown)} (a recipe has description and steps)")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise FgdataError(f"recipe {where}: 'steps' must be a non-empty list of steps")
    if len(raw_steps) > MAX_STEPS:
        raise FgdataError(f"recipe {where} has {len(raw_steps)} steps; a recipe has at most {MAX_STEPS} steps")
    steps = [_parse_step(raw, index, where) for index, raw in enumerate(raw_steps, 1)]
    names = [s.name for s in steps]
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated:
        raise FgdataError(f"recipe {where}: two steps are named {repeated!r}; each step writes OUT/<name>, so names must differ")
    for step in steps:
        for ref in step.upstream():
            if ref not in names:
                raise FgdataError(f"recipe {where}: step {step.name!r} reads {shown(ref)}, which is neither SOURCE nor a step ({', '.join(names)})")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise FgdataError(f"recipe {where}: 'description' must be text")
    return Recipe(name=name, description=description, steps=tuple(_in_run_order(steps, where)))


def _first_unknown(mapping: dict, known: set[str]):
    """The first key of `mapping` (in the file's order) not in `known`, or None. Not sorted: YAML
    keys may be of several types (a number, a date, null), which do not compare."""
    return next((key for key in mapping if key not in known), None)


def _parse_step(raw, index: int, where: str) -> Step:
    if not isinstance(raw, dict):
        raise FgdataError(f"recipe {where}: step {index} must be a mapping with name, stage and its inputs")
    name, stage = raw.get("name"), raw.get("stage")
    if not isinstance(name, str) or not _STEP_NAME.fullmatch(name):
        raise FgdataError(f"recipe {where}: step {index} needs a name of letters, digits, '-', '_' or '.' (it is the folder OUT/<name>), got {shown(name)}")
    if not isinstance(stage, str) or stage not in STEP_KINDS:  # a list or mapping is no dict key
        raise FgdataError(f"recipe {where}: step {name!r} has unknown stage {shown(stage)}; known stages: {', '.join(STEP_KINDS)}")
    kind = STEP_KINDS[stage]
    unknown = _first_unknown(raw, {"name", "stage", "set", *kind.inputs})
    if unknown is not None:
        raise FgdataError(f"recipe {where}: step {name!r} ({stage}) has unknown key {shown(unknown)}; it takes {', '.join(kind.inputs)} and set")
    inputs = {}
    for key in kind.inputs:
        value = raw.get(key)
        refs = tuple(value) if isinstance(value, list) and key in kind.many else (value,)
        if value is None or value == [] or not all(isinstance(ref, str) and ref for ref in refs):
            many = " (a step or a list of steps)" if key in kind.many else " (SOURCE or a step)"
            raise FgdataError(f"recipe {where}: step {name!r} ({stage}) is missing its input {key!r}{many}")
        inputs[key] = refs
    overrides = raw.get("set", [])
    if not isinstance(overrides, list) or not all(isinstance(item, str) and "=" in item for item in overrides):
        raise FgdataError(f"recipe {where}: step {name!r}: 'set' must be a list of key=value settings")
    return Step(name=name, stage=stage, inputs=inputs, overrides=tuple(overrides))


def _in_run_order(steps: list[Step], where: str) -> list[Step]:
    """The steps with each after the ones it reads (listed order where free); a cycle is an error.
    A depth-first walk with its own stack: a long chain of steps exhausted Python's."""
    by_name = {s.name: s for s in steps}
    ordered: list[Step] = []
    placed: set[str] = set()
    for step in steps:
        if step.name in placed:
            continue
        path = [step.name]  # the steps being visited, each reading the next
        unread = [iter(step.upstream())]  # per step on the path, the inputs not yet visited
        while path:
            ref = next(unread[-1], None)
            if ref is None:
                placed.add(path[-1])
                ordered.append(by_name[path.pop()])
                unread.pop()
            elif ref in path:
                loop = path[path.index(ref) :] + [ref]
                raise FgdataError(f"recipe {where}: the steps form a cycle: {' -> '.join(loop)}")
            elif ref not in placed:
                path.append(ref)
                unread.append(iter(by_name[ref].upstream()))
    return ordered
