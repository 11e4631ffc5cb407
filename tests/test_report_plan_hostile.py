"""Hostile input for `fgdata report`'s page and `fgdata plan` (issue 26): 40k-char tokens on the page
(cut, and the page still renders in seconds in a real Chromium), histograms of degenerate values,
plan's numbers out of range, malformed `--from-runs` manifests, and GPU names that only look alike.
Each ends as a page, a plan or a one-line error (exit 2); never a traceback, a hang or invalid JSON."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from test_report_html import _page_errors, needs_chromium
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.recipes import load_recipe
from pipeline.core.schemas import conform
from pipeline.core.shards import MANIFEST_FILE, shard_name, write_json, write_shard
from pipeline.datasets.synthetic_world import write_world
from pipeline.reports.html import SHOWN_CHARS, _histogram, render_report, write_report
from pipeline.reports.plan import load_bench, plan

LONG = 40_000
# tokens with no break opportunity: plain letters, and one grapheme cluster of combining marks
# (Zalgo text, found in alt-text), whose layout time in Chromium grows with the square of its length
PLAIN_TOKEN = "a" * LONG
COMBINING_TOKEN = "a" + "\u0301" * (LONG - 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, 30, seed=3)
    return root


def _fggrn_with(world: Path, out: Path, change) -> Path:
    """world/fggrn's rows after `change(rows)`, as a dataset whose lineage holds the world's images."""
    rows = pq.read_table(world / "fggrn" / "train" / shard_name(0)).to_pylist()
    change(rows)
    stats = {"shard": shard_name(0), "rows_in": len(rows), "rows_out": len(rows), "rows_rejected": 0, "counters": {}, "provenance": {}, "seconds": 0.0}
    write_shard(out, shard_name(0), conform(rows, "fggrn"), "fggrn", [], stats)
    write_json(out / MANIFEST_FILE, {"stage": "negatives", "kind": "fggrn", "inputs": [{"path": str(world / "images")}], "rows_in": len(rows), "rows_out": len(rows), "rows_rejected": 0})
    return out


def _long_tokens(rows: list[dict]) -> None:
    rows[0]["short_caption"], rows[0]["long_caption"] = PLAIN_TOKEN, COMBINING_TOKEN
    rows[1]["long_caption"] = COMBINING_TOKEN
    for row in rows[2:6]:
        region = row["regions"][0]
        region["phrase"] = region["negatives"][0]["text"] = COMBINING_TOKEN
        region["negatives"][0]["attribute"] = PLAIN_TOKEN


def test_long_tokens_are_cut_with_their_full_length(world, tmp_path):
    page, _ = render_report(_fggrn_with(world, tmp_path / "long", _long_tokens), gallery=30)
    assert "a" * (SHOWN_CHARS + 1) not in page and "\u0301" * SHOWN_CHARS not in page
    assert page.count(f"… <span class='note'>({LONG:,} chars)</span>") == 3 + 4 * 3


@needs_chromium
def test_a_page_with_40k_char_tokens_renders_in_seconds(world, tmp_path):
    """Uncut, these tokens took Chromium tens of seconds to lay out (the combining cluster grows with
    the square of its length); cut, the page costs about what the same page without them costs."""
    timings = {}
    for name, change in (("plain", lambda rows: None), ("long", _long_tokens)):
        page = tmp_path / f"{name}.html"
        write_report(_fggrn_with(world, tmp_path / name, change), page, gallery=30)
        started = time.perf_counter()
        errors, uncaught = _page_errors(page, tmp_path / name)
        timings[name] = time.perf_counter() - started
        assert errors == "0" and not uncaught, uncaught
    assert timings["long"] < timings["plain"] + 4, timings


# ---------------------------------------------------------------- histograms of degenerate values


def _bar_counts(svg: str) -> list[int]:
    return [int(count) for count in re.findall(r"<title>[^<]*: (\d+)</title>", svg)]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.parametrize(
    "values",
    [
        [3.4e38] * 5,  # float32's largest, every score alike: the IndexError of issue 26
        [1e308] * 3,
        [-0.0, 0.0, -0.0],
        [2**70] * 3,
        [5e15, 5e15 + 2],  # integers past a float's half-unit: bins of width 1 do not exist there
        [-1e308, 1e308],  # the range itself overflows a float
        [5e-324, 0.0],
        [1.0, 1.0000000000000002],
        [2**63 - 1, 1, float("nan"), float("inf"), -math.inf],  # int64's largest beside what is no number
    ],
)
def test_histogram_of_degenerate_values_counts_every_finite_value(values):
    svg = _histogram("score", values)
    finite = sum(map(_finite, values))
    assert sum(_bar_counts(svg)) == finite and f"n={finite}" in svg
    assert "nan" not in svg.lower().replace("not finite", "")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.floats(), st.integers(-(2**63), 2**63 - 1), st.sampled_from([3.4e38, -0.0, 5e-324])), max_size=30))
def test_histogram_property(values):
    svg = _histogram("x", values)
    assert sum(_bar_counts(svg)) == sum(map(_finite, values))


def test_histogram_axis_has_ticks_between_min_and_max():
    svg = _histogram("words", [float(v) for v in range(101)])
    ticks = re.findall(r"<text class=\"tick\"[^>]*>([^<]*)</text>", svg)
    assert len(ticks) >= 4 and ticks[0] == "0" and ticks[-1] == "100", ticks
    assert "50" in ticks
    integers = re.findall(r"<text class=\"tick\"[^>]*>([^<]*)</text>", _histogram("boxes", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))
    assert integers[0] == "0" and integers[-1] == "10" and len(integers) >= 4, integers


def test_report_of_constant_huge_scores(world, tmp_path):
    def constant(rows):
        for row in rows:
            for region in row["regions"]:
                region["score"] = 3.4e38
                region["box_norm"] = [0.0, 0.0, 1.0, 1.0]

    page, _ = render_report(_fggrn_with(world, tmp_path / "constant", constant))
    assert "box score" in page and "3.4e+38" in page


# ---------------------------------------------------------------- plan: numbers and GPU names


def _invoke(*args: str):
    return CliRunner().invoke(app, ["plan", *args])


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (["fggrn", "--images", str(10**400)], "at most"),
        (["fggrn", "--images", str(10**30)], "at most"),
        (["fggrn", "--images", "-3"], "at least 1"),
        (["fggrn", "--images", "5", "--gpu", "h100", "--gpus", str(10**400)], "--gpus must be"),
        (["fggrn", "--images", "5", "--cpus", str(10**30)], "--cpus must be"),
        (["fggrn", "--images", "5", "--caption-chars", "inf"], "--caption-chars"),
        (["fggrn", "--images", "5", "--caption-chars", "1e400"], "--caption-chars"),
        (["fggrn", "--images", "5", "--gpu", ""], "names no GPU"),
        (["fggrn", "--images", "5", "--gpu", "  "], "names no GPU"),
        (["fggrn", "--images", "5", "--gpu", "nvidia"], "names no GPU"),
        (["fggrn", "--images", "5", "--gpu", "cpu"], "names no GPU"),
    ],
)
def test_plan_numbers_out_of_range_are_one_line_errors(args, message):
    result = _invoke(*args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def _recaption_record(folder: Path, gpu: str) -> None:
    folder.mkdir(exist_ok=True)
    record = {"benchmark": "recaption", "machine": {"cpus": 16, "gpu": gpu}, "images": 1000, "model": "Qwen2.5-VL-7B",
              "weights": "real weights", "stage_images_per_s": 8.0, "stage_actor_busy_images_per_s": 10.0}
    (folder / "recaption.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    "record_gpu, target, measured_ratio",
    [
        ("NVIDIA A100-SXM4-80GB", "a10", 0.6 / 2.0),  # a substring, not the same GPU: 3.3x too cheap before
        ("NVIDIA L40S", "l4", 0.3 / 0.86),
        ("NVIDIA A10", "a100", 2.0 / 0.6),
        ("NVIDIA H100 80GB HBM3", "H100", None),
        ("NVIDIA H100 80GB HBM3", "nvidia-h100", None),
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-x1", None),
        ("NVIDIA A100-SXM4-80GB", "A100 40GB", None),
        ("NVIDIA L4", "nvidia l4", None),
    ],
)
def test_a_gpu_record_is_measured_only_for_the_same_gpu(tmp_path, record_gpu, target, measured_ratio):
    _recaption_record(tmp_path, record_gpu)
    measures, startup = load_bench(tmp_path)
    recaption = plan(load_recipe("fggrn"), 1000, load_config(), gpu=target, measures=measures, startup=startup)["stages"][3]
    if measured_ratio is None:
        assert recaption["per_worker_per_s"] == pytest.approx(10.0) and "estimate" not in recaption["basis"]
    else:
        assert recaption["per_worker_per_s"] == pytest.approx(10.0 * measured_ratio)
        assert f"an estimate for {target}, from another GPU: extrapolated from {record_gpu}" in recaption["basis"]


# ---------------------------------------------------------------- plan --from-runs: hostile manifests

GOOD_RUN = {"stage": "ingest", "rows_in": 1000, "timings": {"shard_seconds": 4.0}, "machine": {"hostname": "box", "cpus": 8}}


def _manifest_text(**changes) -> str:
    return json.dumps({**GOOD_RUN, **changes})


def _timings(value: str) -> str:
    return _manifest_text(timings={"shard_seconds": 0}).replace('"shard_seconds": 0', f'"shard_seconds": {value}')


# (what the file holds, the error it stops plan with; None: the manifest is skipped with a warning)
HOSTILE_MANIFESTS = {
    "not json": (b"{oops", "is not a readable JSON record"),
    "not utf-8": (b'{"stage": "\xff"}', "is not a readable JSON record"),
    "a JSON list": (b"[1, 2]", "not a JSON object"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, "is not a readable JSON record"),
    "a 5000-digit number": (('{"rows_in": ' + "9" * 5000 + "}").encode(), "is not a readable JSON record"),
    "missing keys": (b'{"stage": "ingest"}', None),
    "rows_in a string": (_manifest_text(rows_in="1000").encode(), None),
    "timings a list": (_manifest_text(timings=[4.0]).encode(), None),
    "NaN seconds": (_timings("NaN").encode(), None),
    "Infinity seconds": (_timings("Infinity").encode(), None),
    "negative seconds": (_timings("-4.0").encode(), None),
    "rows_in past 10^15": (_manifest_text(rows_in=10**30).encode(), None),
    "rows_in a float": (_manifest_text(rows_in=1e308).encode(), None),
}


@pytest.mark.parametrize("name", HOSTILE_MANIFESTS)
def test_hostile_manifest_is_one_line_error_or_skipped_with_a_warning(tmp_path, caplog, name):
    content, error = HOSTILE_MANIFESTS[name]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / MANIFEST_FILE).write_bytes(content)
    result = _invoke("fggrn", "--images", "5000", "--from-runs", str(tmp_path), "--json")
    if error:
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert error in result.stderr and str(tmp_path / "run" / MANIFEST_FILE) in result.stderr and result.stderr.count("\n") == 1
    else:
        assert result.exit_code == 0, result.output
        bill = _strict_json(result.stdout)
        assert not any(stage["basis"].startswith("your run") for stage in bill["stages"])
        assert any(f"--from-runs: skipped {tmp_path / 'run' / MANIFEST_FILE}" in record.getMessage() for record in caplog.records)


def test_unusable_values_beside_a_measurement_keep_the_json_valid(tmp_path):
    """NaN where plan copies a value through (the version, the host, the GPU list) is not carried into the plan."""
    (tmp_path / "run").mkdir()
    text = _manifest_text(versions={"fgdata": 0}, machine={"hostname": 0, "ray_gpus": 1, "gpu_types": 5})
    (tmp_path / "run" / MANIFEST_FILE).write_text(text.replace('"fgdata": 0', '"fgdata": NaN').replace('"hostname": 0', '"hostname": Infinity'))
    result = _invoke("fggrn", "--images", "5000", "--from-runs", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    ingest = _strict_json(result.stdout)["stages"][0]
    assert ingest["basis"].startswith("your run, unknown machine") and ingest["settings"] == {"fgdata": None, "host": None}


def test_a_run_on_an_a100_is_an_estimate_for_an_a10(tmp_path):
    (tmp_path / "run").mkdir()
    manifest = {**GOOD_RUN, "stage": "recaption", "machine": {"ray_gpus": 1, "gpu_types": ["NVIDIA A100-SXM4-40GB"]}}
    (tmp_path / "run" / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = _invoke("fggrn", "--images", "5000", "--gpu", "a10", "--from-runs", str(tmp_path), "--json")
    recaption = _strict_json(result.stdout)["stages"][3]
    assert recaption["per_worker_per_s"] == pytest.approx(1000 / 4.0 * 0.6 / 2.0)
    assert recaption["basis"].startswith("your run") and "an estimate for a10, from another GPU" in recaption["basis"]


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_manifest_that_is_not_a_file_is_a_one_line_error_not_a_hang(tmp_path, kind):
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / MANIFEST_FILE
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    # a subprocess: reading a FIFO with no writer would block the test itself
    result = run_cli("plan", "fggrn", "--images", "5", "--from-runs", str(tmp_path), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr and f"{path} is not a file" in result.stderr


def test_a_skipped_manifest_is_a_warning_on_the_command_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / MANIFEST_FILE).write_text(_timings("NaN"))
    result = run_cli("plan", "fggrn", "--images", "5", "--from-runs", str(tmp_path), "--json")
    assert result.returncode == 0 and _strict_json(result.stdout)["rows"] == 5
    assert "--from-runs: skipped" in result.stderr and "shard_seconds" in result.stderr


# ---------------------------------------------------------------- plan, property-based

counts = st.one_of(
    st.integers(-(10**400), 10**400).map(str),
    st.floats().map(repr),
    st.sampled_from(["0", "1", "-1", "1e400", "nan", "inf", "12_000_000", "", " 5", "0x10"]),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=5))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
manifests = st.one_of(
    st.binary(max_size=40),
    json_values.map(lambda value: json.dumps(value)),
    st.fixed_dictionaries(
        {},
        optional={
            "stage": st.one_of(st.sampled_from(["ingest", "phrases", "recaption", "ground", "negatives"]), json_values),
            "rows_in": st.one_of(st.integers(-(10**20), 10**20), json_values),
            "timings": st.one_of(st.fixed_dictionaries({"shard_seconds": st.one_of(st.floats(), st.integers(-(10**20), 10**20), json_values)}), json_values),
            "machine": st.one_of(
                st.fixed_dictionaries({}, optional={"ray_gpus": json_values, "gpu_types": st.one_of(st.lists(st.sampled_from(["NVIDIA A100-SXM4-80GB", "NVIDIA L4", "", "cpu"])), json_values), "hostname": json_values}),
                json_values,
            ),
            "provenance": st.one_of(st.dictionaries(st.sampled_from(["model", "detector", "random_weights"]), json_values), json_values),
            "versions": json_values,
        },
    ).map(lambda value: json.dumps(value)),
)
plan_arguments = st.fixed_dictionaries(
    {"--images": counts},
    optional={"--gpu": st.one_of(st.sampled_from(["h100", "a10", "l4", "NVIDIA A100-SXM4-80GB", "nvidia-", ""]), st.text(max_size=6)), "--gpus": counts, "--cpus": counts, "--caption-chars": counts},
)


def plan_problem(arguments: dict[str, str], manifest: str | bytes) -> str | None:
    """What is wrong with `fgdata plan fggrn ... --from-runs <a folder holding this manifest> --json`: None
    when it prints valid JSON (exit 0) or refuses (exit 2) without a traceback."""
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        run.mkdir()
        (run / MANIFEST_FILE).write_bytes(manifest if isinstance(manifest, bytes) else manifest.encode("utf-8", "surrogatepass"))
        args = [part for option, value in arguments.items() for part in (option, value)]
        result = _invoke("fggrn", *args, "--from-runs", folder, "--json")
    if result.exit_code not in (0, 2) or not isinstance(result.exception, (SystemExit, type(None))):
        return f"exit {result.exit_code}: {result.exception!r}"
    if result.exit_code == 0:
        try:
            _strict_json(result.stdout)
        except ValueError as exc:
            return f"not valid JSON: {exc}"
    return None


@settings(max_examples=250, deadline=None)
@given(plan_arguments, manifests)
def test_plan_property_exit_0_or_2_and_valid_json(arguments, manifest):
    assert plan_problem(arguments, manifest) is None
