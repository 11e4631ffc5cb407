"""Detector agreement in `fgdata ground` (ground.agreement_detector, GranD's vote): a box the filters
keep stays only where the other detector has a box for the same phrase at IoU >= ground.agreement_iou,
and that best IoU is recorded per box."""

import json
import statistics

import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE_IMAGES, assert_dataset_invariants, make_config, read_rows
from torchvision.ops import box_iou

from pipeline.config import GroundConfig
from pipeline.core.images import decode_rgb
from pipeline.core.schemas import conform
from pipeline.core.shards import read_json
from pipeline.errors import FgdataError
from pipeline.models.detection import Detection
from pipeline.models.registry import load_detector
from pipeline.models.tiny import build_tiny_clip_text, build_tiny_owlv2
from pipeline.runner import run_stage
from pipeline.stages.fggrn.ground import GroundStage, agreement

BOX = (0.0, 0.0, 10.0, 10.0)


def test_agreement_keeps_exactly_the_boxes_with_a_partner_at_the_threshold():
    main = [
        Detection(0, BOX, 0.9),  # partner (0, 0, 10, 5) for the same phrase: IoU 0.5 exactly
        Detection(0, (20.0, 20.0, 30.0, 30.0), 0.8),  # partner box elsewhere: IoU 0
        Detection(1, BOX, 0.7),  # the only box at this place is phrase 0's: another phrase does not vote
        Detection(2, (0.0, 0.0, 4.0, 4.0), 0.6),  # best of two partners: IoU 16/100 and 16/16
    ]
    partner = [
        Detection(0, (0.0, 0.0, 10.0, 5.0), 0.5), Detection(0, (50.0, 50.0, 60.0, 60.0), 0.5),
        Detection(2, (0.0, 0.0, 10.0, 10.0), 0.5), Detection(2, (0.0, 0.0, 4.0, 4.0), 0.1),
    ]
    kept, dropped = agreement(main, partner, 0.5)
    assert [(d, pytest.approx(iou)) for d, iou in kept] == [(main[0], 0.5), (main[3], 1.0)]
    assert dropped == 2
    kept, dropped = agreement(main, partner, 0.51)  # just above the first box's IoU
    assert [d for d, _ in kept] == [main[3]] and dropped == 3
    kept, dropped = agreement(main, [], 0.5)  # no partner box at all
    assert kept == [] and dropped == 4


def test_agreement_detector_must_be_the_other_backend(tmp_path):
    stage = GroundStage(tmp_path / "phrases", tmp_path)
    for value, setting in (("owlv2", "ground.backend=owlv2"), ("glip", "ground.backend=yolo_world")):
        with pytest.raises(FgdataError, match="ground.agreement_detector must be the other backend"):
            stage.check(make_config(setting, f"ground.agreement_detector={value}"))
    with pytest.raises(FgdataError, match="ground.agreement_iou=1.5 is out of range"):
        make_config("ground.agreement_iou=1.5")


@pytest.fixture(scope="module")
def grounding_input(tmp_path_factory):
    texts = [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")] * 10
    root = tmp_path_factory.mktemp("agreement")
    models = {"clip": build_tiny_clip_text(root / "clip-text", texts), "owl": build_tiny_owlv2(root / "owlv2", texts)}
    names = ["astronaut", "brick", "camera"]
    images = [{"key": n, "image": (SAMPLE_IMAGES / f"{n}.jpg").read_bytes(), "width": 1, "height": 1, "format": "JPEG", "short_caption": None, "source": "t"} for n in names]
    (root / "images").mkdir()
    pq.write_table(conform(images, "images"), root / "images" / "part-00000.parquet")
    caption = "a person next to a red cup and a grey wall"
    phrases = [{"text": t, "start": caption.index(t), "end": caption.index(t) + len(t), "head": t.split()[-1], "mentions": 1} for t in ("a person", "a red cup", "a grey wall")]
    rows = [{"key": n, "short_caption": caption, "long_caption": None, "phrase_source": "short_caption", "spacy_model": "x", "phrases": phrases} for n in names]
    (root / "phrases").mkdir()
    pq.write_table(conform(rows, "phrases"), root / "phrases" / "part-00000.parquet")
    return root, models


def test_both_tiny_detectors_through_ground_keep_exactly_the_agreeing_boxes(grounding_input, tmp_path):
    root, models = grounding_input
    settings = ["ground.detector=yolov8s-worldv2.yaml", f"ground.text_encoder={models['clip']}", f"ground.owl_model={models['owl']}",
                "ground.score_threshold=0", "ground.batch_size=4"]
    alone = tmp_path / "alone"
    run_stage(GroundStage(root / "phrases", root / "images"), alone, make_config(*settings))
    baseline = {row["key"]: row for row in read_rows(alone)}
    # the partner's boxes, as ground asks OWLv2 for them: the same images, phrases and threshold in one batch
    config = make_config(*settings)
    owl = load_detector(config.ground, "owlv2")
    keys = sorted(baseline)
    pixels = {r["key"]: decode_rgb(r["image"]) for r in pq.read_table(root / "images").to_pylist()}
    phrases = {r["key"]: [p["text"] for p in r["phrases"]] for r in pq.read_table(root / "phrases").to_pylist()}
    found = dict(zip(keys, owl.detect([pixels[k] for k in keys], [phrases[k] for k in keys], 0.0)))
    best = {}
    for key in keys:
        for region in baseline[key]["regions"]:
            index = phrases[key].index(region["phrase"])
            boxes = [d.box for d in found[key] if d.phrase == index]
            best[key, tuple(region["box"])] = float(box_iou(torch.tensor([region["box"]]), torch.tensor(boxes)).max()) if boxes else 0.0
    positive = sorted(v for v in best.values() if v > 0)
    assert len(best) > 3 and positive, "random detectors should give some overlapping boxes"
    threshold = round(statistics.median(positive), 3)  # some boxes on each side of it
    agreed = tmp_path / "agreed"
    summary = run_stage(GroundStage(root / "phrases", root / "images"), agreed, make_config(*settings, "ground.agreement_detector=owlv2", f"ground.agreement_iou={threshold}"))
    assert_dataset_invariants(agreed)
    expected = {place: iou for place, iou in best.items() if iou >= threshold}
    assert 0 < len(expected) < len(best)
    kept = {}
    for row in read_rows(agreed):
        assert len(row["region_agreement_ious"]) == len(row["regions"])
        assert json.loads(row["grounding"])["agreement_iou"] == threshold
        for region, iou in zip(row["regions"], row["region_agreement_ious"]):
            kept[row["key"], tuple(region["box"])] = iou
    # box coordinates are stored as float32: compare the stored values with the baseline's stored values
    assert kept.keys() == expected.keys()
    assert all(kept[place] == pytest.approx(expected[place], abs=1e-4) for place in kept)
    manifest = read_json(agreed / "_manifest.json")
    assert manifest["counters"]["dropped_no_agreement"] == len(best) - len(expected)
    assert manifest["provenance"]["agreement_detector"] == [str(models["owl"])]
    assert all(row["region_agreement_ious"] is None for row in read_rows(alone))  # off: nothing recorded
    assert summary.rows_out == 3


def test_agreement_is_off_by_default():
    assert GroundConfig().agreement_detector is None and GroundConfig().agreement_iou == 0.65
