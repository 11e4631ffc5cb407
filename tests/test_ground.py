import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE_IMAGES, assert_dataset_invariants, image_bytes, make_config, read_rows
from PIL import Image

from pipeline.core.schemas import conform
from pipeline.core.shards import read_json, read_rejects
from pipeline.errors import FgdataError
from pipeline.models.detection import Detection
from pipeline.models.tiny import build_tiny_clip_text, build_tiny_owlv2
from pipeline.models.yolo_world import PhraseEmbeddingCache, boxes_to_pixels, letterbox_batch
from pipeline.runner import run_stage
from pipeline.stages.fggrn.box_filters import BoxLimits, filter_detections, normalise_box
from pipeline.stages.fggrn.ground import GroundStage
from pipeline.stages.fggrn.ingest import IngestStage
from pipeline.stages.fggrn.phrases import PhrasesStage

LIMITS = BoxLimits(
    score_threshold=0.3, nms_iou=0.5, cross_phrase_iou=0.95, min_box_area=0.001, max_box_area=1.0,
    whole_image_area=0.95, max_boxes_per_phrase=2, max_boxes_per_image=4,
)


def test_filters_on_hand_made_detections():
    detections = [
        Detection(0, (10, 10, 50, 50), 0.9),
        Detection(0, (12, 12, 52, 52), 0.8),  # overlaps the first of the same phrase: NMS
        Detection(0, (60, 60, 90, 90), 0.7),
        Detection(0, (100, 10, 130, 40), 0.6),  # a third box of phrase 0: over max_boxes_per_phrase
        Detection(1, (10, 10, 50, 50.5), 0.5),  # the same box as phrase 0's best: cross-phrase NMS
        Detection(1, (0, 0, 200, 100), 0.95),  # the whole image
        Detection(1, (5, 5, 6, 6), 0.9),  # 1x1 px: below min_box_area
        Detection(2, (20, 60, 80, 95), 0.2),  # below the score threshold
        Detection(2, (150, 50, 260, 140), 0.4),  # runs off the image: clipped to 200x100
    ]
    kept, dropped = filter_detections(detections, 200, 100, LIMITS)
    assert [(d.phrase, d.box, d.score) for d in kept] == [
        (0, (10, 10, 50, 50), 0.9),
        (0, (60, 60, 90, 90), 0.7),
        (2, (150, 50, 200.0, 100.0), 0.4),
    ]
    assert dropped == {
        "low_score": 1, "degenerate": 0, "too_small": 1, "too_large": 0, "whole_image": 1,
        "nms": 1, "cross_phrase_nms": 1, "capped": 1,
    }


def test_max_boxes_per_image_keeps_the_best():
    detections = [Detection(i, (10 * i, 0, 10 * i + 8, 8), 0.4 + i / 100) for i in range(10)]
    kept, _ = filter_detections(detections, 200, 100, LIMITS)
    assert [d.phrase for d in kept] == [6, 7, 8, 9]


def test_box_normalised_by_image_size():
    box = [12.5, 30.0, 180.25, 99.0]
    assert normalise_box(box, 200, 100) == pytest.approx([0.0625, 0.3, 0.90125, 0.99])


