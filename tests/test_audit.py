"""`fgdata audit`: the sample is stratified, the page is driven for real in headless Chromium
(key events through the DevTools protocol), its verdicts score to the Wilson intervals computed
here, and the score lands in the manifest and data card. Hostile captions stay text."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from pipeline.core.schemas import conform
from pipeline.core.shards import MANIFEST_FILE, read_json, shard_name, write_json, write_shard
from pipeline.datasets.datacard import DATACARD_FILE
from pipeline.errors import FgdataError
from pipeline.reports.audit import CSP, draw_sample, picture_uri, read_verdicts, render_audit_page, score_verdicts, wilson_interval

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed and `make chromium` could not install it (needs root and apt)"
)
READY = "document.documentElement && document.documentElement.getAttribute('data-audit-ready') === '1'"
HOSTILE = "</script><script>window.pwned=1</script><img src=x onerror=window.pwned=2> & \"q\" 'q'"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    result = run_cli("synthetic-world", str(root), "--count", "30", "--seed", "5")
    assert result.returncode == 0, result.stderr
    return root


def _expected_wilson(k: int, n: int) -> tuple[float, float]:
    """Written from the formula (Wilson 1927), apart from the module's code."""
    z = 1.959963984540054
    p = k / n
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(n) / (n + z * z) * math.sqrt(p * (1 - p) + z * z / (4 * n))
    return centre - half, centre + half


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    NUL-separated JSON on fds 3 and 4), so no websocket package is needed."""

    def __init__(self, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        # Debian's /usr/bin/chromium is a shell wrapper that execs the browser: bash moves the pipe ends onto 3 and 4 for it
        self.process = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', "browser", *args],
                                        pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._next_id, self.session = b"", 0, None

    def send(self, method: str, session: bool = True, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chrome, 1 << 16)
                assert chunk, "chromium closed the DevTools pipe"
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(line)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]
        raise AssertionError(f"no reply to {method}")

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", session=False, url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", session=False, targetId=target, flatten=True)["sessionId"]
        self.wait_for(READY)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not self.evaluate(f"!!({expression})"):
            assert time.monotonic() < deadline, f"page never satisfied {expression}"
            time.sleep(0.05)

    def press(self, key: str) -> None:
        """A real key press: keyDown (with its text, as a keyboard sends it) then keyUp."""
        arrows = {"ArrowRight": 39, "ArrowLeft": 37}
        code, vk = (key, arrows[key]) if key in arrows else (f"Key{key.upper()}", ord(key.upper()))
        text = {"text": key} if len(key) == 1 else {}
        self.send("Input.dispatchKeyEvent", type="keyDown", key=key, code=code, windowsVirtualKeyCode=vk, **text)
        self.send("Input.dispatchKeyEvent", type="keyUp", key=key, code=code, windowsVirtualKeyCode=vk)

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            os.close(self._to_chrome)
            os.close(self._from_chrome)


@pytest.fixture
def browser(tmp_path):
    chrome = Browser(tmp_path / "profile")
    yield chrome
    chrome.close()


# --- sampling and scoring, no browser --------------------------------------------------------


def test_wilson_matches_the_formula_and_edges():
    for k, n in [(0, 10), (10, 10), (7, 9), (198, 200), (1, 1)]:
        assert wilson_interval(k, n) == pytest.approx(_expected_wilson(k, n), abs=1e-12)
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(200, 200)
    assert high == 1.0 and 0.98 < low < 0.99  # the interval a "100% valid" audit of 200 earns


def test_sample_is_stratified_by_attribute_and_backend(world):
    kind, items, strata = draw_sample(world / "fggrn", 30, seed=1)
    assert kind == "fggrn"
    # the world's negatives: 7 colour, 1 size, 2 pattern swaps per region, one backend
    assert set(strata) == {f"{a} | fgdata synthetic world v1" for a in ("colour", "size", "pattern")}
    counts = Counter(item["stratum"] for item in items)
    assert len(items) == 30 and counts == {s: 10 for s in strata}  # equal shares, not 21/3/6
    assert {s: v["sampled"] for s, v in strata.items()} == counts
    assert strata["colour | fgdata synthetic world v1"]["population"] == 7 * strata["size | fgdata synthetic world v1"]["population"]
    assert len({item["id"] for item in items}) == 30
    # a stratum smaller than its share gives the rest to the others
    _, items, strata = draw_sample(world / "fggrn", 300, seed=1)
    size_stratum = "size | fgdata synthetic world v1"
    assert strata[size_stratum]["sampled"] == strata[size_stratum]["population"] < 100
    assert len(items) == 300
    # the same seed draws the same sample
    assert [i["id"] for i in draw_sample(world / "fggrn", 30, seed=1)[1]] == [i["id"] for i in draw_sample(world / "fggrn", 30, seed=1)[1]]


def test_hierarcaps_sample_is_stratified_by_tier(world):
    kind, items, strata = draw_sample(world / "hierarcaps", 20, seed=0)
    assert kind == "hierarcaps" and set(strata) == {"tier 1", "tier 2", "tier 3", "tier 4"}
    assert Counter(i["stratum"] for i in items) == {s: 5 for s in strata}
    tier2 = next(i for i in items if i["tier"] == 2)
    assert tier2["parent"] == "shape" and tier2["positive"] in ("circle", "square", "triangle")


def test_picture_is_a_crop_with_the_box_drawn(world):
    rows = pq.read_table(world / "images" / "train" / shard_name(0), columns=["image"]).to_pylist()
    uri, note = picture_uri(rows[0]["image"], [10, 10, 30, 30])
    assert uri.startswith("data:image/png;base64,") and note == ""
    import base64
    import io

    from PIL import Image

    crop = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    magenta = sum(1 for p in crop.getdata() if p == (255, 0, 255))
    assert magenta > 1000  # a 3-pixel outline around a box scaled up to ~180 pixels
    whole, note = picture_uri(rows[0]["image"], [float("nan"), 0, 5, 5])
    assert "whole image" in note and whole
    assert picture_uri(b"not an image", [1, 1, 2, 2]) == (None, "image does not decode")


def test_bad_verdict_files_are_one_line_errors(tmp_path):
    cases = {
        "not json": "{", "a list": "[]", "wrong format": '{"fgdata_audit": 9, "items": []}',
        "bad verdict": '{"fgdata_audit": 1, "items": [{"id": "a", "stratum": "s", "verdict": "maybe"}]}',
        "duplicate": '{"fgdata_audit": 1, "items": [{"id": "a", "stratum": "s", "verdict": "valid"}, {"id": "a", "stratum": "s", "verdict": "valid"}]}',
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(FgdataError) as error:
            read_verdicts(path)
        assert "\n" not in str(error.value), name
    with pytest.raises(FgdataError, match="no item is judged"):
        score_verdicts({"items": [{"id": "a", "stratum": "s", "verdict": "unsure"}]})


# --- the page in a real browser --------------------------------------------------------------


@needs_chromium
def test_keyboard_verdicts_score_to_the_wilson_intervals(world, tmp_path, browser):
    dataset = world / "fggrn"
    page = tmp_path / "audit.html"
    result = run_cli("audit", "sample", str(dataset), "--n", "12", "--seed", "2", "--out", str(page))
    assert result.returncode == 0, result.stderr
    assert page.read_text().count("<section class='item'") == 12
    download_dir = tmp_path / "downloads"
    browser.send("Browser.setDownloadBehavior", session=False, behavior="allow", downloadPath=str(download_dir))
    browser.open(page.as_uri())
    items = browser.evaluate("Array.from(document.querySelectorAll('section.item')).map(e => [e.dataset.id, e.dataset.stratum])")
    assert browser.evaluate("document.querySelectorAll('section.item:not([hidden])').length") == 1

    # judge: v, v, i, u, then back one and overwrite the u with v, then forward past an item and judge i
    for key in ["v", "v", "i", "u", "ArrowLeft", "v", "ArrowRight", "i"]:
        browser.press(key)
    assert browser.evaluate("window.fgdataAudit.current()") == 6
    expected = {items[0][0]: "valid", items[1][0]: "valid", items[2][0]: "invalid", items[3][0]: "valid", items[5][0]: "invalid"}
    payload = browser.evaluate("window.fgdataAudit.verdicts()")
    got = {item["id"]: item["verdict"] for item in payload["items"]}
    assert {k: v for k, v in got.items() if v} == expected
    assert got[items[4][0]] is None and len(got) == 12
    assert browser.evaluate("document.documentElement.getAttribute('data-errors')") == "0"

    # the verdicts survive a reload (localStorage), and the download link saves the same JSON
    browser.evaluate("window.beforeReload = true")
    browser.send("Page.reload")
    browser.wait_for(f"!window.beforeReload && {READY}")
    assert browser.evaluate("window.fgdataAudit.verdicts()")["items"] == payload["items"]
    browser.evaluate("document.getElementById('download').click()")
    deadline = time.monotonic() + 30
    while not list(download_dir.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    downloaded = list(download_dir.glob("*.json"))
    assert downloaded, "the download link saved nothing"
    verdicts = downloaded[0]
    assert json.loads(verdicts.read_text())["items"] == payload["items"]

    result = run_cli("audit", "score", str(verdicts))
    assert result.returncode == 0, result.stderr
    audit = read_json(dataset / MANIFEST_FILE)["audit"]
    by_stratum: dict[str, Counter] = {}
    for item_id, stratum in items:
        by_stratum.setdefault(stratum, Counter())[expected.get(item_id, "none")] += 1
    for stratum, counts in by_stratum.items():
        recorded = audit["strata"][stratum]
        judged = counts["valid"] + counts["invalid"]
        assert (recorded["valid"], recorded["invalid"]) == (counts["valid"], counts["invalid"])
        if judged:
            assert recorded["wilson95"] == pytest.approx(_expected_wilson(counts["valid"], judged), abs=1e-9)
            assert f"{recorded['valid_rate']:.3f}" in result.stdout
        else:
            assert recorded["wilson95"] is None
    assert (audit["valid"], audit["invalid"], audit["unsure"], audit["unjudged"]) == (3, 2, 0, 7)
    assert audit["wilson95"] == pytest.approx(_expected_wilson(3, 5), abs=1e-9)
    low, high = _expected_wilson(3, 5)
    assert f"0.600 [{low:.3f}, {high:.3f}]" in result.stdout
    assert '"valid_rate": 0.6' in (dataset / DATACARD_FILE).read_text()


def _hostile_fggrn(world: Path, tmp_path: Path) -> Path:
    rows = pq.read_table(world / "fggrn" / "train" / shard_name(0)).to_pylist()[:4]
    for row in rows:
        row["short_caption"] = row["long_caption"] = HOSTILE
        row["negatives_backend"] = HOSTILE
        for region in row["regions"]:
            region["phrase"] = HOSTILE
            for negative in region["negatives"]:
                negative["text"] = negative["attribute"] = HOSTILE
    rows[0]["regions"][0]["box"] = [float("nan"), 0.0, float("inf"), 5.0]
    out = tmp_path / "hostile"
    stats = {"shard": shard_name(0), "rows_in": 4, "rows_out": 4, "rows_rejected": 0, "counters": {}, "provenance": {}, "seconds": 0.0}
    write_shard(out, shard_name(0), conform(rows, "fggrn"), "fggrn", [], stats)
    write_json(out / MANIFEST_FILE, {"stage": "negatives", "kind": "fggrn", "inputs": [{"path": str(world / "images")}]})
    return out


@needs_chromium
def test_hostile_captions_stay_text_and_nothing_loads(world, tmp_path, browser):
    page_html, summary = render_audit_page(_hostile_fggrn(world, tmp_path), n=6)
    assert summary["images"] == 6 and CSP in page_html
    assert page_html.count("<script") == 2  # the metadata block and the page's own script, nothing from the data
    page = tmp_path / "hostile.html"
    page.write_text(page_html)
    browser.open(page.as_uri())
    assert browser.evaluate("document.querySelectorAll('script').length") == 2
    assert browser.evaluate("document.querySelectorAll('img').length") == 6  # only the crops, no injected <img>
    assert browser.evaluate("window.pwned === undefined")
    assert browser.evaluate("document.querySelector('section.item .neg').textContent") == HOSTILE
    # the stratum names (hostile here) reach the verdicts unchanged, through JSON in the page
    assert {i["stratum"] for i in browser.evaluate("window.fgdataAudit.verdicts()")["items"]} == {f"{HOSTILE} | {HOSTILE}"}
    browser.press("v")
    assert browser.evaluate("document.documentElement.getAttribute('data-errors')") == "0"


def test_score_cli_errors_are_one_line(world, tmp_path):
    verdicts = tmp_path / "v.json"
    verdicts.write_text(json.dumps({"fgdata_audit": 1, "kind": "hierarcaps", "dataset": str(world / "fggrn"),
                                    "items": [{"id": "a", "stratum": "tier 1", "verdict": "valid"}]}))
    result = run_cli("audit", "score", str(verdicts))
    assert result.returncode == 2 and "audits a 'hierarcaps' dataset" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("audit", "sample", str(world / "images"), "--out", str(tmp_path / "x.html"))
    assert result.returncode == 2 and "no negatives to audit" in result.stderr
    result = run_cli("audit", "sample", str(world / "fggrn"), "--n", "0", "--out", str(tmp_path / "x.html"))
    assert result.returncode == 2 and "--n must be between 1" in result.stderr and not (tmp_path / "x.html").exists()
