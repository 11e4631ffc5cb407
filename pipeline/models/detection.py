"""Detect boxes for free-text phrases: the interface the ground stage uses, and its backends."""

from __future__ import annotations

from typing import Protocol

from PIL import Image

from pipeline.boxes import Detection
from pipeline.errors import FgdataError


class PhraseDetector(Protocol):
    name: str  # detector id (and text encoder) recorded in every row
    is_random: bool

    def detect(self, images: list[Image.Image], phrases: list[list[str]], score_threshold: float) -> list[list[Detection]]:
        """For each image, detections of its own phrases, boxes in that image's pixel coordinates."""


def load_detector(settings) -> PhraseDetector:
    if settings.backend == "yolo_world":
        from pipeline.models.yolo_world import YoloWorldDetector

        return YoloWorldDetector(
            settings.detector, settings.text_encoder, image_size=settings.image_size, cache_size=settings.text_cache_size,
            trust_model_file=settings.trust_model_file,
        )
    if settings.backend == "owlv2":
        from pipeline.models.owl import OwlDetector

        return OwlDetector(settings.owl_model)
    raise FgdataError(f"ground.backend must be yolo_world or owlv2, got {settings.backend!r}")
