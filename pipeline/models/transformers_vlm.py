"""transformers backend: AutoProcessor + AutoModelForImageTextToText, batched, left-padded."""

from __future__ import annotations

from PIL import Image

from pipeline.errors import FgdataError, first_line
from pipeline.models.generation import Generation, ModelInfo, Sampling, chat_prompt, sample_new_tokens, to_generation
from pipeline.models.reference import is_random_model


class TransformersVLM:
    def __init__(self, model: str, *, revision: str | None, trust_remote_code: bool, dtype: str):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":  # bf16 on GPU (fp16 overflows in some VLMs), fp32 on CPU
            dtype = "bfloat16" if self.device == "cuda" else "float32"
        try:
            self.processor = AutoProcessor.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
            self.model = AutoModelForImageTextToText.from_pretrained(
                model, revision=revision, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype), use_safetensors=True
            )
        except (OSError, ValueError) as exc:
            raise FgdataError(f"cannot load image-text model {model!r} with transformers: {first_line(exc)}") from None
        self.model.to(self.device).eval()
        # Decoder-only generation continues from the last position, so pad on the left.
        self.processor.tokenizer.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._pad_id = self.processor.tokenizer.pad_token_id
        self.info = ModelInfo(
            model=model,
            revision=revision or getattr(self.model.config, "_commit_hash", None),
            backend="transformers",
            is_random=is_random_model(model),
        )

    def generate(self, images: list[Image.Image], prompt: str, sampling: Sampling) -> list[Generation]:
        text = chat_prompt(self.processor, prompt)
        inputs = self.processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True).to(self.device)
        new_tokens = sample_new_tokens(self.model, inputs, sampling)
        return [to_generation(ids, self._eos_ids, self._pad_id, self.processor.decode) for ids in new_tokens]
