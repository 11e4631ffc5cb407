"""`fgdata audit` against hostile input: keys HTML rewrites, a verdicts file that lies about its
dataset, its items or its numbers, control characters in data printed on a terminal, and any
JSON or bytes at all as the verdicts file. Each ends in a score or a one-line error, exit 2."""

from __future__ import annotations

import html
import http.server
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_audit import READY, Browser, needs_chromium
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.schemas import conform
from pipeline.core.shards import MANIFEST_FILE, read_json, shard_name, write_json, write_shard
from pipeline.core.terminal import printable
from pipeline.datasets.synthetic_world import write_world
from pipeline.reports.audit import draw_sample, render_audit_page

# Keys HTML turns into one another in an attribute: CR LF and a lone CR become LF, NUL becomes U+FFFD.
MERGING_KEYS = ["dup\r\nkey", "dup\rkey", "dup\nkey", "nul\x00key", "nul\ufffdkey"]
# What a terminal must never receive from data: an OSC retitle, a colour, a CSI moving the cursor,
# a one-byte CSI, a bell, backspace, CR, and a right-to-left override.
TERMINAL_HOSTILE = "\x1b]0;owned\x07\x1b[31m\x1b[2J\x9b1A\x08\r\u202egood"
# A line break in data must not start a line of fgdata's own (here a fake "all clear").
FORGED_LINE = "\n  NOTE: audited, 100% valid"
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _unsafe(text: str) -> list[str]:
    return UNSAFE.findall(text)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, 12, seed=4)
    return root


def _write(out: Path, rows: list[dict], world: Path, rejects: list[dict] = ()) -> Path:
    stats = {"shard": shard_name(0), "rows_in": len(rows) + len(rejects), "rows_out": len(rows), "rows_rejected": len(rejects),
             "counters": {}, "provenance": {}, "seconds": 0.0}
    write_shard(out, shard_name(0), conform(rows, "fggrn"), "fggrn", list(rejects), stats)
    write_json(out / MANIFEST_FILE, {"stage": "negatives", "kind": "fggrn", "rows_in": stats["rows_in"], "rows_out": len(rows),
                                     "rows_rejected": len(rejects), "inputs": [{"path": str(world / "images")}]})
    return out


@pytest.fixture
def merging(world, tmp_path) -> Path:
    """An fggrn dataset of five rows whose keys differ only in CR/LF or NUL (one region, ten negatives each)."""
    rows = pq.read_table(world / "fggrn" / "train" / shard_name(0)).to_pylist()[: len(MERGING_KEYS)]
    for row, key in zip(rows, MERGING_KEYS):
        row["key"], row["regions"] = key, row["regions"][:1]
    return _write(tmp_path / "merging", rows, world)


@pytest.fixture
def terminal_hostile(world, tmp_path) -> Path:
    """An fggrn dataset whose attribute names (so stratum names), phrases and rejects hold terminal escapes."""
    rows = pq.read_table(world / "fggrn" / "train" / shard_name(0)).to_pylist()[:3]
    for row in rows:
        row["key"] = TERMINAL_HOSTILE + row["key"]
        for region in row["regions"]:
            region["phrase"] = TERMINAL_HOSTILE
            for negative in region["negatives"]:
                negative["attribute"] = TERMINAL_HOSTILE + negative["attribute"]
                negative["text"] = TERMINAL_HOSTILE
    rejects = [{"key": TERMINAL_HOSTILE, "reason": "bad_caption" + TERMINAL_HOSTILE, "detail": TERMINAL_HOSTILE + FORGED_LINE}]
    return _write(tmp_path / "terminal", rows, world, rejects)


def _page_verdicts(dataset: Path, n: int, seed: int = 0, verdict: str = "valid") -> dict:
    """The download of the page, as its script builds it from the DOM: ids and strata as HTML
    parsing leaves the attributes (CR LF and CR become LF, NUL becomes U+FFFD), every item judged."""
    page, _ = render_audit_page(dataset, n, seed)
    meta = json.loads(re.search(r"<script type='application/json' id='audit-meta'>(.*?)</script>", page).group(1))
    sections = re.findall(r"<section class='item' data-id='([^']*)' data-stratum='([^']*)'", page)

    def parsed(attribute: str) -> str:
        return html.unescape(attribute).replace("\r\n", "\n").replace("\r", "\n").replace("\0", "\ufffd")

    items = [{"id": parsed(i), "stratum": parsed(s), "verdict": verdict} for i, s in sections]
    return {"fgdata_audit": meta["format"], "sample_id": meta["sample_id"], "dataset": meta["dataset"], "kind": meta["kind"],
            "seed": meta["seed"], "strata": meta["strata"], **({"n": meta["n"]} if "n" in meta else {}), "items": items}


