"""OWLv2 (transformers zero-shot detector), the second grounding backend, same interface."""

from __future__ import annotations

from PIL import Image

from pipeline.core.images import to_rgb
from pipeline.errors import FgdataError, first_line
from pipeline.models.detection import Detection
from pipeline.models.reference import is_random_model


class OwlDetector:
    def __init__(self, model: str):
        import torch
        from transformers import AutoProcessor, Owlv2ForObjectDetection

        self._torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=False)
            self.model = Owlv2ForObjectDetection.from_pretrained(model, use_safetensors=True).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise FgdataError(f"cannot load OWLv2 detector {model!r}: {first_line(exc)}") from None
        self.name = model
        self.is_random = is_random_model(model)

    def detect(self, images: list[Image.Image], phrases: list[list[str]], score_threshold: float) -> list[list[Detection]]:
        torch = self._torch
        images = [to_rgb(image) for image in images]
        # OWLv2 needs at least one query per image; an image without phrases gets a
        # placeholder whose detections are dropped.
        queries = [p if p else ["object"] for p in phrases]
        inputs = self.processor(
            text=queries, images=images, return_tensors="pt", padding="max_length", truncation=True, max_length=16
        ).to(self.device)  # OWL text positions: 16 tokens per query
        with torch.inference_mode():
            outputs = self.model(**inputs)
        # OWLv2 pads every image to a square before resizing: boxes come back relative to it.
        sides = [max(image.size) for image in images]
        found = self.processor.post_process_grounded_object_detection(
            outputs, threshold=score_threshold, target_sizes=torch.tensor([[s, s] for s in sides])
        )
        results = []
        for result, image_phrases in zip(found, phrases):
            results.append(
                [
                    Detection(int(label), tuple(float(v) for v in box), float(score))
                    for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist())
                    if int(label) < len(image_phrases)
                ]
            )
        return results
