"""Curation in the `fggrn` recipe: duplicates and NSFW images go between ingest and recaption, near-
duplicate captions are counted (never dropped), and the data card says which of these ran."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import yaml
from conftest import SAMPLE_IMAGES, make_config, read_rows
from test_dedup import image_row, photo, planted_variants, write_images

from pipeline.core.shards import read_json, read_rejects
from pipeline.recipes import Recipe, load_recipe
from pipeline.recipes.run import run_recipe
from pipeline.runner import run_stage
from pipeline.stages.fggrn.dedup import DedupStage, caption_near_repeats
from pipeline.stages.fggrn.screen import ScreenStage


class CleanDetector:
    model_id = "a detector that finds nothing"

    def detect(self, image):
        return []


class CleanScreen(ScreenStage):
    def load_model(self, config):
        return CleanDetector()


def test_near_repeats_counted_block_by_block_as_every_pair_would_count_them():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 8))
    vectors[1::3] = vectors[0::3] + rng.normal(scale=0.05, size=(100, 8))  # every third caption has a close twin
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    captions = [f"caption {i}" for i in range(300)]
    by_text = dict(zip(captions, vectors))
    embed = lambda texts: np.stack([by_text[t] for t in texts])  # noqa: E731
    similar = vectors @ vectors.T >= 0.95
    every_pair = sum(bool(similar[i, :i].any()) for i in range(300))
    assert every_pair >= 100
    assert caption_near_repeats(captions, embed, 0.95, block=7) == caption_near_repeats(captions, embed, 0.95) == every_pair
    # case and spacing repeats are one caption (counted as exact repeats elsewhere), empty ones none
    assert caption_near_repeats(["A  cat", "a cat", None, "", "a CAT "], embed, 0.5) == 0


CAPTIONS = {
    "astronaut": "A red bicycle leaning against a brick wall",
    "brick": "A red bicycle leaning against a brick wall.",  # near: punctuation only
    "camera": "A red bike leaning on a brick wall",  # near (cosine 0.96)
    "chelsea": "A RED bicycle   leaning against a brick wall",  # an exact repeat once case and spacing go
    "coffee": "Two cups of coffee on a wooden table",
    "horse": "A horse grazing in a green meadow",
}


def caption_dataset(folder):
    return write_images(folder, [[image_row(name, (SAMPLE_IMAGES / f"{name}.jpg").read_bytes(), caption) for name, caption in CAPTIONS.items()]])


def test_dedup_counts_near_duplicate_captions_with_minilm_and_drops_none(tmp_path):
    images = caption_dataset(tmp_path / "images")
    run_stage(DedupStage(images), tmp_path / "out", make_config())
    manifest = read_json(tmp_path / "out" / "_manifest.json")
    assert manifest["rows_out"] == len(CAPTIONS) and manifest["rows_rejected"] == 0
    assert manifest["counters"]["caption_near_repeats"] == 2 and manifest["counters"]["caption_exact_repeats"] == 1
    assert manifest["provenance"]["caption_similarity"] == ["sentence-transformers/all-MiniLM-L6-v2 cosine >= 0.95, within each shard"]
    # off: no count and no model named
    run_stage(DedupStage(images), tmp_path / "off", make_config("dedup.caption_similarity=0"))
    manifest = read_json(tmp_path / "off" / "_manifest.json")
    assert "caption_near_repeats" not in manifest["counters"] and "caption_similarity" not in manifest["provenance"]


def limitations(dataset) -> str:
    return (dataset / "DATACARD.md").read_text().split("## Known limitations", 1)[1]


def test_data_card_says_which_image_filters_ran_with_their_model_and_threshold(tmp_path):
    images = caption_dataset(tmp_path / "images")
    run_stage(DedupStage(images), tmp_path / "kept", make_config("dedup.caption_similarity=0", "dedup.max_distance=3", "dedup.bands=4"))
    run_stage(CleanScreen(tmp_path / "kept"), tmp_path / "screened", make_config("screen.nsfw_threshold=0.7"))
    raw = limitations(tmp_path / "kept").replace("\n", " ")  # a dataset written by dedup: deduplicated, not screened
    assert "pHash within Hamming distance 3" in raw and "No NSFW screening in the lineage" in raw
    assert "no content, NSFW or duplicate filtering" not in raw
    card = limitations(tmp_path / "screened")
    assert "with a detector that finds nothing:" in card and "at score >= 0.7" in card and "FEMALE_GENITALIA_EXPOSED" in card
    assert "Hamming distance 3" in card and "No duplicate filtering" not in card and "No NSFW screening" not in card


@pytest.mark.parametrize(
    ("screen_manifest", "dedup_manifest"),
    [
        ({"provenance": {"screen_model": {"a": 1}, "nsfw_rule": 5}}, {"config": {"dedup": "not a mapping"}}),
        ({"provenance": "not a mapping"}, {"config": {"dedup": {"max_distance": "4\n| x |"}}}),
        ({"provenance": {"screen_model": [None, "m|x\ny"], "nsfw_rule": []}}, {"config": None}),
        ({}, {"config": {"dedup": {"max_distance": None}}}),
    ],
)
def test_card_lines_from_damaged_manifests_say_unknown_and_keep_the_layout(tmp_path, screen_manifest, dedup_manifest):
    from pipeline.datasets.datacard import render_datacard

    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "_manifest.json").write_text(json.dumps({"stage": "dedup", "kind": "images", "inputs": [], **dedup_manifest}))
    manifest = {"stage": "screen", "kind": "images", "inputs": [{"path": str(tmp_path / "kept"), "stage": "dedup"}], **screen_manifest}
    lines = render_datacard(tmp_path / "screened", manifest).split("## Known limitations", 1)[1].strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("- ") for line in lines)  # a newline or pipe from a manifest breaks no line
    assert "`fgdata dedup`" in lines[1] and "`fgdata screen`" in lines[2] and "null" not in lines[1]


def test_bundled_recipe_removes_planted_duplicates_before_recaption(tmp_path):
    """The bundled recipe's first three steps on a source folder of photos and planted copies."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("astronaut", "horse", "coffee"):
        (source / f"{name}.jpg").write_bytes((SAMPLE_IMAGES / f"{name}.jpg").read_bytes())
        (source / f"{name}.txt").write_text(f"a photo of a {name}")
    for kind, data in planted_variants(photo("horse")).items():
        (source / f"horse-{kind}.{'png' if kind == 'png' else 'jpg'}").write_bytes(data)
    recipe = first_three_steps()
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"run": {"executor": "local", "progress": False}, "ingest": {"rows_per_shard": 3}}))
    run_recipe(recipe, source, tmp_path / "out", settings)
    assert sorted(row["key"] for row in read_rows(tmp_path / "out" / "screened")) == ["astronaut", "coffee", "horse"]
    assert {r["reason"] for r in read_rejects(tmp_path / "out" / "kept").to_pylist()} == {"duplicate"}
    card = limitations(tmp_path / "out" / "screened")
    assert "`fgdata dedup`" in card and "`fgdata screen`" in card and "nudenet" in card


