"""`fgdata hierarcaps import`: an official HierarCaps CSV → hierarcaps shards (so it can be evaluated)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.core.schemas import conform
from pipeline.core.shards import shard_name
from pipeline.core.storage import resolved
from pipeline.datasets.hierarcaps_csv import read_official_csv
from pipeline.stages.base import ShardResult, Stage, WorkUnit


class HierarcapsImportStage(Stage):
    name = "hierarcaps-import"
    output_kind = "hierarcaps"
    config_section = "ingest"  # rows_per_shard decides the output

    def __init__(self, csv_path: Path):
        self.csv_path = resolved(csv_path)  # a local path or a URI

    def plan(self, config: Config) -> list[WorkUnit]:
        # The whole file is judged here, on the driver: a bad row or a repeated id is a reject
        # before any shard runs, so no shard can fail for it (and no rerun can fail the same way).
        _, rows, rejects = read_official_csv(self.csv_path)
        items = [("row", r) for r in rows] + [("reject", r) for r in rejects]
        items.sort(key=lambda item: item[1]["key"])
        size = config.ingest.rows_per_shard
        return [WorkUnit(shard_name(i), items[start : start + size]) for i, start in enumerate(range(0, max(len(items), 1), size))]

    def lineage(self) -> list[dict]:
        return [{"path": str(self.csv_path), "format": "hierarcaps-csv"}]

    def process(self, unit: WorkUnit, config: Config, model=None, prepared=None) -> ShardResult:
        rows = [item for kind, item in unit.payload if kind == "row"]
        rejects = [item for kind, item in unit.payload if kind == "reject"]
        return ShardResult(rows_in=len(unit.payload), table=conform(rows, "hierarcaps"), rejects=rejects)
