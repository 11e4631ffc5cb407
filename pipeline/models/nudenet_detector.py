"""NudeNet (MIT, `nudenet` on PyPI): a YOLOv8n ONNX detector of exposed and covered body parts and
of faces (FACE_FEMALE, FACE_MALE), run offline with onnxruntime. Its wheel ships the 320n model."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import FgdataError

BUNDLED = "nudenet-320n"  # the model file inside the nudenet wheel
FACE_CLASSES = ("FACE_FEMALE", "FACE_MALE")
# the classes the bundled model reports (nudenet/nudenet.py, 3.4.2)
LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED",
    "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)


@dataclass(frozen=True)
class BodyDetection:
    label: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


def model_file(model: str) -> Path:
    """The .onnx file `model` names: the bundled one for BUNDLED, else a path that must exist."""
    if model == BUNDLED:
        import nudenet

        return Path(nudenet.__file__).parent / "320n.onnx"
    path = Path(model)
    if path.suffix != ".onnx" or not path.is_file():
        raise FgdataError(f"screen.model must be {BUNDLED} or the path of an .onnx file, got {model!r}")
    return path


def check_model(model: str) -> None:
    """Stops a run before it starts when `model` is no ONNX model onnxruntime can load."""
    import onnxruntime

    path = model_file(model)
    try:
        onnxruntime.InferenceSession(str(path))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own classes for a bad file
        raise FgdataError(f"screen.model {path} does not load as an ONNX model: {str(exc).splitlines()[0][:300]}") from None


class NudeNetDetector:
    """NudeNet's own pre- and post-processing (`NudeDetector.detect`) on decoded RGB images."""

    def __init__(self, model: str):
        from nudenet import NudeDetector

        self.path = model_file(model)
        self._detector = NudeDetector(model_path=str(self.path))
        self.model_id = f"nudenet {metadata.version('nudenet')} ({self.path.name})"

    def detect(self, image: Image.Image) -> list[BodyDetection]:
        import cv2  # nudenet's own dependency (ultralytics' opencv-python here)

        # NudeNet reads its input as OpenCV does: BGR channel order
        bgr = cv2.cvtColor(np.asarray(image if image.mode == "RGB" else image.convert("RGB")), cv2.COLOR_RGB2BGR)
        return [
            BodyDetection(d["class"], float(d["score"]), (d["box"][0], d["box"][1], d["box"][0] + d["box"][2], d["box"][1] + d["box"][3]))
            for d in self._detector.detect(bgr)
        ]
