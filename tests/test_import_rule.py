"""The package's import rule, read from the code (ast), so a new arrow against it fails here.

    cli -> runner -> stages/<recipe> -> stages/base -> {datasets, models, core} -> config -> errors
    train/, eval/ and reports/ use only datasets, models and core (and config, errors)
    a recipe never imports another recipe; nothing imports upward; no circles
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

# Layer of each area: an import may only point to a lower layer, or stay inside its own area.
LAYERS = {
    "errors": 0,
    "__init__": 0,
    "config": 1,
    "core": 2,
    "models": 3,
    "datasets": 3,
    "train": 4,
    "eval": 4,
    "reports": 4,
    "stages.base": 5,
    "stages.fggrn": 6,
    "stages.hierarcaps": 6,
    "runner": 7,
    "recipes": 8,
    "cli": 9,
}
MAX_TOP_LEVEL_MODULES = 8


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def area(module: str) -> str:
    """`pipeline.stages.fggrn.ground` -> `stages.fggrn`; `pipeline.core.shards` -> `core`."""
    parts = module.split(".")[1:] or ["__init__"]
    if parts[0] == "stages" and len(parts) > 1:
        return f"stages.{parts[1]}"
    return parts[0]


def imports_of(path: Path) -> set[str]:
    """Every pipeline module this file imports, at the top or inside a function."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] != "pipeline":
                continue
            for alias in node.names:  # `from pipeline.core import shards` names a module
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _is_module(candidate) else base)
    return found - {this}


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def rule_breaks(graph: dict[str, set[str]]) -> list[str]:
    breaks = []
    for source, targets in graph.items():
        for target in sorted(targets):
            a, b = area(source), area(target)
            if a == b or b == "__init__":
                continue
            if a not in LAYERS or b not in LAYERS:
                breaks.append(f"{source} -> {target}: {a if a not in LAYERS else b} has no layer in this test")
            elif LAYERS[b] >= LAYERS[a]:
                breaks.append(f"{source} -> {target}: {a} may not import {b}")
    return breaks


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def test_no_import_points_up_or_across_recipes():
    breaks = rule_breaks(import_graph())
    assert breaks == [], "imports against the rule:\n" + "\n".join(breaks)


def test_no_import_circles():
    found = circles(import_graph())
    assert found == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_top_of_the_package_stays_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"pipeline.core.shards": {"pipeline.stages.base"}}, "core may not import stages.base"),
        ({"pipeline.stages.fggrn.negatives": {"pipeline.stages.hierarcaps.filter"}}, "stages.fggrn may not import stages.hierarcaps"),
        ({"pipeline.train.loop": {"pipeline.eval.evaluate"}}, "train may not import eval"),
        ({"pipeline.models.owl": {"pipeline.datasets.chains"}}, "models may not import datasets"),
    ],
)
def test_the_rule_catches_a_wrong_arrow(graph, expected):
    assert any(expected in b for b in rule_breaks(graph))


def test_the_circle_check_catches_a_circle():
    graph = {"pipeline.models.a": {"pipeline.models.b"}, "pipeline.models.b": {"pipeline.models.c"}, "pipeline.models.c": {"pipeline.models.a"}}
    assert circles(graph) == [["pipeline.models.a", "pipeline.models.b", "pipeline.models.c", "pipeline.models.a"]]


def test_imports_inside_functions_count():
    assert "pipeline.runner" in import_graph()["pipeline.cli"]  # imported inside a command function
