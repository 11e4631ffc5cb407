"""`fgdata eval` scores as the references do (issue 19): FG-OVD against all of a box's negatives
(FG-CLIP's fgovd_eval.py), HierarCaps d_corr / precision / recall as hierarchical_retrieval.py
computes them, on files written here in the official layout (the reference's data is not bundled).

The metrics are pinned on a hand-made embedding geometry (a stub encoder), so every expected
number below is worked out by hand in the comments; one CLI run checks the whole path on a tiny
random CLIP."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from PIL import Image

from pipeline.errors import FgdataError
from pipeline.eval.evaluate import coco_id_in_url, coco_id_of_file, fgovd_accuracy, hierarcaps_items, hierarchy_metrics, parse_fgovd_record

# ---------------------------------------------------------------- a geometry worked out by hand
# Every text gets its own axis k; its embedding is cos(t) on axis 0 (the root, the empty text's
# embedding, is axis 0 itself) and sin(t) on axis k, so its radius |e - root| = 2 sin(t/2) grows
# with the angle t. An image's embedding weights text axes: its similarity to a text is
# sin(t) * weight. The radius sweep then offers, in turn, the texts with t <= 10, 20, 30, 40 degrees.

ANGLES = {  # chain -> the angle of each tier, tier 1 first
    "a": (10, 20, 30, 40),
    "b": (10, 20, 40, 30),  # tiers 3 and 4 swapped: argsort [0, 1, 3, 2], one inversion of 6, tau 2/3
    "c": (10, 20, 30, 40),
    "d": (20, 20, 10, 30),  # a tie: stable argsort [2, 0, 1, 3], two inversions, tau 1/3
}
TEXTS = [f"{chain}{tier}" for chain in ANGLES for tier in range(1, 5)]
ANGLE = {f"{chain}{tier + 1}": angle for chain, angles in ANGLES.items() for tier, angle in enumerate(angles)}
IMAGE_OF = {"a": 139, "b": 776, "c": 139, "d": 785}  # COCO ids: chains a and c describe one image
WEIGHTS = {
    # image 139 (chains a, c): t<=10 -> a1 (0.174); t<=20 -> b2 (0.9 sin 20 = 0.308);
    # t<=30 -> c3 (0.8 sin 30 = 0.4); all -> c3 again (a4: 0.5 sin 40 = 0.321).
    # retrieved {a1, b2, c3}: precision 2/3; tiers hit 1 (a1) and 3 (c3): recall 2/4
    139: {"a1": 1.0, "b2": 0.9, "c3": 0.8, "a4": 0.5},
    # image 776 (chain b): b1; b2 (0.308); a3 (0.5) beats b4 (0.95 sin 30 = 0.475); b3 (sin 40 = 0.643).
    # retrieved {b1, b2, a3, b3}: precision 3/4; tiers 1, 2, 3 hit: recall 3/4
    776: {"b1": 1.0, "b2": 0.9, "a3": 1.0, "b4": 0.95, "b3": 1.0},
    # image 785 (chain d): d3 (t = 10) at every level: precision 1/1, recall 1/4
    785: {"d3": 1.0},
}
PRECISION = (2 / 3 + 3 / 4 + 1) / 3  # 29/36, averaged over the 3 distinct images, not the 4 chains
RECALL = (2 / 4 + 3 / 4 + 1 / 4) / 3  # 1/2
D_CORR = (1 + 2 / 3 + 1 + 1 / 3) / 4  # 3/4 (tau-b of the tied radii themselves would give 0.18)


class StubEncoder:
    """Stands in for `Encoder`: hand-set text embeddings and image embeddings by file name."""

    def __init__(self):
        self.dim = 1 + len(TEXTS)

    def texts(self, texts: list[str], long: bool = False) -> torch.Tensor:
        rows = torch.zeros(len(texts), self.dim)
        for row, text in zip(rows, texts):
            if text == "":
                row[0] = 1.0
            else:
                angle = math.radians(ANGLE[text])
                row[0], row[1 + TEXTS.index(text)] = math.cos(angle), math.sin(angle)
        return rows

    def views(self, images: list[Path], upright: bool = True) -> torch.Tensor:
        rows = torch.zeros(len(images), self.dim)
        for row, image in zip(rows, images):
            for text, weight in WEIGHTS[coco_id_of_file(Path(image).name)].items():
                row[1 + TEXTS.index(text)] = weight
        return rows


def write_official(folder: Path, extra_rows: list[str] = ()) -> tuple[Path, Path]:
    """hierarcaps_test.csv (id,captions,image_url) and test_imgs/ as the reference ships them."""
    images = folder / "test_imgs"
    images.mkdir(parents=True)
    for number in sorted(set(IMAGE_OF.values())):
        Image.new("RGB", (40, 30), (number % 255, 20, 20)).save(images / f"COCO_val2014_{number:012d}.jpg")
    Image.new("RGB", (8, 8)).save(images / "no_number_here.jpg")  # not a COCO name: never matched
    lines = ["id,captions,image_url"]
    for number, chain in enumerate(ANGLES):
        tiers = " => ".join(f"{chain}{tier}" for tier in range(1, 5))
        lines.append(f'{number},"{tiers}",http://images.cocodataset.org/val2014/COCO_val2014_{IMAGE_OF[chain]:012d}.jpg')
    csv = folder / "hierarcaps_test.csv"
    csv.write_text("\n".join([*lines, *extra_rows]) + "\n")
    return csv, images


def test_hierarcaps_metrics_match_the_reference_definitions_on_a_hand_worked_case(tmp_path):
    csv, images = write_official(tmp_path)
    skipped = Counter()
    chains, files = hierarcaps_items([csv], 100, skipped, images)
    assert chains == [[f"{c}{t}" for t in range(1, 5)] for c in ANGLES] and not skipped
    assert [coco_id_of_file(f.name) for f in files] == [139, 776, 139, 785]
    result = hierarchy_metrics(StubEncoder(), chains, files)
    assert result["chains"] == 4 and result["images"] == 3 and result["radius_levels"] == 50
    assert result["d_corr"] == pytest.approx(D_CORR, abs=1e-6)
    assert result["hierarchical_precision"] == pytest.approx(PRECISION, abs=1e-6)
    assert result["hierarchical_recall"] == pytest.approx(RECALL, abs=1e-6)
    assert result["ordered_chains"] == pytest.approx(2 / 4)  # a and c; b swaps, d ties


def test_chains_are_paired_with_images_by_coco_id_and_the_others_counted_by_reason(tmp_path):
    extra = [
        '10,"x1 => x2 => x3 => x4",http://images.cocodataset.org/val2014/COCO_val2014_000000999999.jpg',  # no such file
        '11,"y1 => y2 => y3 => y4",http://example.com/picture.jpg',  # no _<digits> in the url
        '12,"z1 => z2 => z3",http://images.cocodataset.org/val2014/COCO_val2014_000000000139.jpg',  # 3 tiers
        '13,"w1 => w2 => w3 => w4",http://images.cocodataset.org/val2014/COCO_val2014_000000000555.jpg',  # an undecodable file
    ]
    csv, images = write_official(tmp_path, extra)
    (images / "COCO_val2014_000000000555.jpg").write_bytes(b"not a jpeg")
    skipped = Counter()
    chains, files = hierarcaps_items([csv], 100, skipped, images)
    assert len(chains) == len(files) == 4
    assert skipped == {"skipped_image_not_found": 1, "skipped_no_coco_id_in_image_url": 1, "skipped_wrong_tier_count": 1, "skipped_image_not_an_image": 1}
    # the reference's own pairing rules: the first `_<digits>` of the url, the last `_` part of a file name
    assert coco_id_in_url("http://images.cocodataset.org/val2014/COCO_val2014_000000301718.jpg") == 301718
    assert coco_id_of_file("COCO_val2014_000000000139.jpg") == 139 and coco_id_of_file("cat.jpg") is None
    with pytest.raises(FgdataError, match="not a folder"):
        hierarcaps_items([csv], 100, None, tmp_path / "nowhere")
    with pytest.raises(FgdataError, match="no usable chain"):
        hierarcaps_items([csv], 100, None, tmp_path)  # a folder without the test images: nothing pairs


def test_eval_cli_on_the_official_layout_reports_precision_recall_and_d_corr(tmp_path):
    from pipeline.models.tiny import build_tiny_clip

    csv, images = write_official(tmp_path)
    clip = build_tiny_clip(tmp_path / "clip", TEXTS * 3)
    result = run_cli("eval", "--model", str(clip), "--hierarcaps", str(csv), "--image-root", str(images), "--out", str(tmp_path / "eval.json"), timeout=180)
    assert result.returncode == 0, result.stderr[-1500:]
    saved = json.loads((tmp_path / "eval.json").read_text())["hierarcaps"]
    assert saved["chains"] == 4 and saved["images"] == 3 and saved["skipped"] == {}
    assert 0 <= saved["hierarchical_precision"] <= 1 and 0 <= saved["hierarchical_recall"] <= 1 and -1 <= saved["d_corr"] <= 1


# ---------------------------------------------------------------- FG-OVD: every negative counts

class TextStub:
    """Text embeddings on a 1-d line: a text's score against the box feature [1] is its number."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def texts(self, texts: list[str], long: bool = False) -> torch.Tensor:
        return torch.tensor([[self.scores[t]] for t in texts])


