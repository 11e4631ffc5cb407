"""`fgdata hierarcaps filter`: keep a chain only if every tier is entailed by the next one (NLI).

The more specific tier is the premise and the more generic one the hypothesis; a chain that
fails is rejected with the failing tier and its score. (Negative chains are not checked
here: that is `fgdata hierarcaps negatives`, which shares this stage's NLI plumbing.)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.hierarchy import chain_nli_problem, entailment_pairs
from pipeline.models.nli import NliScorer
from pipeline.models.reference import absolute_local_paths, check_model_reference
from pipeline.schemas import conform
from pipeline.shards import lineage_entry, list_shards, read_shard
from pipeline.stages.base import ModelPool, ShardResult, Stage, WorkUnit, model_pool, row_batches


class NliChainStage(Stage):
    """An NLI cross-encoder (hierarcaps.nli_model) over the chains of hierarcaps shards, shard N to shard N."""

    output_kind = "hierarcaps"
    config_section = "hierarcaps"
    uses_model = True

    def __init__(self, input_dir: Path):
        self.input_dir = Path(input_dir).resolve()

    def plan(self, config: Config) -> list[WorkUnit]:
        settings = config.hierarcaps
        absolute_local_paths(settings, "nli_model")
        check_model_reference(settings.nli_model, revision=None, trust_remote_code=False)
        return [WorkUnit(p.name, {"path": str(p), "rows": pq.read_metadata(p).num_rows}) for p in list_shards(self.input_dir)]

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.input_dir)]

    def pool(self, cluster_gpus: float, config: Config) -> ModelPool:
        return model_pool(config.hierarcaps, cluster_gpus)

    def load_model(self, config: Config) -> NliScorer:
        return NliScorer(config.hierarcaps.nli_model)

    def prepared_batches(self, unit: WorkUnit, config: Config) -> int:
        return max(1, math.ceil(unit.payload["rows"] / config.hierarcaps.batch_size))

    def prepare(self, unit: WorkUnit, config: Config) -> list[list[dict]]:
        return row_batches(read_shard(Path(unit.payload["path"])).to_pylist(), config.hierarcaps.batch_size)



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
                failing = chain_nli_problem(entailment, threshold)
                if failing:
                    tier, score = failing
                    detail = f"tier {tier + 2} ({row['tiers'][tier + 1]!r}) entails tier {tier + 1} ({row['tiers'][tier]!r}) with only {score:.2f} < {threshold}"
                    rejects.append({"key": row["key"], "reason": "not_entailed", "detail": detail, "source": unit.payload["path"]})
                    continue
                kept.append({**row, "entailment": entailment})
        return ShardResult(rows_in=rows_in, table=conform(kept, "hierarcaps"), rejects=rejects, provenance={"nli_model": model.name, "random_weights": model.is_random})
