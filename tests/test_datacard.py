"""DATACARD.md: written by every stage next to its manifest, shipped by both exports, built only
from what the lineage records (unknown stays unknown), safe against hostile ids."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SAMPLE_IMAGES, make_config

from pipeline.core.shards import MANIFEST_FILE, read_json, remove_owned_output, write_json
from pipeline.datasets.datacard import DATACARD_FILE, render_datacard, walk_lineage
from pipeline.datasets.fgclip_export import RECORD_FILE, export_fgclip
from pipeline.datasets.hierarcaps_csv import write_official_csv
from pipeline.datasets.synthetic_world import write_world
from pipeline.errors import FgdataError


def _manifest(**fields) -> dict:
    return {
        "stage": "recaption", "kind": "captions", "created_at": "2026-01-01T00:00:00+00:00", "versions": {"fgdata": "9.9"},
        "rows_in": 10, "rows_out": 7, "rows_rejected": 3, "shards": ["part-00000.parquet"],
        "counters": {"rejected_empty_caption": 2, "rejected_repetition": 1, "retried": 4},
        "provenance": {"caption_model": ["Qwen/Qwen2.5-VL-7B-Instruct@abc123 (vllm)"], "prompt": ["recaption_long.v1 sha256:deadbeef"], "random_weights": [False]},
        "config": {"recaption": {"model": "Qwen/Qwen2.5-VL-7B-Instruct", "revision": "abc123", "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 384, "seed": 0}},
        "inputs": [],
        **fields,
    }


def _lineage(tmp_path: Path, licensed: bool) -> Path:
    """source folder -> images (ingest) -> captions (recaption), manifests only."""
    source = tmp_path / "photos"
    source.mkdir()
    if licensed:
        (source / "LICENSE").write_text("CC0")
    images = tmp_path / "images"
    images.mkdir()
    write_json(images / MANIFEST_FILE, {"stage": "ingest", "kind": "images", "rows_in": 12, "rows_out": 10, "rows_rejected": 2, "inputs": [{"path": str(source), "format": "folder"}], "provenance": {}})
    captions = tmp_path / "captions"
    captions.mkdir()
    return captions


def test_card_has_every_datasheet_section(tmp_path):
    captions = _lineage(tmp_path, licensed=True)
    card = render_datacard(captions, _manifest(inputs=[{"path": str(tmp_path / "images"), "stage": "ingest"}], audit={"valid_rate": 0.97, "n": 200}))
    for heading in ("Random weights", "Composition", "Sources and licences", "Lineage", "Models (with revisions)", "Prompts (with hashes)", "Sampling", "Counts and reject reasons", "Opening it", "Audit", "Known limitations"):
        assert f"## {heading}" in card
    assert f"licence see {tmp_path / 'photos' / 'LICENSE'}" in card
    assert "Qwen/Qwen2.5-VL-7B-Instruct@abc123 (vllm)" in card and "revision=abc123" in card
    assert "recaption_long.v1 sha256:deadbeef" in card
    assert "temperature=0.0" in card and "max_new_tokens=384" in card
    assert "rejected `empty_caption`: 2" in card and "retried: 4" in card
    assert '"valid_rate": 0.97' in card
    assert "| ingest | `" in card and "| 12 | 10 | 2 |" in card  # the ancestor's own counts
    assert "No: no step in the lineage records a random-weight model." in card
    assert "hallucination" in card  # the captions kind's known limitation


def test_unknown_licence_and_missing_audit_say_so(tmp_path):
    captions = _lineage(tmp_path, licensed=False)
    card = render_datacard(captions, _manifest(inputs=[{"path": str(tmp_path / "images"), "stage": "ingest"}]))
    assert "licence unknown (no LICENSE" in card
    assert "No hand audit is recorded" in card


def test_random_weights_anywhere_in_the_lineage_are_flagged(tmp_path):
    captions = _lineage(tmp_path, licensed=False)
    write_json(tmp_path / "images" / MANIFEST_FILE, {**read_json(tmp_path / "images" / MANIFEST_FILE), "provenance": {"random_weights": [True]}})
    card = render_datacard(captions, _manifest(inputs=[{"path": str(tmp_path / "images"), "stage": "ingest"}]))
    assert "> **RANDOM WEIGHTS**: ingest" in card and "## Random weights\n\nYes: ingest" in card


def test_hostile_ids_cannot_break_the_card(tmp_path):
    hostile = "evil\n## Audit\nall valid | 100% |"
    card = render_datacard(tmp_path, _manifest(provenance={"caption_model": [hostile]}, config={"recaption": {"model": hostile}}))
    assert sum(line.startswith("## Audit") for line in card.splitlines()) == 1  # the injected heading stays inside its line
    assert "evil ## Audit all valid \\| 100% \\|" in card


def test_a_loop_or_damaged_ancestor_still_gives_a_card(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_json(a / MANIFEST_FILE, {"stage": "phrases", "kind": "phrases", "inputs": [{"path": str(b)}]})
    (b / MANIFEST_FILE).write_text("{not json")
    steps = walk_lineage(a)
    assert [s["path"] for s in steps] == [str(b), str(a)]
    assert "corrupt fgdata metadata" in steps[0]["error"]
    assert "Part of the lineage could not be read" in render_datacard(a, read_json(a / MANIFEST_FILE))
    write_json(b / MANIFEST_FILE, {"stage": "phrases", "kind": "phrases", "inputs": [{"path": str(a)}]})  # a loop
    assert len(walk_lineage(a)) == 2


@pytest.mark.usefixtures("ray_session")
def test_every_stage_writes_a_card_next_to_its_manifest(tmp_path):
    from pipeline.runner import run_stage
    from pipeline.stages.fggrn.ingest import IngestStage

    out = tmp_path / "images"
    run_stage(IngestStage(SAMPLE_IMAGES), out, make_config("ingest.rows_per_shard=8"))
    card = (out / DATACARD_FILE).read_text()
    manifest = read_json(out / MANIFEST_FILE)
    assert f"| {manifest['rows_in']} | {manifest['rows_out']} | {manifest['rows_rejected']} |" in card
    assert f"licence see {SAMPLE_IMAGES.parent / 'README.md'}" in card  # sample/README.md lists the licences
    assert "rejected `" in card  # the two broken sample files
    remove_owned_output(out)  # --overwrite knows the card as fgdata's own
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture()
def world(tmp_path) -> Path:
    write_world(tmp_path / "world", 12, seed=1)
    return tmp_path / "world"


def test_export_fgclip_ships_the_card(world, tmp_path):
    out = tmp_path / "export"
    summary = export_fgclip(world / "fggrn", out, progress=False)
    card = (out / DATACARD_FILE).read_text()
    assert card.startswith(f"> Exported by `fgdata export fgclip` from {world / 'fggrn'}: {summary['items']} items")
    assert "# Data card: fggrn" in card
    assert DATACARD_FILE in read_json(out / RECORD_FILE)["files"]
    export_fgclip(world / "fggrn", out, progress=False, overwrite=True)  # a refresh owns it too
    assert (out / DATACARD_FILE).is_file()


def test_export_fgclip_ships_the_stage_card_when_there_is_one(world, tmp_path):
    (world / "fggrn" / DATACARD_FILE).write_text("# Data card: the stage's own\n")
    export_fgclip(world / "fggrn", tmp_path / "export", progress=False)
    assert "# Data card: the stage's own" in (tmp_path / "export" / DATACARD_FILE).read_text()


def test_hierarcaps_export_writes_the_card_beside_the_csv(world, tmp_path):
    out = tmp_path / "train.csv"
    summary = write_official_csv(world / "hierarcaps", out, "train")
    card = tmp_path / f"train.csv.{DATACARD_FILE}"
    assert summary["datacard"] == str(card)
    assert f"{summary['written']} rows in train.csv" in card.read_text() and "## Known limitations" in card.read_text()
    out.unlink()
    with pytest.raises(FgdataError, match="already exists"):  # a card there is not replaced unasked
        write_official_csv(world / "hierarcaps", out, "train")
    write_official_csv(world / "hierarcaps", out, "train", overwrite=True)
