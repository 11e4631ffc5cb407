"""CLIP similarity of pictures and texts, for `fgdata quality`: the cosine of their L2-normalised
embeddings, as CLIPModel's own logits compute it before the temperature.

Pictures go through the image processor saved with the model (resize, centre crop, normalise), so a
score is what `CLIPProcessor` + `CLIPModel` give for the same picture and text. Texts take the
model's text positions: 77 for a caption or phrase, the Long-CLIP rows for a long caption when the
model has them (an FG-CLIP or a model fgdata trained), else cut at 77 as CLIP reads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import FgdataError, first_line
from pipeline.models.clip_model import encode_text, load_clip
from pipeline.models.reference import is_random_model


class ClipScorer:
    def __init__(self, model: str, revision: str | None = None, batch_size: int = 64):
        from transformers import AutoImageProcessor

        parts = load_clip(model, revision)
        try:
            self.processor = AutoImageProcessor.from_pretrained(model, revision=revision, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise FgdataError(f"cannot load the image processor of CLIP model {model!r}: {first_line(exc)}") from None
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = parts.model.to(self.device).eval()
        self.tokenizer = parts.tokenizer
        self.name, self.batch_size = model, batch_size
        self.is_random = is_random_model(model)

    @torch.inference_mode()
    def images(self, pictures: list[Image.Image]) -> torch.Tensor:
        """(N, D) unit-length image embeddings."""
        chunks = []
        for start in range(0, len(pictures), self.batch_size):
            pixels = self.processor(images=pictures[start : start + self.batch_size], return_tensors="pt").pixel_values.to(self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            chunks.append(F.normalize(self.model.visual_projection(pooled), dim=-1))
        return torch.cat(chunks) if chunks else torch.zeros((0, self.model.config.projection_dim), device=self.device)

    @torch.inference_mode()
    def texts(self, texts: list[str], long: bool = False) -> torch.Tensor:
        """(N, D) unit-length text embeddings (`long`: a long caption, see the module's note)."""
        chunks = [encode_text(self.model, self.tokenizer, texts[i : i + self.batch_size], long, self.device) for i in range(0, len(texts), self.batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros((0, self.model.config.projection_dim), device=self.device)

    def similarities(self, pictures: list[Image.Image], texts: list[str], long: bool = False) -> list[float]:
        """Cosine similarity of each picture with the text at the same place."""
        if not pictures:
            return []
        return (self.images(pictures) * self.texts(texts, long)).sum(dim=-1).tolist()
