"""`fgdata quality`: CLIP image-caption and region-phrase scores stored as columns, equal to what
transformers' CLIPModel gives for the same pictures and texts; the min_* floors; the report's
histograms and the audit's strata by score quartile."""

import json
import math
import statistics
from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE_IMAGES, assert_dataset_invariants, make_config, read_rows

from pipeline.config import QualityConfig
from pipeline.core.images import decode_rgb
from pipeline.core.schemas import conform
from pipeline.core.shards import list_shards, read_json, read_rejects
from pipeline.errors import FgdataError
from pipeline.models.tiny import build_tiny_clip
from pipeline.reports.audit import draw_sample, region_score_quartiles
from pipeline.reports.html import render_report
from pipeline.runner import run_stage
from pipeline.stages.fggrn.quality import QualityStage

CAPTIONS = {
    "astronaut": ("a person in a white suit", "a person in a white suit stands in front of a flag, holding a helmet in one arm"),
    "brick": ("a grey brick wall", None),
    "camera": ("a man with a camera", "a man in a dark coat looks through a camera on a tripod in a field"),
    "gone": ("no image for this one", None),
}
# (phrase, box in pixels): the last box of the astronaut holds no whole pixel, so it has no score
BOXES = {
    "astronaut": [("a person", [40.0, 10.0, 400.0, 500.0]), ("a flag", [300.5, 20.25, 480.0, 200.0]), ("a helmet", [5.0, 5.0, 5.5, 5.5])],
    "brick": [("a grey brick wall", [0.0, 0.0, 200.0, 120.0])],
    "camera": [("a man", [100.0, 30.0, 400.0, 500.0]), ("a camera", [150.0, 50.0, 300.0, 220.0])],
    "gone": [("a thing", [0.0, 0.0, 10.0, 10.0])],
}


def _region(caption: str, phrase: str, box: list[float], width: int, height: int, fggrn: bool) -> dict:
    start = max(caption.find(phrase), 0)
    region = {"phrase": phrase, "start": start, "end": start + len(phrase), "head": phrase.split()[-1], "box": box,
              "box_norm": [box[0] / width, box[1] / height, box[2] / width, box[3] / height], "score": 0.5}
    return {**region, "negatives": [], "negatives_flag": "ok"} if fggrn else region


def _rows(images: dict, fggrn: bool) -> list[dict]:
    rows = []
    for key, (short, long) in CAPTIONS.items():
        width, height = images[key].size if key in images else (640, 480)
        caption = long or short
        regions = [_region(caption, p, b, width, height, fggrn) for p, b in BOXES[key]]
        row = {"key": key, "short_caption": short, "long_caption": long, "phrase_source": "long_caption" if long else "short_caption",
               "width": width, "height": height, "regions": regions, "detector": "hand", "detector_is_random": False, "grounding": "{}"}
        if fggrn:
            row.update(negatives_backend="rules:test", nli_model="none", nli_is_random=False, negatives_settings="{}",
                       long_exprs=[f"{p} (released)" for p, _ in BOXES[key]])
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    texts = [t for pair in CAPTIONS.values() for t in pair if t] + [p for boxes in BOXES.values() for p, _ in boxes]
    clip = build_tiny_clip(root / "clip", texts * 5)
    stored = [{"key": k, "image": (SAMPLE_IMAGES / f"{k}.jpg").read_bytes(), "width": 1, "height": 1, "format": "JPEG", "short_caption": None, "source": "t"}
              for k in ("astronaut", "brick", "camera")]
    (root / "images").mkdir()
    pq.write_table(conform(stored, "images"), root / "images" / "part-00000.parquet")
    pictures = {r["key"]: decode_rgb(r["image"]) for r in stored}
    for kind in ("regions", "fggrn"):
        (root / kind).mkdir()
        pq.write_table(conform(_rows(pictures, kind == "fggrn"), kind), root / kind / "part-00000.parquet")
    scored = root / "scored"
    run_stage(QualityStage(root / "regions", root / "images"), scored, make_config(f"quality.model={clip}", "quality.batch_size=2"))
    return {"root": root, "clip": str(clip), "pictures": pictures, "scored": scored}


