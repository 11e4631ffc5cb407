"""Text-to-text generation with an encoder-decoder (Flan-T5 class): the distilled hierarchy model."""

from __future__ import annotations

from pipeline.core.scoped import torch_seed
from pipeline.errors import FgdataError, first_line
from pipeline.models.reference import is_random_model


def load_seq2seq(model: str, *, revision: str | None = None):
    """(tokenizer, model) from a hub id or a local directory, with a one-line error when it fails."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=False)
        network = AutoModelForSeq2SeqLM.from_pretrained(model, revision=revision, trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise FgdataError(f"cannot load text-to-text model {model!r}: {first_line(exc)}") from None
    return tokenizer, network


class Seq2SeqGenerator:
    """Batched beam search or sampling, one list of `num_return_sequences` texts per source."""

    def __init__(self, model: str, *, revision: str | None = None, max_source_tokens: int = 128):
        import torch

        self._torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer, self.model = load_seq2seq(model, revision=revision)
        if self.device == "cuda":
            self.model.to(dtype=torch.bfloat16)
        self.model.to(self.device).eval()
        self.max_source_tokens = max_source_tokens
        self.name, self.is_random = model, is_random_model(model)

    def generate(
        self, sources: list[str], *, max_new_tokens: int, num_beams: int = 1, num_return_sequences: int = 1,
        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
    ) -> list[list[str]]:
        torch = self._torch
        if not sources:
            return []
        inputs = self.tokenizer(sources, return_tensors="pt", padding=True, truncation=True, max_length=self.max_source_tokens).to(self.device)
        options = {"max_new_tokens": max_new_tokens, "num_return_sequences": num_return_sequences}
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            options.update(do_sample=False, num_beams=max(num_beams, num_return_sequences))
        with torch_seed(seed), torch.inference_mode():
            output = self.model.generate(**inputs, **options)
        texts = [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]
        return [texts[i : i + num_return_sequences] for i in range(0, len(texts), num_return_sequences)]
