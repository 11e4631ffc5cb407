"""What a new user trips over (issue 30): a data card that names only the models that ran and
warns of every opened quality floor, numbered boxes with their labels listed below, a funnel that
counts a source folder, the random-weights banner on the audit page too, no Ray token warning on
a local run, a bounded ingest, and a rejects recipe that works with and without rejects."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_IMAGES, image_bytes, make_config, run_cli

from pipeline.config import Config
from pipeline.core.schemas import conform
from pipeline.core.shards import MANIFEST_FILE, read_json, shard_name, write_json
from pipeline.datasets.datacard import render_datacard
from pipeline.datasets.synthetic_world import write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, 12, seed=2)
    return root


def _manifest(stage: str, kind: str, overrides: dict[str, dict], provenance: dict, inputs: list[dict]) -> dict:
    """A manifest as the runner writes it: the whole config, with `overrides` per section."""
    config = Config().to_dict()
    for section, values in overrides.items():
        config[section].update(values)
    return {"stage": stage, "kind": kind, "config": config, "provenance": provenance, "inputs": inputs, "rows_in": 4, "rows_out": 4, "rows_rejected": 0}


def _grounded_then_negatives(tmp_path: Path, ground: dict, negatives: dict) -> tuple[Path, dict]:
    """ground (yolo_world) -> negatives (rules backend), manifests only."""
    regions = tmp_path / "regions"
    regions.mkdir()
    write_json(regions / MANIFEST_FILE, _manifest("ground", "regions", {"ground": ground}, {"detector": ["yolov8x-worldv2.pt"], "random_weights": [False]}, []))
    fggrn = tmp_path / "fggrn"
    fggrn.mkdir()
    provenance = {"negatives_backend": ["rules"], "nli_model": ["cross-encoder/nli-deberta-v3-base"], "random_weights": [False]}
    return fggrn, _manifest("negatives", "fggrn", {"negatives": {"backend": "rules", **negatives}}, provenance, [{"path": str(regions), "stage": "ground"}])


def _section_text(card: str, heading: str) -> str:
    return card.split(f"## {heading}\n")[1].split("\n## ")[0]


def test_card_lists_only_the_models_that_ran(tmp_path):
    fggrn, manifest = _grounded_then_negatives(tmp_path, {}, {})
    card = render_datacard(fggrn, manifest)
    models, sampling = _section_text(card, "Models (with revisions)"), _section_text(card, "Sampling")
    assert "Llama" not in card  # the LLM of the other negatives backends never ran
    assert "owlv2" not in models  # ground ran YOLO-World, not OWLv2
    assert "backend=rules" in models and "nli_model=cross-encoder/nli-deberta-v3-base" in models
    assert "detector=yolov8x-worldv2.pt" in models and "text_encoder=openai/clip-vit-base-patch32" in models
    assert "temperature" not in sampling and "top_p" not in sampling and "max_new_tokens" not in sampling
    # the same stage on an LLM backend lists its model and how it sampled
    (tmp_path / "llm").mkdir()
    llm_dataset, llm = _grounded_then_negatives(tmp_path / "llm", {}, {"backend": "vllm"})
    llm_card = render_datacard(llm_dataset, llm)
    assert "model=meta-llama/Llama-3.1-8B-Instruct" in _section_text(llm_card, "Models (with revisions)")
    assert "temperature=0.7" in _section_text(llm_card, "Sampling")


def test_card_names_the_agreement_detector_and_the_quality_model_only_when_they_ran(tmp_path):
    fggrn, manifest = _grounded_then_negatives(tmp_path, {}, {})
    assert "agreement_detector" not in render_datacard(fggrn, manifest)  # off: nothing to name
    (tmp_path / "agree").mkdir()
    agreed, agreed_manifest = _grounded_then_negatives(tmp_path / "agree", {"agreement_detector": "owlv2"}, {})
    assert "agreement_detector=owlv2" in _section_text(render_datacard(agreed, agreed_manifest), "Models (with revisions)")
    scored = tmp_path / "scored"
    scored.mkdir()
    quality = _manifest("quality", "fggrn", {}, {"random_weights": [False]}, [{"path": str(fggrn), "stage": "negatives"}])
    assert "model=openai/clip-vit-base-patch32" in _section_text(render_datacard(scored, quality), "Models (with revisions)")


def test_card_warns_of_every_opened_floor(tmp_path):
    fggrn, manifest = _grounded_then_negatives(tmp_path, {"score_threshold": 0.0}, {"min_contradiction": 0.0})
    card = render_datacard(fggrn, manifest)
    warning = card.split("\n\n")[2]  # right under the title line, before any section
    assert warning.startswith("> **OPENED QUALITY FLOORS**")
    assert "`ground.score_threshold=0.0` (default 0.3)" in warning
    assert "`negatives.min_contradiction=0.0` (default 0.5)" in warning
    assert "`ground.score_threshold=0.0` (default 0.3)" in _section_text(card, "Opened quality floors")


def test_card_at_default_floors_has_no_warning_and_hierarcaps_floors_count(tmp_path):
    fggrn, manifest = _grounded_then_negatives(tmp_path, {"score_threshold": 0.5}, {})  # raised, not opened
    card = render_datacard(fggrn, manifest)
    assert "OPENED QUALITY FLOORS" not in card
    assert "None: every quality floor" in _section_text(card, "Opened quality floors")
    chains = tmp_path / "chains"
    chains.mkdir()
    manifest = _manifest("hierarcaps-filter", "hierarcaps", {"hierarcaps": {"min_entailment": 0.0}}, {"nli_model": ["x"]}, [])
    card = render_datacard(chains, manifest)
    assert "`hierarcaps.min_entailment=0.0` (default 0.5)" in card.split("\n\n")[2]
    assert "Llama" not in card and "temperature" not in card  # the filter runs the NLI model only


def test_audit_page_shows_the_reports_random_weights_banner(world, tmp_path):
    from pipeline.reports.audit import render_audit_page
    from pipeline.reports.html import render_report

    dataset = tmp_path / "fggrn"
    shutil.copytree(world / "fggrn", dataset)
    assert "id='random-banner'" not in render_audit_page(dataset, n=4)[0]
    write_json(dataset / MANIFEST_FILE, {**read_json(dataset / MANIFEST_FILE), "provenance": {"random_weights": [True]}})
    report, audit = render_report(dataset)[0], render_audit_page(dataset, n=4)[0]
    banner = report.split("<div class='banner' id='random-banner'>")[1].split("</div>")[0]
    assert f"<div class='banner' id='random-banner'>{banner}</div>" in audit
    assert "RANDOM WEIGHTS" in banner and "do not train on it" in banner


def test_local_ray_start_drops_only_the_token_notice(monkeypatch):
    import ray
    from ray._private.authentication import authentication_token_setup as ray_auth

    from pipeline import runner

    def fake_init(**kwargs):  # what Ray 2.5x logs while starting a new local cluster, and another notice
        ray_auth._warn_token_auth_enabled()
        ray_auth.logger.warning("Token authentication is enabled but no token was found: another notice")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_auth.logger, "filters", [])  # each run of this test starts as a fresh process does
    notices = []
    handler = logging.Handler()
    handler.emit = lambda record: notices.append(record.getMessage())
    monkeypatch.setattr(ray_auth.logger, "handlers", [handler])  # Ray's loggers do not propagate to pytest's
    runner.ensure_ray(make_config().run)
    assert notices == ["Token authentication is enabled but no token was found: another notice"]


@pytest.mark.slow
def test_a_real_local_ray_start_prints_no_token_notice_and_keeps_authentication():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    code = ("import os, ray; from pipeline.runner import ensure_ray; from pipeline.config import load_config; "
            "ensure_ray(load_config(None, ['run.num_cpus=1']).run); print('mode', os.environ.get('RAY_AUTH_MODE')); ray.shutdown()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Token authentication" not in result.stdout + result.stderr
    assert "mode token" in result.stdout


def test_boxes_carry_numbers_and_their_labels_are_listed_below(world, tmp_path):
    from pipeline.reports.html import boxes_svg, render_report

    same_corner = [{"phrase": f"phrase {i}", "score": 0.5 + i / 10, "box": [10, 10, 60 + 10 * i, 50 + 10 * i]} for i in range(3)]
    svg = boxes_svg(None, 200, 100, same_corner)
    badges = re.findall(r'<g class="badge"><rect x="([\d.]+)" y="([\d.]+)".*?>(\d+)</text></g>', svg)
    assert [number for _, _, number in badges] == ["1", "2", "3"]
    assert len({(x, y) for x, y, _ in badges}) == 3  # boxes sharing a corner: each number in its own place
    assert "phrase" not in svg  # no label on the picture

    dataset = tmp_path / "fggrn"
    shutil.copytree(world / "fggrn", dataset)
    rows = pq.read_table(dataset / "train" / shard_name(0)).to_pylist()
    rows[0]["regions"] = [{**rows[0]["regions"][0], "phrase": f"phrase {i}", "score": 0.5 + i / 10, "box": [1.0, 1.0, 30.0 + i, 30.0 + i]} for i in range(3)]
    pq.write_table(conform(rows, "fggrn"), dataset / "train" / shard_name(0))
    page = render_report(dataset, gallery=30)[0]
    card = page.split(f"<b>{rows[0]['key']}</b>")[1].split("<div class='card'>")[0]
    for i in range(3):
        assert f"<div><b>{i + 1}. phrase {i}</b> <span class='note'>score {0.5 + i / 10:.2f}</span></div>" in card
    assert card.count('<g class="badge">') == 3


def test_funnel_counts_a_source_folders_images_and_histograms_have_ticks(tmp_path):
    from pipeline.reports.html import render_report
    from pipeline.runner import run_stage
    from pipeline.stages.fggrn.ingest import IngestStage

    source = tmp_path / "photos"
    shutil.copytree(SAMPLE_IMAGES, source)
    run_stage(IngestStage(source), tmp_path / "images", make_config())
    page = render_report(tmp_path / "images")[0]
    funnel = page.split("<h2>Funnel</h2>")[1].split("<h2>")[0]
    source_row = next(row for row in funnel.split("<tr>") if str(source) in row)
    ingested = read_json(tmp_path / "images" / MANIFEST_FILE)["rows_in"]  # every image file is a row in, kept or rejected
    assert f"<td class='num'>{ingested} image files</td>" in source_row and "?" not in source_row
    charts = page.split("<h2>Histograms</h2>")[1].split("<h2>")[0]
    assert charts.count('class="tick"') >= 5  # the axis of each histogram is labelled


def test_the_readme_rejects_recipe_works_with_and_without_rejects(tmp_path):
    import datasets

    from pipeline.runner import run_stage
    from pipeline.stages.fggrn.ingest import IngestStage

    clean = tmp_path / "clean"
    clean.mkdir()
    for name in ("astronaut.jpg", "astronaut.txt", "brick.jpg", "brick.txt"):
        shutil.copyfile(SAMPLE_IMAGES / name, clean / name)
    run_stage(IngestStage(SAMPLE_IMAGES), tmp_path / "with", make_config())  # the two broken sample files are rejected
    run_stage(IngestStage(clean), tmp_path / "without", make_config())
    # the recipe the README and the data card give
    rejects = datasets.Dataset(pq.read_table(tmp_path / "with" / "_rejects"))
    assert sorted(rejects["reason"]) == ["decode_error", "not_an_image"] and all(rejects["detail"])
    none = datasets.Dataset(pq.read_table(tmp_path / "without" / "_rejects"))
    assert none.num_rows == 0 and none.column_names == ["key", "reason", "detail", "source"]
    # what the README said before: every output without rejects failed
    with pytest.raises(ValueError, match="corresponds to no data"):
        datasets.load_dataset("parquet", data_dir=str(tmp_path / "without" / "_rejects"))
    card = (tmp_path / "without" / "DATACARD.md").read_text()
    assert 'datasets.Dataset(pyarrow.parquet.read_table("_rejects"))' in card
    shown = run_cli("info", str(tmp_path / "without"))
    assert shown.returncode == 0 and "rejected: 0" in shown.stdout


def test_ingest_cuts_shards_at_max_shard_bytes(tmp_path):
    from pipeline.stages.fggrn.ingest import IngestStage

    sizes = [40_000, 40_000, 30_000, 150_000, 10_000, 10_000, 10_000]
    for index, size in enumerate(sizes):
        (tmp_path / f"img-{index}.jpg").write_bytes(image_bytes() + b"\0" * (size - len(image_bytes())))
    units = IngestStage(tmp_path).plan(make_config("ingest.max_shard_bytes=100000", "ingest.rows_per_shard=2"))
    assert [[int(item.key.split("-")[1]) for item in unit.payload] for unit in units] == [[0, 1], [2], [3], [4, 5], [6]]
    # a file over the bound is a shard of its own, never refused; under the default all 7 fit the row limit alone
    assert len(IngestStage(tmp_path).plan(make_config())) == 1


_INGEST_PEAK = """
import resource, sys
from pathlib import Path
from pipeline.config import load_config
from pipeline.stages.base import run_shard
from pipeline.stages.fggrn.ingest import IngestStage
config = load_config(None, ["run.progress=false"])
stage = IngestStage(Path(sys.argv[1]))
[unit] = stage.plan(config)
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run_shard(stage, unit, sys.argv[2], config)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - imported) * 1024)
"""


def test_each_ingested_byte_costs_a_worker_about_one_byte_not_six(tmp_path):
    from ingest_memory import make_images  # bench/, on the path through conftest

    held, data = [], []
    for count in (100, 300):  # the benchmark's resized sample photos, ~10 and ~30 MB
        source = tmp_path / f"photos-{count}"
        source.mkdir()
        data.append(make_images(source, count))
        done = subprocess.run([sys.executable, "-c", _INGEST_PEAK, str(source), str(tmp_path / f"out-{count}")], capture_output=True, text=True, timeout=300, check=True)
        held.append(int(done.stdout.split()[-1]))
    # what one more byte of images costs at the peak, past the allocators' fixed start-up: 6.3 bytes
    # when the rows' Python bytes were built into Arrow at the end (measured), 1.1 in batches
    per_byte = (held[1] - held[0]) / (data[1] - data[0])
    assert per_byte < 3, (per_byte, held, data)