def test_fg_ovd_scores_each_box_against_all_its_negatives_with_ties_counting_right():
    scores = {"p1": 0.5, **{f"n1-{i}": 0.1 for i in range(11)}, "n1-11": 0.9,  # the 12th negative beats it
              "p2": 0.7, "n2-0": 0.2, "n2-1": 0.3, "n2-2": 0.1,  # only 3 negatives: the old code left it out
              "p3": 0.4, "n3-0": 0.4}  # a tie: right, as FG-CLIP's torch.equal(max, score[0])
    boxes = [([0, 0, 1, 1], "p1", [f"n1-{i}" for i in range(12)]), ([0, 0, 1, 1], "p2", ["n2-0", "n2-1", "n2-2"]),
             ([0, 0, 1, 1], "p3", ["n3-0"]), ([0, 0, 1, 1], "p4", [])]  # no negative: tests nothing, left out
    items, regions = [{"image": b"", "boxes": boxes}], [torch.ones(4, 1)]
    every = fgovd_accuracy(TextStub(scores), items, None, regions)
    assert every["boxes"] == 3 and every["accuracy"] == pytest.approx(2 / 3) and every["left_out_no_negatives"] == 1
    assert every["chance"] == pytest.approx((1 / 13 + 1 / 4 + 1 / 2) / 3)
    assert every["negatives_per_box"] == {"min": 1, "max": 12, "mean": pytest.approx(16 / 3)}
    capped = fgovd_accuracy(TextStub(scores), items, 10, regions)  # the optional cap: the first 10 only
    assert capped["boxes"] == 3 and capped["accuracy"] == 1.0