def _direct_similarity(clip: str, picture, text: str) -> float:
    """transformers' own CLIP computation: CLIPProcessor, CLIPModel, its normalised embeddings."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
    inputs = processor(text=[text], images=[picture], return_tensors="pt", padding=True, truncation=True, max_length=model.config.text_config.max_position_embeddings)
    with torch.no_grad():
        out = model(**inputs)
    return float((out.image_embeds * out.text_embeds).sum())


def test_scores_equal_transformers_clip_on_the_same_inputs(data):
    rows = {row["key"]: row for row in read_rows(data["scored"])}
    assert set(rows) == {"astronaut", "brick", "camera"}
    assert {(r["key"], r["reason"]) for r in read_rejects(data["scored"]).to_pylist()} == {("gone", "image_missing")}
    assert_dataset_invariants(data["scored"])
    for key, row in rows.items():
        picture = data["pictures"][key]
        short, long = CAPTIONS[key]
        assert row["short_caption_score"] == pytest.approx(_direct_similarity(data["clip"], picture, short), abs=1e-5)
        if long:  # a plain CLIP reads a long caption's first 77 tokens
            assert row["long_caption_score"] == pytest.approx(_direct_similarity(data["clip"], picture, long), abs=1e-5)
        else:
            assert row["long_caption_score"] is None
        assert len(row["region_clip_scores"]) == len(row["regions"]) == len(BOXES[key])
        for (phrase, box), region, score in zip(BOXES[key], row["regions"], row["region_clip_scores"]):
            assert region["phrase"] == phrase
            if phrase == "a helmet":
                assert score is None
            else:
                assert score == pytest.approx(_direct_similarity(data["clip"], picture.crop(tuple(box)), phrase), abs=1e-5)
        assert row["quality_model"] == data["clip"] and row["quality_model_is_random"] is True
    manifest = read_json(data["scored"] / "_manifest.json")
    assert manifest["kind"] == "regions" and manifest["provenance"]["random_weights"] == [True]
    assert manifest["counters"]["regions_scored"] == 5 and manifest["counters"]["regions_unscorable"] == 1


def test_floors_reject_exactly_the_rows_and_regions_below(data, tmp_path):
    scored = {row["key"]: row for row in read_rows(data["scored"])}
    short = {k: r["short_caption_score"] for k, r in scored.items()}
    regions = {(k, i): s for k, r in scored.items() for i, s in enumerate(r["region_clip_scores"]) if s is not None}
    short_floor, region_floor = statistics.median(short.values()), statistics.median(regions.values())
    out = tmp_path / "floored"
    run_stage(QualityStage(data["root"] / "regions", data["root"] / "images"), out, make_config(
        # the batch size of the scores' run: a median score sits on its floor, and batching moves the last bit
        f"quality.model={data['clip']}", "quality.batch_size=2", f"quality.min_short_caption_score={short_floor}", f"quality.min_region_score={region_floor}"))
    assert_dataset_invariants(out)
    rejects = {r["key"]: r for r in read_rejects(out).to_pylist() if r["reason"] != "image_missing"}
    below = {k for k, s in short.items() if s < short_floor}
    assert set(rejects) == below and below
    for key in below:
        assert rejects[key]["reason"] == "low_short_caption_score"
        assert f"{short[key]:.4f}" in rejects[key]["detail"] and "quality.min_short_caption_score" in rejects[key]["detail"]
    kept_regions, dropped = set(), 0
    for row in read_rows(out):
        assert row["key"] not in below
        assert len(row["region_clip_scores"]) == len(row["regions"])
        for region, score in zip(row["regions"], row["region_clip_scores"]):
            index = [p for p, _ in BOXES[row["key"]]].index(region["phrase"])
            assert score is None or score >= region_floor
            kept_regions.add((row["key"], index))
        dropped += sum(1 for (k, _), s in regions.items() if k == row["key"] and s < region_floor)
    expected = {(k, i) for k in scored if k not in below for i in range(len(BOXES[k])) if regions.get((k, i), region_floor) >= region_floor}
    assert kept_regions == expected
    assert read_json(out / "_manifest.json")["counters"].get("dropped_low_region_score", 0) == dropped


def test_floors_are_off_by_default_and_checked():
    defaults = QualityConfig()
    assert (defaults.min_short_caption_score, defaults.min_long_caption_score, defaults.min_region_score) == (None, None, None)
    assert defaults.model == "openai/clip-vit-base-patch32"
    with pytest.raises(FgdataError, match="quality.min_region_score=1.5 is out of range"):
        make_config("quality.min_region_score=1.5")


def test_fggrn_in_fggrn_out_with_per_region_columns_kept_in_step(data, tmp_path):
    out = tmp_path / "fggrn-scored"
    run_stage(QualityStage(data["root"] / "fggrn", data["root"] / "images"), out, make_config(f"quality.model={data['clip']}", "quality.min_region_score=1"))
    assert read_json(out / "_manifest.json")["kind"] == "fggrn"
    for row in read_rows(out):  # a floor of 1 drops every scored region; the unscorable one stays with its long_expr
        assert [r["phrase"] for r in row["regions"]] == [p for p, _ in BOXES[row["key"]] if p == "a helmet"]
        assert row["long_exprs"] == [f"{r['phrase']} (released)" for r in row["regions"]]
        assert row["region_clip_scores"] == [None] * len(row["regions"])


def test_report_shows_the_score_histograms(data):
    page, summary = render_report(data["scored"])
    # 3 short captions, 2 long ones, 5 scored boxes (the pixel-less one has no score)
    for title, count in (("image-short caption CLIP score", 3), ("image-long caption CLIP score", 2), ("region-phrase CLIP score", 5)):
        assert f"<figcaption>{title} <span class=\"note\">(n={count})</span>" in page
    assert "box agreement IoU" not in page  # ground ran without agreement: no empty chart
    assert summary["random_weights"] and "quality_model_is_random" in page  # the random CLIP is named in the banner


def test_audit_strata_by_region_score_quartile(data, tmp_path):
    out = tmp_path / "fggrn-scored"
    fggrn = data["root"] / "fggrn-negatives"
    rows = [json.loads(json.dumps(r)) for r in pq.read_table(data["root"] / "fggrn").to_pylist()]
    for row in rows:
        for region in row["regions"]:
            region["negatives"] = [{"text": f"not {region['phrase']}", "attribute": "colour", "entailment": 0.1, "contradiction": 0.8, "neutral": 0.1}]
    fggrn.mkdir()
    pq.write_table(conform(rows, "fggrn"), fggrn / "part-00000.parquet")
    run_stage(QualityStage(fggrn, data["root"] / "images"), out, make_config(f"quality.model={data['clip']}"))
    _, items, strata = draw_sample(out, n=50)
    scored = {(row["key"], region["phrase"]): score for row in read_rows(out) for region, score in zip(row["regions"], row["region_clip_scores"])}
    edges = statistics.quantiles([s for s in scored.values() if s is not None], n=4)  # 5 scores: the reservoir holds them all

    def quartile(score):
        return "unknown" if score is None else f"Q{sum(score >= edge for edge in edges) + 1}"

    expected = Counter(f"colour | rules:test | region score {quartile(score)}" for score in scored.values())
    assert {name: v["population"] for name, v in strata.items()} == dict(expected)
    assert len(expected) >= 4  # the quartiles and the unscorable box each a stratum
    for item in items:
        assert item["stratum"] == f"colour | rules:test | region score {quartile(scored[item['key'], item['positive']])}"
    assert region_score_quartiles(list_shards(fggrn), 0) is None  # quality never ran: no score strata


def test_boxes_without_a_sensible_crop_get_no_score():
    from PIL import Image

    from pipeline.stages.fggrn.quality import box_crop

    image = Image.new("RGB", (100, 80))
    for box in ([math.nan, 0, 10, 10], [0, 0, math.inf, 10], [50, 50, 10, 10], [0, 0, 0.5, 10], [0, 0, 2, 80], [0, 0, 10], None, ["a", 0, 1, 1]):
        assert box_crop(image, box) is None, box
    assert box_crop(image, [-20.0, -20.0, 30.0, 40.0]).size == (30, 40)  # cut to the image
    assert box_crop(image, [0, 0, 4, 80]).size == (4, 80)  # 20:1, the longest sliver scored
