"""Natural-language inference with a sequence-classification cross-encoder (DeBERTa-class MNLI)."""

from __future__ import annotations

from pipeline.errors import FgdataError, first_line
from pipeline.models.reference import is_random_model

_LABELS = ("contradiction", "entailment", "neutral")


class NliScorer:
    """P(contradiction), P(entailment), P(neutral) for (premise, hypothesis) pairs."""

    def __init__(self, model: str, batch_size: int = 64):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
            self.model = AutoModelForSequenceClassification.from_pretrained(model, trust_remote_code=False, use_safetensors=True).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise FgdataError(f"cannot load NLI model {model!r}: {first_line(exc)}") from None
        # Label order differs between NLI checkpoints; the config names them.
        names = {index: label.lower() for index, label in self.model.config.id2label.items()}
        missing = [label for label in _LABELS if label not in names.values()]
        if missing:
            raise FgdataError(f"NLI model {model!r} has labels {sorted(names.values())}, not {list(_LABELS)}")
        self._order = [next(i for i, name in names.items() if name == label) for label in _LABELS]
        self.name, self.batch_size, self.is_random = model, batch_size, is_random_model(model)

    def score(self, pairs: list[tuple[str, str]]) -> list[dict[str, float]]:
        torch = self._torch
        results = []
        for start in range(0, len(pairs), self.batch_size):
            premises, hypotheses = zip(*pairs[start : start + self.batch_size])
            inputs = self.tokenizer(list(premises), list(hypotheses), padding=True, truncation=True, max_length=256, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                probabilities = self.model(**inputs).logits.softmax(-1)[:, self._order].tolist()
            results += [dict(zip(_LABELS, row)) for row in probabilities]
        return results
