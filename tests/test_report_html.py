"""`fgdata report`: the page renders in a real headless Chromium with no console errors and its
pixels show the boxes; hostile captions stay text; funnel, rejects, banner, chains and sampling."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from PIL import Image

from pipeline.core.schemas import conform
from pipeline.core.shards import MANIFEST_FILE, read_json, shard_name, write_json, write_shard
from pipeline.datasets.synthetic_world import write_world
from pipeline.errors import FgdataError
from pipeline.reports.html import BOX_COLOUR, boxes_svg, render_report, write_report

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed and `make chromium` could not install it (needs root and apt)"
)
HOSTILE = "</text></svg><script>alert('x')</script><img src=x onerror=alert(1)> & \"quoted\" 'single'"


def _browser(page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *mode, page.as_uri(),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=180)


def _page_errors(page: Path, tmp_path: Path) -> tuple[str, str]:
    """(data-errors the page's own script counted, the console lines Chromium logged as uncaught)."""
    result = _browser(page, tmp_path / "profile-dom", "--dump-dom")
    assert 'data-report-ready="1"' in result.stdout, "the page did not finish loading"
    count = re.search(r'data-errors="(\d+)"', result.stdout).group(1)
    return count, "\n".join(line for line in result.stderr.splitlines() if "Uncaught" in line)


def _magenta_pixels(png: Path) -> int:
    target = tuple(int(BOX_COLOUR[i : i + 2], 16) for i in (1, 3, 5))
    image = Image.open(png).convert("RGB")
    return sum(1 for pixel in image.getdata() if all(abs(a - b) <= 40 for a, b in zip(pixel, target)))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, 30, seed=3)
    return root


def _set_manifest(dataset: Path, **fields) -> None:
    write_json(dataset / MANIFEST_FILE, {**read_json(dataset / MANIFEST_FILE), **fields})


@needs_chromium
def test_chromium_renders_the_boxes_without_console_errors(world, tmp_path):
    page = tmp_path / "report.html"
    write_report(world / "fggrn", page, gallery=3)
    drawn = page.read_text().count('class="box"')
    assert drawn >= 3
    shot = tmp_path / "shot.png"
    result = _browser(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,2600")
    assert shot.exists(), result.stderr[-2000:]
    magenta = _magenta_pixels(shot)
    # each box, however small, is a 3-pixel outline at least 60 pixels around once scaled up
    assert magenta >= 150 * drawn, (magenta, drawn)
    errors, uncaught = _page_errors(page, tmp_path)
    assert errors == "0" and not uncaught, uncaught

    # the same page without its boxes has none of that colour: the pixels above are the boxes
    plain = tmp_path / "plain.html"
    plain.write_text(page.read_text().replace(f'stroke="{BOX_COLOUR}"', 'stroke="none"'))
    _browser(plain, tmp_path / "profile2", f"--screenshot={tmp_path / 'plain.png'}", "--window-size=1400,2600")
    assert _magenta_pixels(tmp_path / "plain.png") < magenta / 20


@needs_chromium
def test_the_error_check_sees_a_broken_page(world, tmp_path):
    """The check is real: an injected script is blocked by the page's policy and a broken image is
    counted, so `data-errors="0"` above means the report raised none."""
    page = tmp_path / "report.html"
    write_report(world / "fggrn", page, gallery=1)
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("<body>", "<body><script>window.x = 1</script><img src='data:image/png;base64,AAAA'>", 1))
    errors, _ = _page_errors(broken, tmp_path)
    assert int(errors) >= 2


def _hostile_fggrn(world: Path, tmp_path: Path) -> Path:
    """An fggrn dataset over the world's images whose captions, phrases, negatives and keys are
    markup, with boxes that are NaN, infinite, reversed or far outside the image."""
    table = pq.read_table(world / "fggrn" / "train" / shard_name(0))
    rows = table.to_pylist()
    for row in rows[:5]:
        row["short_caption"] = row["long_caption"] = HOSTILE
        for region in row["regions"]:
            region["phrase"] = HOSTILE
            region["negatives"][0]["text"] = HOSTILE
            region["negatives"][0]["attribute"] = HOSTILE
    rows[0]["regions"][0]["box"] = [float("nan"), 0.0, float("inf"), 5.0]
    rows[1]["regions"][0]["box"] = [60.0, 60.0, 2.0, 2.0]
    rows[2]["regions"][0]["box"] = [-1e30, -1e30, 1e30, 1e30]
    out = tmp_path / "hostile"
    stats = {"shard": shard_name(0), "rows_in": len(rows), "rows_out": len(rows), "rows_rejected": 0, "counters": {}, "provenance": {}, "seconds": 0.0}
    write_shard(out, shard_name(0), conform(rows, "fggrn"), "fggrn", [], stats)
    write_json(out / MANIFEST_FILE, {"stage": "negatives", "kind": "fggrn", "inputs": [{"path": str(world / "images")}], "rows_in": len(rows), "rows_out": len(rows), "rows_rejected": 0})
    return out


