"""Recipes: a whole chain of stages as one command (`fgdata run fggrn SOURCE OUT`).

A recipe is a small YAML file: its `steps`, each a stage with its inputs (SOURCE, the command's
argument, or another step) and optional `set` overrides for that step alone. Step NAME writes
OUT/NAME/, a normal fgdata dataset the single-stage commands read. fggrn.yaml and hierarcaps.yaml
ship inside the package; any other path is read as the user's own recipe. Everything here is
checked before any work: unknown stages or keys, missing or unknown inputs, cycles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import read_yaml
from pipeline.errors import FgdataError

BUNDLED_DIR = Path(__file__).parent
SOURCE = "SOURCE"
# A step's name is a folder under OUT: no separators, no dot-files.
_STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class StepKind:
    """What a recipe step of one stage takes: its named inputs, which of them may list several
    datasets, and the settings an input stands for (e.g. generate's `model` is hierarcaps.generator)."""

    inputs: tuple[str, ...] = ("input",)
    many: tuple[str, ...] = ()
    settings: dict[str, str] = field(default_factory=dict)


STEP_KINDS = {
    "ingest": StepKind(),
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
    bundled = BUNDLED_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and bundled.is_file():
        return parse_recipe(read_yaml(bundled, what="recipe"), name_or_path, str(bundled))
    path = Path(name_or_path)
    if not path.exists() and path.suffix not in (".yaml", ".yml"):
        raise FgdataError(f"no recipe {name_or_path!r}: give one of {', '.join(bundled_recipes())} or the path of a recipe .yaml file")
    return parse_recipe(read_yaml(path, what="recipe"), path.stem, str(path))


def parse_recipe(data: dict, name: str, where: str) -> Recipe:
    unknown = sorted(set(data) - {"description", "steps"})
    if unknown:
        raise FgdataError(f"recipe {where}: unknown key {unknown[0]!r} (a recipe has description and steps)")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise FgdataError(f"recipe {where}: 'steps' must be a non-empty list of steps")
    steps = [_parse_step(raw, index, where) for index, raw in enumerate(raw_steps, 1)]
    names = [s.name for s in steps]
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated:
        raise FgdataError(f"recipe {where}: two steps are named {repeated!r}; each step writes OUT/<name>, so names must differ")
    for step in steps:
        for ref in step.upstream():
            if ref not in names:
                raise FgdataError(f"recipe {where}: step {step.name!r} reads {ref!r}, which is neither SOURCE nor a step ({', '.join(names)})")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise FgdataError(f"recipe {where}: 'description' must be text")
    return Recipe(name=name, description=description, steps=tuple(_in_run_order(steps, where)))


def _parse_step(raw, index: int, where: str) -> Step:
    if not isinstance(raw, dict):
        raise FgdataError(f"recipe {where}: step {index} must be a mapping with name, stage and its inputs")
    name, stage = raw.get("name"), raw.get("stage")
    if not isinstance(name, str) or not _STEP_NAME.fullmatch(name):
        raise FgdataError(f"recipe {where}: step {index} needs a name of letters, digits, '-', '_' or '.' (it is the folder OUT/<name>), got {name!r}")
    if stage not in STEP_KINDS:
        raise FgdataError(f"recipe {where}: step {name!r} has unknown stage {stage!r}; known stages: {', '.join(STEP_KINDS)}")
    kind = STEP_KINDS[stage]
    unknown = sorted(set(raw) - {"name", "stage", "set", *kind.inputs})
    if unknown:
        raise FgdataError(f"recipe {where}: step {name!r} ({stage}) has unknown key {unknown[0]!r}; it takes {', '.join(kind.inputs)} and set")
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
    """The steps with each after the ones it reads (listed order where free); a cycle is an error."""
    by_name = {s.name: s for s in steps}
    ordered: list[Step] = []
    state: dict[str, str] = {}  # "visiting" while on the current path, "done" once placed

    def visit(step: Step, path: list[str]) -> None:
        if state.get(step.name) == "done":
            return
        if state.get(step.name) == "visiting":
            loop = path[path.index(step.name) :] + [step.name]
            raise FgdataError(f"recipe {where}: the steps form a cycle: {' -> '.join(loop)}")
        state[step.name] = "visiting"
        for ref in step.upstream():
            visit(by_name[ref], [*path, step.name])
        state[step.name] = "done"
        ordered.append(step)

    for step in steps:
        visit(step, [])
    return ordered
