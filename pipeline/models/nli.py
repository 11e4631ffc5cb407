"""Natural-language inference with a cross-encoder (e.g. cross-encoder/nli-deberta-v3-base), and the rule
that turns its scores into keep/drop.

The scores are what sentence-transformers' `CrossEncoder.predict(..., apply_softmax=True)` gives for the
same model (tests/test_nli_decision.py checks it), computed with transformers directly: importing
sentence-transformers costs ~10 s per model actor on a CPU node (it pulls in scipy and scikit-learn),
which was most of an NLI stage's start-up (bench/results/README.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import FgdataError, first_line
from pipeline.models.reference import is_random_model

_LABELS = ("contradiction", "entailment", "neutral")
NLI_RULES = ("contradiction", "not_entailed")


class NliScorer:
    """P(contradiction), P(entailment), P(neutral) for (premise, hypothesis) pairs."""

    def __init__(self, model: str, batch_size: int = 64, max_length: int = 256):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            # no code from the model's folder runs, and pickled weights are refused (safetensors only)
            self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
            self.model = AutoModelForSequenceClassification.from_pretrained(model, trust_remote_code=False, use_safetensors=True)
        except (OSError, ValueError, KeyError) as exc:
            raise FgdataError(f"cannot load NLI model {model!r}: {first_line(exc)}") from None
        self.model.to(self.device).eval()
        # Label order differs between NLI checkpoints; the config names them, so look them up by name.
        names = {int(index): str(label).lower() for index, label in self.model.config.id2label.items()}
        missing = [label for label in _LABELS if label not in names.values()]
        if missing or len(names) != len(_LABELS):
            raise FgdataError(f"NLI model {model!r} has labels {sorted(names.values())}, not {list(_LABELS)}")
        self._order = [next(i for i, name in names.items() if name == label) for label in _LABELS]
        self.name, self.batch_size, self.max_length, self.is_random = model, batch_size, max_length, is_random_model(model)

    def score(self, pairs: list[tuple[str, str]]) -> list[dict[str, float]]:
        import torch

        scores = []
        for start in range(0, len(pairs), self.batch_size):
            premises, hypotheses = zip(*pairs[start : start + self.batch_size])
            inputs = self.tokenizer(
                list(premises), list(hypotheses), padding=True, truncation="longest_first", max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                probabilities = self.model(**inputs).logits.float().softmax(-1)[:, self._order].tolist()
            scores += [dict(zip(_LABELS, row)) for row in probabilities]
        return scores


@dataclass(frozen=True)
class NliDecision:
    """Whether a candidate negative is valid, from its NLI scores against the positive.

    `contradiction` (the default): valid when P(contradiction) >= min_contradiction: the negative must
    contradict the positive, so a neutral rewrite ("a bright jacket" for "a blue jacket") is dropped.
    `not_entailed` (the older rule): valid when P(entailment) < max_entailment; neutral rewrites pass."""

    rule: str
    min_contradiction: float
    max_entailment: float

    def __post_init__(self):
        if self.rule not in NLI_RULES:
            raise FgdataError(f"NLI rule must be {' or '.join(NLI_RULES)}, got {self.rule!r}")

    def problem(self, score: dict[str, float]) -> tuple[str, str] | None:
        """None when valid, else (reason, detail): why it is dropped, the reason a counter name."""
        if self.rule == "contradiction":
            if score["contradiction"] >= self.min_contradiction:
                return None
            return "not_contradicted", f"P(contradiction) {score['contradiction']:.2f} < {self.min_contradiction}"
        if score["entailment"] < self.max_entailment:
            return None
        return "entailed", f"P(entailment) {score['entailment']:.2f} >= {self.max_entailment}"


def best_threshold(scores: list[float], labels: list[bool], min_precision: float) -> tuple[float, float, float] | None:
    """(threshold, precision, recall) of the lowest threshold t at which the items scoring >= t are
    labelled True with at least `min_precision`: the most recall that precision allows. None when no
    threshold reaches it."""
    best = None
    for t in sorted(set(scores), reverse=True):
        kept = [label for score, label in zip(scores, labels) if score >= t]
        precision, recall = sum(kept) / len(kept), sum(kept) / max(1, sum(labels))
        if precision >= min_precision:
            best = (t, precision, recall)
    return best


def calibrate_contradiction(scorer: NliScorer, fixture: Path, min_precision: float = 0.95) -> dict:
    """Scores a hand-labelled fixture (JSON lines: caption, positive, negative, contradicts) the way the
    negatives stage does (the caption with the phrase replaced is the hypothesis) and returns the
    lowest P(contradiction) threshold that keeps `min_precision`, with every pair's scores."""
    items = [json.loads(line) for line in Path(fixture).read_text().splitlines() if line.strip()]
    pairs = [(item["caption"], item["caption"].replace(item["positive"], item["negative"], 1)) for item in items]
    scores = scorer.score(pairs)
    found = best_threshold([s["contradiction"] for s in scores], [bool(item["contradicts"]) for item in items], min_precision)
    return {
        "model": scorer.name, "random_weights": scorer.is_random, "pairs": len(items), "min_precision": min_precision,
        "threshold": found and found[0], "precision": found and found[1], "recall": found and found[2],
        "scores": [{**item, **score} for item, score in zip(items, scores)],
    }