def test_hostile_text_stays_text(world, tmp_path):
    page, _ = render_report(_hostile_fggrn(world, tmp_path), gallery=30)
    assert page.count("<script") == 1  # the page's own
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;/text&gt;&lt;/svg&gt;&lt;script&gt;alert(&#x27;x&#x27;)" in page
    assert "not drawable" in page  # the NaN box and the reversed one are listed, not drawn
    svgs = re.findall(r"<svg .*?</svg>", page, flags=re.S)
    assert all(svg.count("<svg") == 1 for svg in svgs)


@needs_chromium
def test_hostile_page_runs_nothing_in_chromium(world, tmp_path):
    page = tmp_path / "hostile.html"
    write_report(_hostile_fggrn(world, tmp_path), page, gallery=30)
    errors, uncaught = _page_errors(page, tmp_path)
    assert errors == "0" and not uncaught


def _with_rejects(world: Path, tmp_path: Path, random_weights: bool = False) -> Path:
    """world/fggrn with 4 more rows in, rejected for two reasons; the rejected keys are images."""
    out = tmp_path / "fggrn"
    shutil.copytree(world / "fggrn", out)
    rejects = [
        {"key": "world-000001", "reason": "no_region", "detail": "no phrase grounded above 0.3", "source": "x"},
        {"key": "world-000002", "reason": "no_region", "detail": "no phrase grounded above 0.3", "source": "x"},
        {"key": "world-000003", "reason": "no_region", "detail": "no phrase grounded above 0.3", "source": "x"},
        {"key": "world-000004", "reason": "bad_caption", "detail": HOSTILE, "source": "x"},
    ]
    (out / "_rejects").mkdir(exist_ok=True)
    pq.write_table(conform(rejects, "rejects"), out / "_rejects" / shard_name(0))
    _set_manifest(out, stage="negatives", rows_in=34, rows_out=30, rows_rejected=4, provenance={"random_weights": [random_weights]})
    return out


def test_funnel_and_rejects_by_reason_with_thumbnails(world, tmp_path):
    page, summary = render_report(_with_rejects(world, tmp_path), examples=2)
    assert summary["rows"] == 30
    funnel = page.split("<h2>Funnel</h2>")[1].split("<h2>")[0]
    assert "negatives" in funnel and "synthetic-world" in funnel and "11.8%" in funnel  # 4 of 34
    assert "no_region 3, bad_caption 1" in funnel
    rejects = page.split("<h2>Rejects by reason</h2>")[1].split("<h2>")[0]
    assert "<td>no_region</td><td class='num'>3</td>" in rejects
    assert rejects.count("world-00000") == 3  # two examples of no_region, one of bad_caption
    assert rejects.count('<img class="thumb"') == 3  # each example's image, from the images ancestor
    assert "&lt;script&gt;" in rejects and "<script>alert" not in rejects


def test_random_weight_banner(world, tmp_path):
    assert "id='random-banner'" not in render_report(world / "fggrn")[0]
    assert "id='random-banner'" in render_report(_with_rejects(world, tmp_path, random_weights=True))[0]
    # a row labelled random is enough, even when no manifest says so
    rows = pq.read_table(world / "fggrn" / "train" / shard_name(0)).to_pylist()
    rows[0]["detector_is_random"] = True
    labelled = tmp_path / "labelled"
    shutil.copytree(world / "fggrn", labelled)
    pq.write_table(conform(rows, "fggrn"), labelled / "train" / shard_name(0))
    page = render_report(labelled)[0]
    assert "id='random-banner'" in page and "1 sampled rows with detector_is_random" in page


def test_negatives_and_histograms(world):
    page, _ = render_report(world / "fggrn", gallery=2)
    assert "<th>attribute</th><th>ent</th><th>con</th><th>neu</th>" in page
    for title in ("boxes per image", "box area", "box score", "short caption length", "negatives per region", "attribute kinds"):
        assert title in page
    assert "All 30 rows are read" in page


def test_hierarcaps_chains_with_negatives_per_tier(world):
    page, _ = render_report(world / "hierarcaps", gallery=5)
    chains = page.split("<h2>Chains")[1]
    assert chains.count("<table class='chain'>") == 5
    assert chains.count("<td>negative</td><td>") == 5 and "<td>shape</td>" in chains
    assert "words in tier 4" in page


def test_boxes_svg_clips_and_skips():
    svg = boxes_svg(None, 100, 50, [{"phrase": "a", "score": 0.5, "box": [-10, 10, 500, 40]}, {"phrase": "b", "score": 0.1, "box": [1, 2, 3]}])
    assert 'x="0.0" y="10.0" width="100.0" height="30.0"' in svg
    assert "1 box(es) not drawable" in svg and "no image" in svg


def test_not_a_dataset_is_one_line_error(tmp_path):
    with pytest.raises(FgdataError, match="no _manifest.json"):
        render_report(tmp_path)
    result = run_cli("report", str(tmp_path), "--out", str(tmp_path / "r.html"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "no _manifest.json" in result.stderr


def test_hostile_manifests_give_a_page_or_one_line(world, tmp_path):
    dataset = tmp_path / "fggrn"
    shutil.copytree(world / "fggrn", dataset)
    _set_manifest(dataset, kind=["fggrn"])
    with pytest.raises(FgdataError, match="has no report"):
        render_report(dataset)
    # entries that are not objects, odd types, a NUL byte, and a loop back to the dataset itself
    lineage = [{"path": "nul\x00byte", "stage": 7}, {"path": 5}, "text", {"path": str(dataset), "stage": "<b>loop</b>"}, {"path": str(world / "images"), "stage": ["x"]}]
    _set_manifest(dataset, kind="fggrn", stage={"a": 1}, created_at="<i>", inputs=lineage, rows_in="many")
    page, summary = render_report(dataset)
    assert summary["rows"] == 30 and "<i>" not in page and "&lt;i&gt;" in page
    assert "nul\x00byte" in page and "<td class='num'>?</td>" in page
    assert page.count('<img class="thumb"') == 0 and page.count("<image href=") == 24  # thumbnails still found upstream


def test_cli_writes_the_report_and_refuses_to_replace_it(world, tmp_path):
    out = tmp_path / "r.html"
    result = run_cli("report", str(world / "fggrn"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text().startswith("<!DOCTYPE html>") and "30 rows" in result.stdout
    again = run_cli("report", str(world / "fggrn"), "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


def _million_rows(world: Path, root: Path, shards: int, rows_per_shard: int) -> Path:
    """A synthetic fggrn dataset of shards × rows_per_shard rows (the world's rows repeated), its
    image shards hard links of one real shard: no disk beyond one shard of each."""
    base = pq.read_table(world / "fggrn" / "train" / shard_name(0))
    table = pa.concat_tables([base] * (rows_per_shard // base.num_rows + 1)).slice(0, rows_per_shard)
    fggrn, images = root / "fggrn", root / "images"
    fggrn.mkdir(parents=True)
    images.mkdir()
    pq.write_table(table, fggrn / shard_name(0))
    for index in range(shards):
        if index:
            os.link(fggrn / shard_name(0), fggrn / shard_name(index))
        os.link(world / "images" / "train" / shard_name(0), images / shard_name(index))
    write_json(images / MANIFEST_FILE, {"stage": "ingest", "kind": "images", "inputs": []})
    total = shards * rows_per_shard
    write_json(fggrn / MANIFEST_FILE, {"stage": "negatives", "kind": "fggrn", "inputs": [{"path": str(images)}], "rows_in": total, "rows_out": total, "rows_rejected": 0})
    return fggrn


@pytest.mark.slow
@pytest.mark.parametrize("shards, rows_per_shard", [(100, 10_000), (1, 1_000_000)])
def test_a_million_rows_render_in_under_a_minute(world, tmp_path, shards, rows_per_shard):
    dataset = _million_rows(world, tmp_path, shards, rows_per_shard)
    started = time.perf_counter()
    summary = write_report(dataset, tmp_path / "r.html")
    seconds = time.perf_counter() - started
    print(f"report of {summary['rows']:,} rows ({shards} shard(s)): {seconds:.1f}s, sampled {summary['sampled']:,}")
    assert summary["rows"] == 1_000_000 and summary["sampled"] == 20_000
    assert seconds < 60
    assert "Sampled: histograms and examples come from 20,000 of 1,000,000 rows" in (tmp_path / "r.html").read_text()
