"""Hostile settings and recipe YAML: a --config file, a --set key=value, a recipe file and its steps'
`set:` entries. Whatever the text, `fgdata` ends with exit 0, or exit 2 and one short line, in
bounded time and memory; never a traceback."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE_IMAGES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import Config
from pipeline.errors import FgdataError
from pipeline.recipes import MAX_STEPS, STEP_KINDS, load_recipe, parse_recipe

runner = CliRunner()
# A generous bound for two shared CPUs: the worst 1 MiB file parses in about a second (libyaml);
# an alias bomb or a runaway recursion takes minutes or never ends.
SECONDS = 10.0
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def billion_laughs(levels: int, width: int = 10) -> str:
    """A flow list whose anchors expand to width**levels strings (9 levels: a few hundred bytes, 10**9 items)."""
    lines = ["[&l0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f", &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "".join(lines) + "]"


def invoke(*args: str):
    start = time.perf_counter()
    result = runner.invoke(app, list(args))
    return result, time.perf_counter() - start


def assert_clean_ending(result, seconds: float) -> None:
    """Exit 0, or exit 2 with one short `error:` line; no exception escaped, quickly."""
    assert seconds < SECONDS, f"took {seconds:.1f} s"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), result.output[-2000:]
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
        assert len(lines[0]) < 1000 and "\x1b" not in lines[0], lines[0][:2000]


def plan_settings_only(recipe, source, out, config_file, overrides, overwrite=False):
    """`run_recipe` reduced to what the recipe's text decides: each step's settings resolve."""
    from pipeline.config import load_config

    for step in recipe.steps:
        try:
            load_config(config_file, [*step.overrides, *overrides])
        except FgdataError as exc:
            raise FgdataError(f"step {step.name!r}: {exc}") from None
    return []


def run_recipe_text(text: str | bytes, plan_only: bool = True):
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        recipe = Path(folder) / "recipe.yaml"
        recipe.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        if plan_only:
            patch.setattr("pipeline.recipes.run.run_recipe", plan_settings_only)
        return invoke("run", str(recipe), str(SAMPLE_IMAGES), str(Path(folder) / "out"))


def config_file_text(text: str | bytes):
    with tempfile.NamedTemporaryFile(suffix=".yaml") as file:
        file.write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        file.flush()
        return invoke("config", "--config", file.name)


# --- anchors and aliases --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "surface",
    ["config file", "--set", "recipe set entry", "recipe file"],
)
def test_an_alias_bomb_is_refused_before_it_expands(surface):
    bomb = billion_laughs(9)  # 10**9 strings once expanded; 868 MB and a MemoryError traceback before
    assert len(bomb) < 600
    if surface == "config file":
        result, seconds = config_file_text(f"ingest:\n  formats: {bomb}\n")
    elif surface == "--set":
        result, seconds = invoke("config", "--set", f"ingest.formats={bomb}")
    elif surface == "recipe set entry":
        step = {"name": "images", "stage": "ingest", "input": "SOURCE", "set": [f"ingest.formats={bomb}"]}
        result, seconds = run_recipe_text(yaml.safe_dump({"steps": [step]}, width=10_000), plan_only=False)
    else:
        result, seconds = run_recipe_text(f"description: {bomb}\nsteps: []\n")
    assert_clean_ending(result, seconds)
    assert result.exit_code == 2 and "an alias (*name) repeats the value at line" in result.stderr
    if surface in ("--set", "recipe set entry"):
        assert "ingest.formats" in result.stderr
    if surface == "recipe set entry":
        assert "step 'images'" in result.stderr


def test_a_self_referencing_alias_is_refused():
    result, seconds = config_file_text("ingest: &a\n  formats: [JPEG]\n  nested: *a\n")
    assert_clean_ending(result, seconds)
    assert result.exit_code == 2 and "an alias (*name) repeats the value at line 1" in result.stderr


def test_a_merge_key_needs_no_alias_and_still_works():
    result, seconds = config_file_text("ingest:\n  <<: {rows_per_shard: 7}\n  min_side: 9\n")
    assert_clean_ending(result, seconds)
    assert yaml.safe_load(result.stdout)["ingest"]["rows_per_shard"] == 7


def test_a_star_in_a_set_value_is_still_text():
    """An alias needs an anchor, so `*.bin` is no alias; the value is the text as typed."""
    result, seconds = invoke("config", "--set", "hierarcaps.generator=*.bin")
    assert_clean_ending(result, seconds)
    assert yaml.safe_load(result.stdout)["hierarcaps"]["generator"] == "*.bin"


def test_a_key_given_twice_is_refused():
    """A second `ingest:` section used to replace the first one whole, silently."""
    result, seconds = config_file_text("ingest:\n  rows_per_shard: 5\nphrases:\n  batch_size: 4\ningest:\n  min_side: 9\n")
    assert_clean_ending(result, seconds)
    assert result.exit_code == 2 and "'ingest' appears twice" in result.stderr and "line 5" in result.stderr


# --- user values in messages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "surface, text",
    [
        ("config file", "ingest:\n  " + "k" * 100_000 + ": 1\n"),
        ("config file", "\x1b[31mred: 1\n"),
        ("config file", "ingest:\n  rows_per_shard: 5\n" + "x" * 50_000 + ": 1\n"),
        ("recipe file", "steps: []\n" + "z" * 100_000 + ": 1\n"),
        ("recipe file", "steps:\n- {name: a, stage: " + "s" * 100_000 + ", input: SOURCE}\n"),
        ("recipe file", "steps:\n- {name: a, stage: phrases, input: " + "r" * 100_000 + "}\n"),
        ("recipe file", "steps:\n- {name: a, stage: phrases, input: SOURCE, " + "q" * 100_000 + ": 1}\n"),
        ("recipe file", "steps:\n- {name: " + "n" * 100_000 + ", stage: phrases, input: SOURCE}\n"),
        ("--set", "k" * 100_000),
        ("--set", "ingest." + "f" * 100_000 + "=1"),
        ("--set", "\x1b[2J.x=1"),
    ],
)
def test_a_user_value_in_a_message_is_cut_short_and_escaped(surface, text):
    if surface == "config file":
        result, seconds = config_file_text(text)
    elif surface == "recipe file":
        result, seconds = run_recipe_text(text)
    else:
        result, seconds = invoke("config", "--set", text)
    assert_clean_ending(result, seconds)
    assert result.exit_code == 2 and len(result.stderr) < 600, result.stderr[:600]


@pytest.mark.parametrize(
    "text",
    [
        "steps: []\n1: x\nz: y\n",  # keys of two types: sorting them raised TypeError
        "steps:\n- {name: a, stage: phrases, input: SOURCE, 1: x, z: y}\n",
        "steps:\n- {name: a, stage: [phrases], input: SOURCE}\n",  # a list is no dict key: TypeError
        "steps:\n- {name: a, stage: {x: 1}, input: SOURCE}\n",
        "steps:\n- {name: a, stage: hierarcaps-distill, input: [[a]]}\n",
    ],
)
def test_odd_recipe_shapes_are_one_line_errors(text):
    result, seconds = run_recipe_text(text)
    assert_clean_ending(result, seconds)
    assert result.exit_code == 2


# --- long chains of steps -------------------------------------------------------------------------


def chain(length: int) -> list[dict]:
    """Step i reads step i+1, so every step is listed before the step it reads."""
    steps = [{"name": f"s{i}", "stage": "phrases", "input": f"s{i + 1}"} for i in range(length - 1)]
    return [*steps, {"name": f"s{length - 1}", "stage": "ingest", "input": "SOURCE"}]


def test_a_recipe_of_thousands_of_steps_is_refused_without_recursion(tmp_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text(yaml.safe_dump({"steps": chain(3000)}))
    result, seconds = run_recipe_text(recipe.read_text())  # RecursionError traceback before
    assert_clean_ending(result, seconds)
    assert result.exit_code == 2 and f"at most {MAX_STEPS} steps" in result.stderr and "3000" in result.stderr


def test_the_longest_recipe_allowed_runs_in_order_and_a_long_cycle_is_named():
    steps = chain(MAX_STEPS)
    recipe = parse_recipe({"steps": steps}, "long", "long.yaml")
    assert [s.name for s in recipe.steps] == [f"s{i}" for i in reversed(range(MAX_STEPS))]
    steps[-1] = {"name": f"s{MAX_STEPS - 1}", "stage": "phrases", "input": "s0"}
    with pytest.raises(FgdataError, match=r"cycle: s0 -> s1 -> .* -> s199 -> s0$"):
        parse_recipe({"steps": steps}, "long", "long.yaml")


# --- each hostile input, named --------------------------------------------------------------------

HOSTILE = {
    "empty": "",
    "only a comment": "# nothing\n",
    "a BOM": "\ufeffingest:\n  rows_per_shard: 5\n",
    "tabs": "ingest:\n\trows_per_shard: 5\n",
    "NUL": "ingest:\n  rows_per_shard: 5\x00\n",
    "non-UTF-8 bytes": b"ingest:\n  rows_per_shard: 5 # \xff\xfe\n",
    "lone surrogate": "ingest:\n  spacy_model: \"\\ud800\"\n",
    "100,000 nested lists": "[" * 100_000,
    "100,000 nested mappings": "{a: " * 100_000,
    "700 nested block lists": "".join("  " * i + "-\n" for i in range(700)),
    "a 5,000-digit int": "ingest:\n  rows_per_shard: " + "9" * 5000 + "\n",
    "a 4,000-digit int": "ingest:\n  rows_per_shard: " + "9" * 4000 + "\n",
    "nan": "ground:\n  score_threshold: .nan\n",
    "inf": "ground:\n  score_threshold: .inf\n",
    "-inf where a count goes": "ingest:\n  rows_per_shard: -.inf\n",
    "1e999": "distill:\n  learning_rate: 1e999\n",
    "1e999 where a count goes": "ingest:\n  rows_per_shard: 1.0e+999\n",
    "a bool where a count goes": "ingest:\n  rows_per_shard: yes\n",
    "a list where a count goes": "ingest:\n  rows_per_shard: [1]\n",
    "a date": "ingest:\n  rows_per_shard: 2024-01-01\n",
    "a timestamp key": "2024-01-01: 1\n",
    "a null key": "~: 1\n",
    "a bool key": "yes: 1\n",
    "a float key": "1.5: 1\n",
    "a complex key": "? [a, b]\n: 1\n",
    "a mapping key": "? {a: b}\n: 1\n",
    "a section that is a number": "ingest: 5\n",
    "a section that is a list": "ingest: [1, 2]\n",
    "a dotted key": "ingest.rows_per_shard: 5\n",
    "a dotted key deeper": "ingest:\n  rows_per_shard.x: 5\n",
    "dunder section": "__class__:\n  x: 1\n",
    "dunder field": "ingest:\n  __dataclass_fields__: 1\n",
    "a method as a section": "to_dict:\n  x: 1\n",
    "a merge key": "ingest:\n  <<: {rows_per_shard: 5}\n",
    "a merge of a list": "ingest:\n  <<: [{rows_per_shard: 5}, {min_side: 3}]\n",
    "a bad merge": "ingest:\n  <<: 5\n",
    "python tag": "ingest: !!python/object/apply:os.system ['true']\n",
    "python name tag": "ingest: !!python/name:os.system\n",
    "binary tag": "ingest:\n  formats: !!binary aGVsbG8=\n",
    "binary key": "!!binary aGVsbG8=: 1\n",
    "custom tag": "ingest: !foo bar\n",
    "set tag": "ingest:\n  formats: !!set {a, b}\n",
    "omap tag": "ingest: !!omap [a: 1]\n",
    "a str tag on a number": "ingest:\n  rows_per_shard: !!str 5\n",
    "an int tag on text": "ingest:\n  rows_per_shard: !!int abc\n",
    "a float tag on text": "ingest:\n  rows_per_shard: !!float abc\n",
    "two documents": "ingest: {}\n---\nphrases: {}\n",
    "a directive": "%YAML 1.1\n---\ningest: {}\n",
    "a bad directive": "%YAML 9.9\n---\ningest: {}\n",
    "a top-level list": "- 1\n- 2\n",
    "a top-level string": "hello\n",
    "duplicate keys": "ingest: {}\ningest: {}\n",
    "an undefined alias": "ingest: *nothing\n",
    "control characters": "ingest:\n  \x07\x1b[2J: 1\n",
    "a line separator": "ingest:\n  rows_per_shard: 5\u2028\n",
    "CR line ends": "ingest:\r  rows_per_shard: 5\r",
    "a very long line": "ingest:\n  spacy_model: " + "a" * 900_000 + "\n",
    "a 30,000-item list": "ingest:\n  formats: [" + "a," * 30_000 + "]\n",
    "deep flow value": "ingest:\n  formats: " + "[" * 5000 + "]" * 5000 + "\n",
}
RECIPE_HOSTILE = {
    "steps a mapping": "steps: {a: 1}\n",
    "a step a list": "steps: [[1]]\n",
    "a step name a number": "steps:\n- {name: 5, stage: ingest, input: SOURCE}\n",
    "a step name with a slash": "steps:\n- {name: a/b, stage: ingest, input: SOURCE}\n",
    "a step name with a NUL": "steps:\n- {name: \"a\\0\", stage: ingest, input: SOURCE}\n",
    "input a mapping": "steps:\n- {name: a, stage: ingest, input: {x: 1}}\n",
    "input a list where one goes": "steps:\n- {name: a, stage: ingest, input: [SOURCE]}\n",
    "set a mapping": "steps:\n- {name: a, stage: ingest, input: SOURCE, set: {x: 1}}\n",
    "set items not text": "steps:\n- {name: a, stage: ingest, input: SOURCE, set: [1, [2]]}\n",
    "set with a bad key": "steps:\n- {name: a, stage: ingest, input: SOURCE, set: ['=1', 'x=1']}\n",
    "set with nan": "steps:\n- {name: a, stage: ingest, input: SOURCE, set: ['ground.score_threshold=.nan']}\n",
    "description a list": "description: [1]\nsteps:\n- {name: a, stage: ingest, input: SOURCE}\n",
    "a step reading itself": "steps:\n- {name: a, stage: phrases, input: a}\n",
    "many steps of one name": "steps:\n" + "- {name: a, stage: ingest, input: SOURCE}\n" * 150,
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_settings_file_ends_cleanly(name):
    result, seconds = config_file_text(HOSTILE[name])
    assert_clean_ending(result, seconds)


@pytest.mark.parametrize("name", [*HOSTILE, *RECIPE_HOSTILE])
def test_a_hostile_recipe_file_ends_cleanly(name):
    result, seconds = run_recipe_text({**HOSTILE, **RECIPE_HOSTILE}[name])
    assert_clean_ending(result, seconds)
    assert result.exit_code == 2


SET_HOSTILE = [
    "", "=", "=1", "ingest", "ingest.", ".rows_per_shard=1", "ingest.rows_per_shard", "ingest.rows_per_shard=",
    "ingest.rows_per_shard=" + "9" * 5000, "ingest.rows_per_shard=.inf", "ground.score_threshold=.nan",
    "distill.learning_rate=1e999", "ingest.rows_per_shard=[" + "[" * 100_000, "ingest.formats={a: " * 20_000,
    "ingest.formats=!!python/object/apply:os.system ['true']", "ingest.formats=!!binary aGVsbG8=", "ingest.formats=!foo x",
    "ingest.formats=&a [x]", "recaption.model=\x00", "recaption.model=\ud800", "recaption.model=\ufeffx",
    "recaption.model=a\nb", "recaption.model=\t", "__class__.x=1", "run.__init__=1", "to_dict.x=1",
    "ingest.rows_per_shard=1=2", "ingest.rows_per_shard=5\ningest.min_side=1", "ingest.rows_per_shard=--- 5\n--- 6",
]


@pytest.mark.parametrize("item", SET_HOSTILE, ids=range(len(SET_HOSTILE)))
def test_a_hostile_set_item_ends_cleanly(item):
    result, seconds = invoke("config", "--set", item)
    assert_clean_ending(result, seconds)


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom", "/proc/self/mem", "FOLDER", "a" * 300 + ".yaml", "/etc/hostname/x.yaml"])
def test_a_path_that_is_no_small_regular_file_is_refused_without_reading_it(path, tmp_path):
    path = str(tmp_path) if path == "FOLDER" else path  # ENAMETOOLONG and ENOTDIR raised OSError before
    for args in (["config", "--config", path], ["run", path, str(SAMPLE_IMAGES), str(tmp_path / "out")]):
        result, seconds = invoke(*args)
        assert_clean_ending(result, seconds)
        assert result.exit_code == 2 and not (tmp_path / "out").exists()


# --- property tests ---------------------------------------------------------------------------------

SECTIONS = [f.name for f in __import__("dataclasses").fields(Config)]
FIELDS = sorted({name for section in SECTIONS for name in getattr(Config(), section).__dataclass_fields__})
# Pieces of YAML that reach the loader's corners: anchors, aliases, merges, tags, directives,
# flow and block nesting, BOM, NUL, tabs, odd numbers; repeated up to 3,000 times each.
FRAGMENTS = ["&a ", "*a", "<<: ", "!!python/object:os.system ", "!!binary ", "!foo ", "!!set ", "!!int ", "? ", "[", "]", "{", "}",
             ": ", "- ", ", ", "\n", "  ", "\t", "\ufeff", "\x00", "\x1b", "---\n", "...\n", "%YAML 1.1\n", "|\n", ">\n", "'", '"',
             "#", "9" * 50, ".nan", ".inf", "1e999", "~", "yes", "ingest", "phrases", ".", "rows_per_shard", "formats", "steps",
             "name", "stage", "input", "set", "SOURCE", "a", "ingest.rows_per_shard=", "\\u0000", "\u2028"]
yamlish_text = st.lists(st.tuples(st.sampled_from(FRAGMENTS), st.integers(1, 3000)), min_size=1, max_size=8).map(
    lambda parts: "".join(fragment * count for fragment, count in parts)
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=40),
    st.sampled_from([*SECTIONS, *FIELDS, "SOURCE", *STEP_KINDS]),
)
structures = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from([*SECTIONS, *FIELDS]), st.text(max_size=20), st.integers()), children, max_size=5),
    ),
    max_leaves=30,
)
settings_like = st.dictionaries(
    st.sampled_from(SECTIONS), st.one_of(st.dictionaries(st.sampled_from(FIELDS), structures, max_size=4), structures), max_size=3
)
set_items = st.builds(
    lambda section, field, value: f"{section}.{field}={value}",
    st.one_of(st.sampled_from(SECTIONS), st.text(max_size=10)),
    st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)),
    st.one_of(st.text(max_size=200), yamlish_text, structures.map(lambda v: yaml.safe_dump(v, default_flow_style=True, sort_keys=False).strip())),
)
step_like = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["a", "b", "c"]), scalars), "stage": st.one_of(st.sampled_from(list(STEP_KINDS)), structures)},
    optional={
        "input": st.one_of(st.sampled_from(["SOURCE", "a", "b", "c"]), structures),
        "images": st.sampled_from(["SOURCE", "a", "b"]),
        "set": st.one_of(st.lists(set_items, max_size=3), structures),
        "extra": structures,
    },
)
# keys of mixed types (a number, null, text) beside the known ones
odd_keys = st.dictionaries(st.one_of(st.integers(), st.none(), st.booleans(), st.text(max_size=5)), structures, max_size=3)
recipe_like = st.builds(
    lambda known, odd: {**odd, **known},
    st.fixed_dictionaries({"steps": st.one_of(st.lists(st.builds(lambda step, odd: {**odd, **step}, step_like, odd_keys), max_size=4), structures)},
                          optional={"description": structures}),
    st.one_of(st.just({}), odd_keys),
)
chains = st.integers(1, 1000).map(lambda length: {"steps": chain(length)})
any_text = st.one_of(st.text(max_size=2000), yamlish_text)


def dumped(value) -> str:
    return yaml.safe_dump(value, allow_unicode=True, sort_keys=False)


@PROPERTY
@given(st.one_of(any_text, settings_like.map(dumped)))
def test_any_settings_file_ends_in_a_value_or_one_line(text):
    assert_clean_ending(*config_file_text(text))


@PROPERTY
@given(st.lists(st.one_of(set_items, st.text(max_size=100)), min_size=1, max_size=3))
def test_any_set_items_end_in_a_value_or_one_line(items):
    assert_clean_ending(*invoke("config", *[arg for item in items for arg in ("--set", item)]))


@PROPERTY
@given(st.one_of(any_text, recipe_like.map(dumped), chains.map(dumped)))
def test_any_recipe_file_ends_in_a_plan_or_one_line(text):
    assert_clean_ending(*run_recipe_text(text))


def test_the_bundled_recipes_still_load():
    assert [s.name for s in load_recipe("fggrn").steps][0] == "images"


def test_a_detector_architecture_file_is_read_as_settings_are(tmp_path):
    from pipeline.models.yolo_world import vet_detector

    architecture = tmp_path / "bomb.yaml"
    architecture.write_text(f"nc: 80\nbackbone: {billion_laughs(9)}\nhead: []\n")
    with pytest.raises(FgdataError, match=r"cannot read YOLO-World architecture .*an alias \(\*name\)"):
        vet_detector(str(architecture), trust=True, fetch=False)
