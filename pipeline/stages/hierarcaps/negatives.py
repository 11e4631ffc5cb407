"""`fgdata hierarcaps negatives`: pick one negative per tier from the generated candidates, by NLI.

A candidate for tier i is kept only when the tier's positive contradicts it (P(contradiction) at
least hierarcaps.min_negative_contradiction; with hierarcaps.negative_nli_rule=not_entailed, when the
positive entails it below hierarcaps.max_negative_entailment) and it entails the positive of tier i-1
(at least hierarcaps.min_entailment): a sibling of the positive under the same parent, as
`motorized transportation => motorcycle` gets `car`. Among the kept, the one the positive
contradicts most wins; its scores go to `negative_nli`. An item with no valid candidate for some tier
is rejected, naming it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

from pipeline.config import Config
from pipeline.core.schemas import conform
from pipeline.core.shards import read_shard_schema
from pipeline.errors import FgdataError
from pipeline.models.nli import NliDecision, NliScorer
from pipeline.stages.base import Problem, ShardResult, WorkUnit, reject
from pipeline.stages.hierarcaps.nli_chain import NliChainStage


def negative_pairs(tiers: list[str], candidates: list[list[str]]) -> list[tuple[str, str]]:
    """The NLI pairs that judge a row's candidates, in the order `choose_negatives` reads them: per
    candidate of tier i, (positive_i, candidate), then (candidate, positive_{i-1}) when i > 0."""
    pairs = []
    for i, options in enumerate(candidates):
        for candidate in options:
            pairs.append((tiers[i], candidate))
            if i > 0:
                pairs.append((candidate, tiers[i - 1]))
    return pairs


_REASONS = {"entailed": "entailed_by_positive", "not_contradicted": "not_contradicted_by_positive"}


def choose_negatives(
    tiers: list[str], candidates: list[list[str]], scores: list[dict], max_entailed: float, min_parent: float,
    *, rule: str = "not_entailed", min_contradiction: float = 0.5, chosen_scores: list | None = None,
) -> tuple[list[str] | None, Problem | None]:
    """(one negative per tier, None), or (None, ("no_valid_negative", what failed)) naming the first tier without one.
    `scores` are NLI probabilities for `negative_pairs(tiers, candidates)`, in that order; `rule` and
    its thresholds are NliDecision's. `chosen_scores`, when given, receives per chosen negative its
    contradiction and entailment against the positive and its entailment of the parent tier."""
    decision = NliDecision(rule, min_contradiction, max_entailed)
    scores = iter(scores)
    chosen, judged = [], []
    for i, options in enumerate(candidates):
        best, best_score, reasons = None, None, Counter()
        for candidate in options:
            against_positive = next(scores)
            parent = next(scores)["entailment"] if i > 0 else 1.0
            problem = decision.problem(against_positive)
            if problem:
                reasons[_REASONS[problem[0]]] += 1
            elif parent < min_parent:
                reasons["does_not_entail_parent"] += 1
            elif best is None or against_positive["contradiction"] > best_score["contradiction"]:
                best, best_score = candidate, {"contradiction": against_positive["contradiction"], "entailment": against_positive["entailment"], "parent_entailment": parent}
        if best is None:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "no candidates"
            return None, ("no_valid_negative", f"tier {i + 1} ({tiers[i]!r}): {why}")
        chosen.append(best)
        judged.append(best_score)
    if chosen_scores is not None:
        chosen_scores.extend(judged)
    return chosen, None


class HierarcapsNegativesStage(NliChainStage):
    name = "hierarcaps-negatives"

    def check(self, config: Config) -> None:
        s = config.hierarcaps
        try:
            NliDecision(s.negative_nli_rule, s.min_negative_contradiction, s.max_negative_entailment)
        except FgdataError as exc:
            raise FgdataError(f"hierarcaps.negative_nli_rule: {exc}") from None
        super().check(config)

    def plan_shard(self, path: Path, config: Config) -> WorkUnit:
        if "negative_candidates" not in read_shard_schema(path).names:
            raise FgdataError(f"{path}: no negative_candidates column (give the output of `fgdata hierarcaps generate`, or of filter after it)")
        return super().plan_shard(path, config)

    def process(self, unit: WorkUnit, config: Config, model: NliScorer | None = None, prepared: Iterable | None = None) -> ShardResult:
        s = config.hierarcaps
        kept, rejects, counters, rows_in = [], [], Counter(), 0
        for rows in prepared:
            rows_in += len(rows)
            per_row = [negative_pairs(row["tiers"], row["negative_candidates"] or [[] for _ in row["tiers"]]) for row in rows]
            flat = [pair for pairs in per_row for pair in pairs]
            scores = model.score(flat) if flat else []
            offset = 0
            for row, pairs in zip(rows, per_row):
                row_scores, offset = scores[offset : offset + len(pairs)], offset + len(pairs)
                candidates = row["negative_candidates"] or [[] for _ in row["tiers"]]
                judged: list[dict] = []
                negatives, problem = choose_negatives(
                    row["tiers"], candidates, row_scores, s.max_negative_entailment, s.min_entailment,
                    rule=s.negative_nli_rule, min_contradiction=s.min_negative_contradiction, chosen_scores=judged,
                )
                counters["nli_pairs"] += len(pairs)
                if problem:
                    rejects.append(reject(row["key"], problem, unit.payload["path"]))
                else:
                    kept.append({**row, "negative_tiers": negatives, "negative_nli": judged})
        return ShardResult(
            rows_in=rows_in, table=conform(kept, "hierarcaps"), rejects=rejects, counters=counters,
            provenance={"nli_model": model.name, "negative_nli_rule": s.negative_nli_rule, "random_weights": model.is_random},
        )
