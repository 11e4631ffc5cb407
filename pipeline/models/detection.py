"""Detect boxes for free-text phrases: the detection type and the interface every detector backend implements.

A detection is (phrase index, x1, y1, x2, y2 in pixels of the stored image, score).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image


@dataclass(frozen=True)
class Detection:
    phrase: int
    box: tuple[float, float, float, float]
    score: float


class PhraseDetector(Protocol):
    name: str  # detector id (and text encoder) recorded in every row
    is_random: bool

    def detect(self, images: list[Image.Image], phrases: list[list[str]], score_threshold: float) -> list[list[Detection]]:
        """For each image, detections of its own phrases, boxes in that image's pixel coordinates."""