def test_a_pos_expression_list_competes_as_fg_clip_ranks_pos_plus_neg():
    line = json.dumps({"img_path": "a.jpg", "bbox": [1, 1, 5, 5], "pos_expression": ["a red car", "a blue car"], "neg_expression": ["a green car"]})
    record, problem = parse_fgovd_record(line)
    assert problem is None and record.positive == "a red car" and record.negatives == ("a blue car", "a green car")


def test_eval_cli_names_the_fg_ovd_file_it_scored_and_defaults_to_every_negative(tmp_path):
    from pipeline.models.tiny import build_tiny_clip

    Image.new("RGB", (60, 40), (90, 30, 30)).save(tmp_path / "a.png")
    negatives = [f"a shape {i}" for i in range(13)]
    lines = [{"img_path": "a.png", "bbox": [5, 5, 30, 20], "pos_expression": ["a red shape"], "neg_expression": negatives},
             {"img_path": "a.png", "bbox": [0, 0, 60, 40], "pos_expression": ["a shape"], "neg_expression": negatives[:2]}]
    (tmp_path / "fg.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    clip = build_tiny_clip(tmp_path / "clip", ["a red shape 0 1 2 3 4 5 6 7 8 9"] * 5)
    result = run_cli("eval", "--model", str(clip), "--fg-ovd", str(tmp_path / "fg.jsonl"), "--out", str(tmp_path / "eval.json"), timeout=180)
    assert result.returncode == 0, result.stderr[-1500:]
    report = json.loads((tmp_path / "eval.json").read_text())["fg_ovd_benchmark"]
    assert report["file"] == str(tmp_path / "fg.jsonl") and report["boxes"] == report["lines"] == 2 and report["negatives_cap"] is None
    assert report["negatives_per_box"] == {"min": 2, "max": 13, "mean": 7.5}