def _score(tmp_path: Path, payload, *args: str, name: str = "verdicts.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return run_cli("audit", "score", str(path), *args)


def _one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert not _unsafe(result.stderr), result.stderr


# --- 1. ids that survive HTML ------------------------------------------------------------------


def test_keys_html_rewrites_stay_apart_and_every_judgement_scores(merging, tmp_path):
    payload = _page_verdicts(merging, 100)
    assert len(payload["items"]) == 50
    assert len({item["id"] for item in payload["items"]}) == 50  # no two items share an id after HTML parsing
    result = _score(tmp_path, payload)
    assert result.returncode == 0, result.stderr
    audit = read_json(merging / MANIFEST_FILE)["audit"]
    assert (audit["valid"], audit["n"]) == (50, 50)


@needs_chromium
def test_keys_html_rewrites_stay_apart_in_chromium(merging, tmp_path):
    page = tmp_path / "audit.html"
    result = run_cli("audit", "sample", str(merging), "--n", "100", "--out", str(page))
    assert result.returncode == 0, result.stderr
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(page.as_uri())
        count = browser.evaluate("document.querySelectorAll('section.item').length")
        assert count == 50
        for index in range(count):
            browser.press("v" if index % 5 else "i")
        payload = browser.evaluate("window.fgdataAudit.verdicts()")
        assert browser.evaluate(READY) and browser.evaluate("document.documentElement.getAttribute('data-errors')") == "0"
    finally:
        browser.close()
    assert len({item["id"] for item in payload["items"]}) == 50
    result = _score(tmp_path, payload)
    assert result.returncode == 0, result.stderr
    audit = read_json(merging / MANIFEST_FILE)["audit"]
    assert (audit["valid"], audit["invalid"], audit["n"]) == (40, 10, 50)


# --- 2. the verdicts file decides nothing it should not ------------------------------------------


class _Counting(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - the handler's API
        self.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_a_dataset_on_an_unsupported_scheme_is_refused_and_never_fetched(world, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = _page_verdicts(world / "fggrn", 10)
        for dataset in [f"http://127.0.0.1:{server.server_port}/fggrn", "memory://fggrn", "ftp://127.0.0.1:1/x", "unknown://x/y"]:
            result = _score(tmp_path, {**base, "dataset": dataset})
            _one_line_error(result, "s3://, gs://, hf://")
        assert _Counting.requests == []
    finally:
        server.shutdown()


def test_verdicts_naming_another_dataset_leave_it_alone(world, tmp_path):
    other = tmp_path / "other"
    write_world(other, 12, seed=9)
    before = (other / "fggrn" / MANIFEST_FILE).read_bytes()
    payload = _page_verdicts(world / "fggrn", 10)
    result = _score(tmp_path, {**payload, "dataset": str(other / "fggrn")})
    _one_line_error(result, "is not in the sample")
    assert (other / "fggrn" / MANIFEST_FILE).read_bytes() == before


def test_forged_ids_and_numbers_are_refused_naming_the_first_bad_id(world, tmp_path):
    dataset = tmp_path / "fggrn"
    shutil.copytree(world / "fggrn", dataset)
    payload = _page_verdicts(dataset, 10)
    before = (dataset / MANIFEST_FILE).read_bytes()
    forged = {**payload, "items": [*payload["items"][:3], {"id": TERMINAL_HOSTILE, "stratum": "x", "verdict": "valid"}]}
    _one_line_error(_score(tmp_path, forged), printable(TERMINAL_HOSTILE), "is not in the sample")
    _one_line_error(_score(tmp_path, {**payload, "seed": 1}), "is not in the sample")  # another seed draws another sample
    _one_line_error(_score(tmp_path, {**payload, "n": 11}), "is not in the sample")
    assert (dataset / MANIFEST_FILE).read_bytes() == before
    # a file's strata and stratum names are not believed: the redrawn sample's are recorded
    lying = {**payload, "strata": {"x": {"population": 10**400, "sampled": 1}},
             "items": [{**item, "stratum": "made up"} for item in payload["items"]]}
    result = _score(tmp_path, lying)
    assert result.returncode == 0, result.stderr
    assert f"recording the audit in {dataset}" in result.stdout
    audit = read_json(dataset / MANIFEST_FILE)["audit"]
    assert set(audit["strata"]) == set(draw_sample(dataset, 10, 0)[2]) and "made up" not in audit["strata"]
    assert 0 < audit["weighted_valid_rate"] <= 1


# --- 3. terminal escapes -------------------------------------------------------------------------


def test_printable_escapes_what_a_terminal_obeys_and_keeps_the_rest():
    assert printable(TERMINAL_HOSTILE) == "\\x1b]0;owned\\x07\\x1b[31m\\x1b[2J\\x9b1A\\x08\\r\\u202egood"
    for code in [*range(0x20), *range(0x7F, 0xA0), 0x61C, 0x200E, 0x200F, *range(0x2028, 0x202F), *range(0x2066, 0x206A), 0xDC80]:
        shown = printable(f"a{chr(code)}b")
        assert shown.startswith("a\\") and shown.endswith("b") and len(shown) > 3, hex(code)
    plain = "Zürich café 東京 👩\u200d🔬 a\\b 'q' \"q\" [31m"
    assert printable(plain) == plain and printable(None) == "None" and printable(3) == "3"


def test_strata_and_info_print_no_terminal_escapes(terminal_hostile, tmp_path):
    payload = _page_verdicts(terminal_hostile, 30)
    result = _score(tmp_path, payload)
    assert result.returncode == 0, result.stderr
    assert printable(TERMINAL_HOSTILE)[:30] in result.stdout and not _unsafe(result.stdout + result.stderr), result.stdout
    result = run_cli("info", str(terminal_hostile))
    assert result.returncode == 0, result.stderr
    assert printable(TERMINAL_HOSTILE) in result.stdout and not _unsafe(result.stdout + result.stderr), result.stdout
    assert printable(FORGED_LINE) in result.stdout and FORGED_LINE not in result.stdout


def test_log_lines_escape_data(capsys):
    """The failure of a shard is logged with its error, which quotes keys and paths from data."""
    from pipeline.cli import _setup

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        _setup(None, None)
        logging.getLogger("fgdata").error("negatives: shard %s failed after retries: %s", "part-00000", TERMINAL_HOSTILE)
    finally:
        root.handlers[:], root.level = handlers, level
    logged = capsys.readouterr().err
    assert printable(TERMINAL_HOSTILE) in logged and not _unsafe(logged), logged


# --- 4. any verdicts file: a score or a one-line error -------------------------------------------

runner = CliRunner()


def _score_in_process(tmp_path: Path, data: bytes):
    """`audit score` of `data` in this process (a subprocess each would take minutes): an uncaught
    exception, which the command line would print as a traceback, is `result.exception` here."""
    path = tmp_path / "fuzz.json"
    path.write_bytes(data)
    result = runner.invoke(app, ["audit", "score", str(path)])
    assert result.exit_code in (0, 2), (result.exit_code, repr(result.exception), data[:300])
    assert result.exception is None or isinstance(result.exception, SystemExit), (repr(result.exception), data[:300])
    return result


HOSTILE_FILES = {
    "top level list": "[]", "top level string": '"x"', "top level number": "1e999", "empty": "", "not utf-8": b"\xff\xfe{",
    "deep lists": "[" * 100_000 + "]" * 100_000, "deep objects": '{"a":' * 100_000 + "1" + "}" * 100_000,
    "int of 5000 digits": '{"fgdata_audit": 1, "seed": ' + "9" * 5000 + ', "items": []}',
    "items not a list": '{"fgdata_audit": 1, "items": {"a": 1}}',
    "item not an object": '{"fgdata_audit": 1, "items": [1]}',
    "id not a string": '{"fgdata_audit": 1, "items": [{"id": [1], "stratum": "s", "verdict": "valid"}]}',
    "verdict nested 980 deep": '{"fgdata_audit": 1, "items": [{"id": "a", "verdict": ' + "[" * 980 + "]" * 980 + "}]}",
    "verdict not known": '{"fgdata_audit": 1, "items": [{"id": "a", "stratum": "s", "verdict": {"x": 1}}]}',
    "duplicate ids": '{"fgdata_audit": 1, "items": [{"id": "a", "stratum": "s", "verdict": "valid"}, {"id": "a", "stratum": "s", "verdict": null}]}',
    "format true": '{"fgdata_audit": true, "items": []}',
    "dataset not a string": '{"fgdata_audit": 1, "dataset": {"x": 1}, "items": []}',
    "dataset with NUL": '{"fgdata_audit": 1, "dataset": "a\\u0000b", "items": []}',
    "dataset name too long": '{"fgdata_audit": 1, "dataset": "' + "a" * 5000 + '", "items": []}',
    "dataset empty": '{"fgdata_audit": 1, "dataset": "", "items": []}',
}


def test_hostile_verdict_files_are_one_line_errors(world, tmp_path):
    dataset = tmp_path / "fggrn"
    shutil.copytree(world / "fggrn", dataset)
    files = dict(HOSTILE_FILES)
    good = _page_verdicts(dataset, 10)
    for name, value in {"seed string": "0", "seed bool": True, "seed float": 0.0, "seed huge": 10**400, "seed missing": None,
                        "n zero": 0, "n huge": 10**400, "n float": 1e308, "n string": "10", "kind list": ["fggrn"],
                        "strata string": "x", "strata huge population": {"s": {"population": 1e308}}}.items():
        field = name.split()[0]
        files[name] = json.dumps({**good, field: value} if value is not None else {k: v for k, v in good.items() if k != field})
    files["duplicate real ids"] = json.dumps({**good, "items": good["items"] + good["items"][:1]})
    ok = {"strata string", "strata huge population"}  # the file's strata are not used: the sample is redrawn
    for name, text in files.items():
        result = _score_in_process(tmp_path, text if isinstance(text, bytes) else text.encode())
        if name in ok:
            assert result.exit_code == 0, (name, result.output[-2000:])
        else:
            assert result.exit_code == 2 and result.stderr.count("\n") == 1 and len(result.stderr) < 600, (name, result.output[-2000:])


def test_a_giant_verdicts_file_is_refused_unread(tmp_path):
    giant = tmp_path / "giant.json"
    with giant.open("wb") as handle:
        handle.truncate(4 << 30)  # sparse: 4 GiB of NULs, nothing on disk
    result = run_cli("audit", "score", str(giant), timeout=60)
    _one_line_error(result, "larger than")


def test_a_fifo_as_verdicts_file_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    _one_line_error(run_cli("audit", "score", str(fifo), timeout=60), "not a file")


_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from([10**400, 1e308, -1, 0, 1])
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
# Where one arbitrary value goes into the real file: a top-level field, the first item's fields,
# a stratum's entry or its population (the page's own stratum name, so the lookup finds it).
_PLACES = [(name,) for name in ("fgdata_audit", "dataset", "kind", "seed", "n", "strata", "items", "sample_id")]
_PLACES += [("items", 0, name) for name in ("id", "stratum", "verdict")] + [("items", 0), ("strata", None), ("strata", None, "population")]


@pytest.fixture(scope="module")
def scored_world(world, tmp_path_factory) -> tuple[Path, dict]:
    dataset = tmp_path_factory.mktemp("scored") / "fggrn"
    shutil.copytree(world / "fggrn", dataset)
    return dataset, _page_verdicts(dataset, 10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_any_bytes_score_or_fail_in_one_line(tmp_path, data):
    _score_in_process(tmp_path, data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(top=_json, place=st.sampled_from(_PLACES), value=_json)
def test_any_json_scores_or_fails_in_one_line(scored_world, tmp_path, top, place, value):
    _, good = scored_world
    _score_in_process(tmp_path, json.dumps(top).encode())
    # the real file with one value replaced by arbitrary JSON: the paths past the first checks
    payload = json.loads(json.dumps(good))
    *parents, last = [next(iter(good["strata"])) if part is None else part for part in place]
    target = payload
    for part in parents:
        target = target[part]
    target[last] = value
    _score_in_process(tmp_path, json.dumps(payload).encode())