@pytest.mark.parametrize("shape", [(341, 512), (512, 200), (90, 640)])
def test_letterbox_round_trip_matches_the_drawn_rectangle(shape):
    """Draw a box, letterbox the image as the detector does, find the box there, map it back."""
    height, width = shape
    image = np.zeros((height, width, 3), np.uint8)
    x1, y1, x2, y2 = width // 5, height // 4, width // 2, height * 3 // 4
    image[y1:y2, x1:x2] = 255
    other = np.zeros((300, 300, 3), np.uint8)
    for batch in ([image], [image, other]):  # one shape: a tight rectangle; mixed shapes: square
        letterboxed = letterbox_batch(batch, 640)[0].transpose(1, 2, 0)
        assert letterboxed.shape[0] % 32 == 0 and letterboxed.shape[1] % 32 == 0
        ys, xs = np.where(letterboxed[..., 0] > 127)
        found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        back = boxes_to_pixels(found, letterboxed.shape[:2], shape)[0].tolist()
        assert back == pytest.approx([x1, y1, x2, y2], abs=2.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    texts = [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")] * 10
    root = tmp_path_factory.mktemp("models")
    return {"clip": build_tiny_clip_text(root / "clip-text", texts), "owl": build_tiny_owlv2(root / "owlv2", texts)}


@pytest.fixture(scope="module")
def sample_phrases(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("data")
    run_stage(IngestStage(SAMPLE_IMAGES), root / "images", make_config("ingest.rows_per_shard=10"))
    run_stage(PhrasesStage(root / "images"), root / "phrases", make_config())
    return root


def test_phrase_embeddings_are_computed_once_per_phrase(models):
    cache = PhraseEmbeddingCache(str(models["clip"]), "cpu", capacity=100)
    first = cache.embed(["a red cup", "a spoon", "a red cup"])
    assert (cache.hits, cache.misses) == (1, 2)
    again = cache.embed(["a spoon", "a red cup"])
    assert (cache.hits, cache.misses) == (3, 2)
    assert torch.allclose(again[1], first[0]) and torch.allclose(first[0].norm(), torch.tensor(1.0))
    tiny = PhraseEmbeddingCache(str(models["clip"]), "cpu", capacity=1)  # more phrases per call than capacity
    assert torch.allclose(tiny.embed(["a spoon", "a red cup"]), again)
    assert list(tiny._cache) == ["a red cup"]  # only the most recent survives


def ground_config(models, *extra):
    # random weights score every box near zero, so the tests keep everything above 0
    return make_config(
        "ground.detector=yolov8s-worldv2.yaml", f"ground.text_encoder={models['clip']}", f"ground.owl_model={models['owl']}",
        "ground.score_threshold=0", "ground.batch_size=4", *extra,
    )


@pytest.mark.parametrize("backend", ["yolo_world", "owlv2"])
def test_ground_end_to_end_with_random_weights(models, sample_phrases, tmp_path, backend):
    out = tmp_path / "regions"
    summary = run_stage(GroundStage(sample_phrases / "phrases"), out, ground_config(models, f"ground.backend={backend}"))
    assert (summary.rows_in, summary.rows_out) == (17, 17)
    assert_dataset_invariants(out)
    images = {r["key"]: r for r in read_rows(sample_phrases / "images")}
    phrases = {r["key"]: r for r in read_rows(sample_phrases / "phrases")}
    total = 0
    for row in read_rows(out):
        image = images[row["key"]]
        assert (row["width"], row["height"]) == (image["width"], image["height"])
        assert row["detector_is_random"] and json.loads(row["grounding"])["max_boxes_per_phrase"] == 3
        texts = {p["text"] for p in phrases[row["key"]]["phrases"]}
        assert len(row["regions"]) <= 20
        for region in row["regions"]:
            total += 1
            x1, y1, x2, y2 = region["box"]
            assert 0 <= x1 < x2 <= row["width"] and 0 <= y1 < y2 <= row["height"]
            assert region["box_norm"] == pytest.approx(normalise_box(region["box"], row["width"], row["height"]), abs=1e-4)
            assert region["phrase"] in texts
            caption = row[row["phrase_source"]]
            assert caption[region["start"] : region["end"]] == region["phrase"]
    assert total > 0
    manifest = read_json(out / "_manifest.json")
    images_input = manifest["inputs"][1]
    assert (images_input["path"], images_input["stage"], images_input["role"]) == (str(sample_phrases / "images"), "ingest", "images")
    assert manifest["provenance"]["random_weights"] == [True]
    if backend == "yolo_world":
        assert manifest["counters"]["phrase_embedding_cache_misses"] > 0


def test_missing_and_broken_images_become_rejects(models, tmp_path, ray_session):
    phrases = tmp_path / "phrases"
    phrases.mkdir()
    row = {"short_caption": "a red square", "long_caption": None, "phrase_source": "short_caption", "spacy_model": "x",
           "phrases": [{"text": "a red square", "start": 0, "end": 12, "head": "square", "mentions": 1}]}
    pq.write_table(conform([{**row, "key": k} for k in ("ok", "gone", "broken", "no-phrases")], "phrases"), phrases / "part-00000.parquet")
    pq.write_table(conform([{**row, "key": "lost"}], "phrases"), phrases / "part-00001.parquet")
    images = tmp_path / "images"
    images.mkdir()

    def image_row(key, data):
        return {"key": key, "image": data, "width": 64, "height": 48, "format": "JPEG", "short_caption": None, "source": "t"}

    pq.write_table(
        conform([image_row("ok", image_bytes()), image_row("broken", image_bytes()[:100]), image_row("no-phrases", image_bytes())], "images"),
        images / "part-00000.parquet",
    )
    with pytest.raises(FgdataError, match="pass --images DIR"):
        run_stage(GroundStage(phrases), tmp_path / "nowhere", ground_config(models))
    out = tmp_path / "regions"
    run_stage(GroundStage(phrases, images), out, ground_config(models))
    assert {(r["key"], r["reason"]) for r in read_rejects(out).to_pylist()} == {
        ("gone", "image_missing"), ("broken", "decode_error"), ("lost", "image_missing"),
    }
    assert_dataset_invariants(out, expected_keys={"ok", "gone", "broken", "no-phrases", "lost"})


def test_bad_ground_settings_stop_before_any_work(models, sample_phrases, tmp_path):
    with pytest.raises(FgdataError, match="ground.backend must be yolo_world or owlv2"):
        run_stage(GroundStage(sample_phrases / "phrases"), tmp_path / "o", ground_config(models, "ground.backend=glip"))
    with pytest.raises(FgdataError, match="cannot use model '/no/such/clip'"):
        run_stage(GroundStage(sample_phrases / "phrases"), tmp_path / "o", ground_config(models, "ground.text_encoder=/no/such/clip"))
    with pytest.raises(FgdataError, match="checkpoint /no/such.pt does not exist"):
        run_stage(GroundStage(sample_phrases / "phrases"), tmp_path / "o", ground_config(models, "ground.detector=/no/such.pt"))
    assert not (tmp_path / "o").exists()


def test_owl_boxes_are_relative_to_the_padded_square(models):
    """OWLv2 pads to a square before resizing; the stage asks for boxes in that square's pixels,
    which are the original image's pixels since the padding goes right and bottom."""
    from transformers import AutoProcessor
    from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

    processor = AutoProcessor.from_pretrained(models["owl"])
    logits = torch.full((1, 2, 1), -10.0)
    logits[0, 0, 0] = 5.0
    pred_boxes = torch.tensor([[[0.25, 0.25, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]])  # cx, cy, w, h of the square
    outputs = Owlv2ObjectDetectionOutput(logits=logits, pred_boxes=pred_boxes)
    image = Image.new("RGB", (400, 200))
    side = max(image.size)
    result = processor.post_process_grounded_object_detection(outputs, threshold=0.5, target_sizes=torch.tensor([[side, side]]))[0]
    assert result["boxes"].tolist() == [pytest.approx([80.0, 80.0, 120.0, 120.0])]


def test_random_yolo_world_is_the_same_model_every_time(models):
    """A restarted actor must rebuild the same random detector, or resumed shards would differ."""
    from pipeline.models.yolo_world import YoloWorldDetector

    first, second = (YoloWorldDetector("yolov8s-worldv2.yaml", str(models["clip"]), image_size=320, cache_size=10) for _ in range(2))
    images = [Image.open(SAMPLE_IMAGES / "coffee.jpg")]
    assert first.detect(images, [["a red cup"]], 0.0) == second.detect(images, [["a red cup"]], 0.0)