def first_three_steps() -> Recipe:
    """The bundled fggrn recipe up to `screened` (recaption on needs a VLM)."""
    recipe = load_recipe("fggrn")
    assert [step.stage for step in recipe.steps[:3]] == ["ingest", "dedup", "screen"]
    return replace(recipe, steps=recipe.steps[:3])


@pytest.mark.slow
def test_bundled_recipe_curation_on_ray_streams_screen_after_the_whole_dedup(tmp_path, ray_session):
    """On Ray the scheduler plans dedup once ingest is whole, then screens its shards as they finish."""
    source = tmp_path / "source"
    source.mkdir()
    for path in sorted(SAMPLE_IMAGES.glob("*.jpg"))[:6]:
        (source / path.name).write_bytes(path.read_bytes())
    for kind, data in planted_variants(photo("astronaut")).items():
        (source / f"astronaut-{kind}.{'png' if kind == 'png' else 'jpg'}").write_bytes(data)
    recipe = first_three_steps()
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"run": {"progress": False}, "ingest": {"rows_per_shard": 3}}))
    run_recipe(recipe, source, tmp_path / "out", settings)
    kept = {row["key"] for row in read_rows(tmp_path / "out" / "screened")}
    assert not any("-" in key for key in kept) and "astronaut" in kept
    assert len(read_rejects(tmp_path / "out" / "kept")) == 5


def test_screen_actors_take_no_gpu_from_the_recipe_steps_after_it(tmp_path):
    """NudeNet runs on onnxruntime's CPU build: an actor holding a GPU would leave it idle while
    recaption, next in the recipe, waits for it."""
    pool = ScreenStage(tmp_path).pool(cluster_gpus=8, config=make_config())
    assert pool.gpus_per_actor == 0 and pool.actors == 1
    assert ScreenStage(tmp_path).pool(cluster_gpus=8, config=make_config("screen.num_actors=6")).actors == 6
