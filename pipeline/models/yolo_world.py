"""YOLO-World (ultralytics) with each image's own phrases as its vocabulary.

ultralytics would embed class names with its GitHub-only `clip` package; instead the phrases
are embedded once each by the same CLIP ViT-B/32 text tower loaded through transformers (hub
id or local path), cached, and handed to `WorldModel.predict(x, txt_feats=...)`, which takes
per-image text features. Letterboxing, NMS and the mapping back to pixels are ultralytics' own.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.boxes import Detection
from pipeline.errors import FgdataError
from pipeline.images import to_rgb
from pipeline.models.reference import is_random_model


# A data pipeline must not pip-install packages while it runs; ultralytics does unless told not to.
os.environ.setdefault("YOLO_AUTOINSTALL", "false")


class PhraseEmbeddingCache:
    """CLIP text embeddings (L2-normalised, as YOLO-World expects) computed once per phrase."""

    def __init__(self, text_encoder: str, device: str, capacity: int):
        import torch
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(text_encoder)
            self.model = CLIPTextModelWithProjection.from_pretrained(text_encoder).to(device).eval()
        except (OSError, ValueError) as exc:
            raise FgdataError(f"cannot load CLIP text encoder {text_encoder!r}: {exc}") from None
        self._torch, self.device, self.capacity = torch, device, capacity
        self._cache: OrderedDict[str, object] = OrderedDict()
        self.hits = self.misses = 0

    def embed(self, phrases: list[str]):
        missing = list(dict.fromkeys(p for p in phrases if p not in self._cache))
        self.hits += len(phrases) - len(missing)
        self.misses += len(missing)
        if missing:
            torch = self._torch
            tokens = self.tokenizer(missing, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                embeddings = torch.nn.functional.normalize(self.model(**tokens).text_embeds, dim=-1)
            for phrase, embedding in zip(missing, embeddings):
                self._cache[phrase] = embedding
        result = self._torch.stack([self._cache[p] for p in phrases])
        for phrase in phrases:
            self._cache.move_to_end(phrase)
        while len(self._cache) > self.capacity:  # least recently used first
            self._cache.popitem(last=False)
        return result


def letterbox_batch(arrays: list[np.ndarray], size: int) -> np.ndarray:
    """HWC RGB images → one NCHW uint8 batch, resized and padded as ultralytics' own predictor
    does: to the smallest stride-multiple rectangle when all images share a shape, else square."""
    from ultralytics.data.augment import LetterBox

    same_shape = len({a.shape for a in arrays}) == 1
    letterbox = LetterBox((size, size), auto=same_shape, stride=32)
    return np.stack([letterbox(image=a) for a in arrays]).transpose(0, 3, 1, 2).copy()


def boxes_to_pixels(boxes, letterboxed: tuple[int, int], shape: tuple[int, int]):
    """xyxy boxes in a letterboxed (height, width) frame back to the pixels of an image of `shape`."""
    from ultralytics.utils import ops

    return ops.scale_boxes(letterboxed, boxes.clone(), shape)


class YoloWorldDetector:
    def __init__(self, detector: str, text_encoder: str, *, image_size: int, cache_size: int):
        import torch
        from ultralytics import YOLOWorld

        self._torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # A model built from a .yaml architecture file has random weights: seeded, so that a
        # restarted actor or a rerun builds the same one and resumed shards match.
        self.is_random = Path(detector).suffix in (".yaml", ".yml") or is_random_model(text_encoder)
        if self.is_random:
            torch.manual_seed(0)
        try:
            # fused conv+batchnorm, as ultralytics' own predictor runs it
            self.net = YOLOWorld(detector).model.fuse(verbose=False).to(self.device).eval()
        except (FileNotFoundError, OSError, RuntimeError, KeyError) as exc:
            raise FgdataError(f"cannot load YOLO-World detector {detector!r}: {exc}") from None
        self.texts = PhraseEmbeddingCache(text_encoder, self.device, cache_size)
        self.image_size = image_size
        self.name = f"{detector} + {text_encoder}"

    def detect(self, images: list[Image.Image], phrases: list[list[str]], score_threshold: float) -> list[list[Detection]]:
        from ultralytics.utils import nms

        torch = self._torch
        width = max(len(p) for p in phrases)
        # Each image gets its own phrases as classes; shorter lists are padded with zero
        # features, and any detection of a padding class is dropped below.
        features = torch.zeros(len(images), width, self.net.txt_feats.shape[-1], device=self.device)
        for i, image_phrases in enumerate(phrases):
            if image_phrases:
                features[i, : len(image_phrases)] = self.texts.embed(image_phrases)
        arrays = [np.asarray(to_rgb(image)) for image in images]
        x = torch.from_numpy(letterbox_batch(arrays, self.image_size)).to(self.device).float() / 255
        self.net.model[-1].nc = width
        with torch.inference_mode():
            output = self.net.predict(x, txt_feats=features)
        prediction = output[0] if isinstance(output, (list, tuple)) else output
        per_image = nms.non_max_suppression(prediction, conf_thres=score_threshold, iou_thres=0.7, max_det=300)
        results = []
        for array, image_phrases, found in zip(arrays, phrases, per_image):
            boxes = boxes_to_pixels(found[:, :4], tuple(x.shape[2:]), array.shape[:2])
            results.append(
                [
                    Detection(int(cls), tuple(float(v) for v in box), float(score))
                    for box, score, cls in zip(boxes.tolist(), found[:, 4].tolist(), found[:, 5].tolist())
                    if int(cls) < len(image_phrases)
                ]
            )
        return results
