"""`fgdata hierarcaps filter`: keep a chain only if every tier is entailed by the next one (NLI).

The more specific tier is the premise and the more generic one the hypothesis; a chain that
fails is rejected with the failing tier and its score. (Negative chains are not checked
here: that is `fgdata hierarcaps negatives`, which shares this stage's NLI plumbing.)
"""

from __future__ import annotations

from typing import Iterable

from pipeline.config import Config
from pipeline.core.schemas import conform
from pipeline.datasets.chains import chain_nli_problem, entailment_pairs
from pipeline.models.nli import NliScorer
from pipeline.stages.base import ShardResult, WorkUnit, reject
from pipeline.stages.hierarcaps.nli_chain import NliChainStage


class HierarcapsFilterStage(NliChainStage):
    name = "hierarcaps-filter"

    def process(self, unit: WorkUnit, config: Config, model: NliScorer | None = None, prepared: Iterable | None = None) -> ShardResult:
        threshold = config.hierarcaps.min_entailment
        kept, rejects, rows_in = [], [], 0
        for rows in prepared:
            rows_in += len(rows)
            pairs = [pair for row in rows for pair in entailment_pairs(row["tiers"])]
            scores = iter(model.score(pairs)) if pairs else iter(())
            for row in rows:
                entailment = [next(scores)["entailment"] for _ in range(len(row["tiers"]) - 1)]
                problem = chain_nli_problem(row["tiers"], entailment, threshold)
                if problem:
                    rejects.append(reject(row["key"], problem, unit.payload["path"]))
                    continue
                kept.append({**row, "entailment": entailment})
        return ShardResult(rows_in=rows_in, table=conform(kept, "hierarcaps"), rejects=rejects, provenance={"nli_model": model.name, "random_weights": model.is_random})
