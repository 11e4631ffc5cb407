"""Box filters for grounding: thresholds, NMS within and across phrases, size limits, caps.

A detection is (phrase index, x1, y1, x2, y2 in pixels of the stored image, score).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms, nms

from pipeline.models.detection import Detection


@dataclass(frozen=True)
class BoxLimits:
    score_threshold: float
    nms_iou: float
    cross_phrase_iou: float
    min_box_area: float
    max_box_area: float
    whole_image_area: float
    max_boxes_per_phrase: int
    max_boxes_per_image: int


def normalise_box(box, width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1 / width, y1 / height, x2 / width, y2 / height]


def filter_detections(detections: list[Detection], width: int, height: int, limits: BoxLimits) -> tuple[list[Detection], dict]:
    """The detections worth keeping, by phrase then score, and how many each rule dropped."""
    dropped = {"low_score": 0, "degenerate": 0, "too_small": 0, "too_large": 0, "whole_image": 0, "nms": 0, "cross_phrase_nms": 0, "capped": 0}
    kept = []
    for det in detections:
        x1, y1, x2, y2 = max(0.0, det.box[0]), max(0.0, det.box[1]), min(float(width), det.box[2]), min(float(height), det.box[3])
        area = max(0.0, x2 - x1) * max(0.0, y2 - y1) / (width * height)
        reason = (
            "low_score" if det.score < limits.score_threshold
            else "degenerate" if x2 - x1 < 1 or y2 - y1 < 1
            else "whole_image" if area >= limits.whole_image_area
            else "too_small" if area < limits.min_box_area
            else "too_large" if area > limits.max_box_area
            else None
        )
        if reason:
            dropped[reason] += 1
        else:
            kept.append(Detection(det.phrase, (x1, y1, x2, y2), det.score))
    if kept:
        boxes = torch.tensor([d.box for d in kept], dtype=torch.float32)
        scores = torch.tensor([d.score for d in kept], dtype=torch.float32)
        phrases = torch.tensor([d.phrase for d in kept])
        within = batched_nms(boxes, scores, phrases, limits.nms_iou)  # per phrase, best first
        dropped["nms"] = len(kept) - len(within)
        across = within[nms(boxes[within], scores[within], limits.cross_phrase_iou)]
        dropped["cross_phrase_nms"] = len(within) - len(across)
        kept = [kept[i] for i in across.tolist()]
    per_phrase: dict[int, int] = {}
    capped = []
    for det in sorted(kept, key=lambda d: -d.score):
        if per_phrase.get(det.phrase, 0) < limits.max_boxes_per_phrase and len(capped) < limits.max_boxes_per_image:
            per_phrase[det.phrase] = per_phrase.get(det.phrase, 0) + 1
            capped.append(det)
    dropped["capped"] = len(kept) - len(capped)
    return sorted(capped, key=lambda d: (d.phrase, -d.score)), dropped
