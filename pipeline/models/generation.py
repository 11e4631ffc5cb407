"""Generate text from image + text: the types and the interface every generation backend implements (backends: models/registry.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Protocol

from PIL import Image

from pipeline.core.scoped import torch_seed


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    seed: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (hit max_new_tokens)


@dataclass(frozen=True)
class ModelInfo:
    model: str
    revision: str | None
    backend: str
    is_random: bool


class ImageTextGenerator(Protocol):
    info: ModelInfo

    def generate(self, images: list[Image.Image], prompt: str, sampling: Sampling) -> list[Generation]:
        """One generation per image, all with the same user prompt."""


def sample_new_tokens(model, inputs, sampling: Sampling, **options) -> list[list[int]]:
    """transformers `generate` with our sampling settings; only the newly generated ids per row."""
    import torch

    options = {"max_new_tokens": sampling.max_new_tokens, "do_sample": sampling.temperature > 0, **options}
    if sampling.temperature > 0:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p)
    with torch_seed(sampling.seed), torch.inference_mode():
        output = model.generate(**inputs, **options)
    return output[:, inputs["input_ids"].shape[1] :].tolist()


def to_generation(ids: list[int], eos_ids: set[int], pad_id: int | None, decode) -> Generation:
    """Text up to the first end-of-sequence id; without one, the model ran into max_new_tokens."""
    stop = next((i for i, token in enumerate(ids) if token in eos_ids), None)
    kept = [t for t in ids if t != pad_id] if stop is None else ids[:stop]
    text = decode(kept, skip_special_tokens=True).strip()
    return Generation(text=text, tokens=len(kept) + (stop is not None), finish_reason="length" if stop is None else "stop")


def chat_prompt(processor, prompt: str) -> str:
    """The model's own chat template around one image and the user prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
