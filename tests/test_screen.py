"""`fgdata screen`: the NSFW decision on recorded detector outputs (no explicit content is made or
stored), the real NudeNet detector on the safe sample photos, a face blurred in the stored pixels,
personal data in captions, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_IMAGES, image_bytes, make_config, read_rows, run_cli
from pipeline.core.images import decode_rgb
from pipeline.core.personal_data import find_personal_data, mask_personal_data
from pipeline.core.shards import read_json, read_rejects
from pipeline.errors import FgdataError
from pipeline.models.nudenet_detector import BodyDetection
from pipeline.runner import run_stage
from pipeline.stages.fggrn.screen import ScreenStage
from test_dedup import image_row, write_images

# What NudeNet's detect returned, recorded as (class, score); keyed here by the test image's width.
RECORDED = {
    64: [("FEMALE_BREAST_EXPOSED", 0.83), ("FACE_FEMALE", 0.7)],  # over the threshold: rejected
    65: [("BUTTOCKS_EXPOSED", 0.49)],  # under 0.5: kept
    66: [("FEET_EXPOSED", 0.95), ("MALE_BREAST_EXPOSED", 0.9), ("BELLY_EXPOSED", 0.9)],  # not NSFW classes: kept
    67: [("MALE_GENITALIA_EXPOSED", 0.5), ("ANUS_EXPOSED", 0.91)],  # the highest NSFW hit is named
    68: [],
}


class RecordedDetector:
    model_id = "recorded nudenet outputs"

    def detect(self, image: Image.Image) -> list[BodyDetection]:
        return [BodyDetection(label, score, (1.0, 1.0, 10.0, 10.0)) for label, score in RECORDED[image.width]]


class RecordedScreen(ScreenStage):
    def load_model(self, config):
        return RecordedDetector()


def test_nsfw_decision_on_recorded_detector_outputs(tmp_path):
    rows = [image_row(f"w{width}", image_bytes((width, 40))) for width in RECORDED]
    images = write_images(tmp_path / "images", [rows])
    run_stage(RecordedScreen(images), tmp_path / "out", make_config())
    assert sorted(row["key"] for row in read_rows(tmp_path / "out")) == ["w65", "w66", "w68"]
    rejects = {r["key"]: (r["reason"], r["detail"]) for r in read_rejects(tmp_path / "out").to_pylist()}
    assert rejects == {
        "w64": ("nsfw", "FEMALE_BREAST_EXPOSED detected with score 0.83 (screen.nsfw_threshold=0.5)"),
        "w67": ("nsfw", "ANUS_EXPOSED detected with score 0.91 (screen.nsfw_threshold=0.5)"),
    }
    # a stricter threshold and a longer class list reject more
    run_stage(RecordedScreen(images), tmp_path / "strict", make_config("screen.nsfw_threshold=0.4", 'screen.nsfw_classes=["BUTTOCKS_EXPOSED","FEET_EXPOSED"]'))
    assert sorted(r["key"] for r in read_rejects(tmp_path / "strict").to_pylist()) == ["w65", "w66"]


@pytest.fixture(scope="module")
def screened(tmp_path_factory):
    """The real NudeNet model (shipped in its wheel) over every decodable sample photo, faces blurred."""
    root = tmp_path_factory.mktemp("screen")
    rows = [image_row(path.stem, path.read_bytes()) for path in sorted(SAMPLE_IMAGES.glob("*.jpg")) if not path.stem.startswith("broken")]
    images = write_images(root / "images", [rows[:9], rows[9:]])
    run_stage(ScreenStage(images), root / "out", make_config("screen.blur_faces=true"))
    return images, root / "out"


def test_real_detector_passes_the_safe_sample_photos_and_finds_their_faces(screened):
    images, out = screened
    assert read_rejects(out).num_rows == 0  # no sample photo is NSFW at the default threshold
    faces = {row["key"]: row["faces"] for row in read_rows(out)}
    assert len(faces) == 17
    assert [f["label"] for f in faces["astronaut"]] == ["FACE_FEMALE"]  # Eileen Collins
    assert [f["label"] for f in faces["camera"]] == ["FACE_MALE"]  # the cameraman
    assert not faces["coffee"] and not faces["rocket"]
    manifest = read_json(out / "_manifest.json")
    assert manifest["provenance"]["screen_model"] == ["nudenet 3.4.2 (320n.onnx)"]
    assert "at score >= 0.5" in manifest["provenance"]["nsfw_rule"][0]
    assert manifest["counters"]["faces_blurred"] == 2
    assert "screen_model = nudenet 3.4.2 (320n.onnx)" in (out / "DATACARD.md").read_text()


def test_a_face_is_blurred_in_the_stored_pixels_and_nothing_else_changes(screened):
    _, out = screened
    row = next(row for row in read_rows(out) if row["key"] == "astronaut")
    assert row["faces_blurred"] and row["format"] == "PNG"
    before = np.asarray(decode_rgb((SAMPLE_IMAGES / "astronaut.jpg").read_bytes())).astype(int)
    after = np.asarray(decode_rgb(row["image"])).astype(int)
    x1, y1, x2, y2 = (int(v) for v in row["faces"][0]["box"])
    inside = np.zeros(before.shape[:2], bool)
    inside[y1:y2, x1:x2] = True
    assert np.abs(after - before)[inside].mean() > 5  # the face is smoothed out
    assert np.array_equal(after[~inside], before[~inside])  # every other pixel exactly as it was
    untouched = next(row for row in read_rows(out) if row["key"] == "coffee")
    assert untouched["image"] == (SAMPLE_IMAGES / "coffee.jpg").read_bytes()  # no face: the bytes as they came


@pytest.mark.parametrize(
    "caption,kinds,masked",
    [
        ("contact jane.doe@example.com or +1 (555) 123-4567", ["email", "phone"], "contact [email] or [phone]"),
        ("see https://shop.example.org/item?id=3 for more", ["url"], "see [url] for more"),
        ("a red door at 221 Baker Street in the rain", ["street_address"], "a red door at [street_address] in the rain"),
        ("2 dogs and 10-12 cats in 2019 on a 3.5 m wall", [], "2 dogs and 10-12 cats in 2019 on a 3.5 m wall"),
    ],
)
def test_personal_data_in_captions(caption, kinds, masked):
    spans = find_personal_data(caption)
    assert sorted({kind for kind, _, _ in spans}) == sorted(kinds)
    assert mask_personal_data(caption, spans) == masked


def test_personal_data_flagged_or_masked_in_the_stored_caption(tmp_path):
    caption = "my cat, mail me at cat@example.com"
    images = write_images(tmp_path / "images", [[image_row("a", image_bytes((68, 40)), caption)]])
    run_stage(RecordedScreen(images), tmp_path / "flag", make_config())
    (flagged,) = read_rows(tmp_path / "flag")
    assert flagged["short_caption"] == caption and flagged["caption_personal_data"] == ["email"]
    run_stage(RecordedScreen(images), tmp_path / "mask", make_config("screen.personal_data=mask"))
    (masked,) = read_rows(tmp_path / "mask")
    assert masked["short_caption"] == "my cat, mail me at [email]" and masked["caption_personal_data"] == ["email"]


def test_bad_rows_are_rejects_and_bad_settings_stop_the_run(tmp_path):
    rows = [image_row("ok", image_bytes((68, 40))), {**image_row("junk", image_bytes((68, 40))), "image": b"<html>"}, image_row("ok", image_bytes((66, 40)))]
    images = write_images(tmp_path / "images", [rows])
    run_stage(RecordedScreen(images), tmp_path / "out", make_config())
    assert [row["key"] for row in read_rows(tmp_path / "out")] == ["ok"]
    assert sorted((r["key"], r["reason"]) for r in read_rejects(tmp_path / "out").to_pylist()) == [("junk", "not_an_image"), ("ok", "duplicate_key")]
    with pytest.raises(FgdataError, match="NOT_A_CLASS not among"):
        run_stage(ScreenStage(images), tmp_path / "x", make_config('screen.nsfw_classes=["NOT_A_CLASS"]'))
    result = run_cli("screen", str(images), str(tmp_path / "y"), "--set", "screen.model=/no/such.onnx")
    assert result.returncode == 2 and "screen.model must be nudenet-320n or the path of an .onnx file" in result.stderr
    assert "Traceback" not in result.stderr
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    result = run_cli("screen", str(images), str(tmp_path / "z"), "--set", f"screen.model={tmp_path / 'garbage.onnx'}", "--executor", "local")
    assert result.returncode == 2 and "does not load as an ONNX model" in result.stderr and not (tmp_path / "z").exists()
