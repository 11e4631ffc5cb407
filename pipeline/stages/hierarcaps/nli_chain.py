"""What `hierarcaps filter` and `hierarcaps negatives` share: an NLI cross-encoder over the chains of hierarcaps shards."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.core.shards import lineage_entry, shard_rows
from pipeline.core.storage import resolved
from pipeline.models.nli import NliScorer
from pipeline.models.reference import check_model_reference
from pipeline.stages.base import ModelStage, WorkUnit


class NliChainStage(ModelStage):
    """An NLI cross-encoder (hierarcaps.nli_model) over the chains of hierarcaps shards, shard N to shard N."""

    output_kind = "hierarcaps"
    config_section = "hierarcaps"
    model_settings = ("nli_model",)

    def __init__(self, input_dir: Path):
        self.input_dir = resolved(input_dir)  # a local path or a URI

    def plan(self, config: Config) -> list[WorkUnit]:
        return self.plan_each_shard(self.input_dir, config)

    def check(self, config: Config) -> None:
        check_model_reference(config.hierarcaps.nli_model, revision=None, trust_remote_code=False)

    def plan_shard(self, path: Path, config: Config) -> WorkUnit:
        return WorkUnit(path.name, {"path": str(path), "rows": shard_rows(path)})

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.input_dir)]

    def load_model(self, config: Config) -> NliScorer:
        return NliScorer(config.hierarcaps.nli_model)
