"""What `hierarcaps filter` and `hierarcaps negatives` share: an NLI cross-encoder over the chains of hierarcaps shards."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.core.shards import lineage_entry, list_shards, read_shard
from pipeline.models.nli import NliScorer
from pipeline.models.reference import absolute_local_paths, check_model_reference
from pipeline.stages.base import ModelPool, Stage, WorkUnit, model_pool, row_batches


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
