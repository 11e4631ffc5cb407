"""What a stage is, and `run_shard`, the one function every executor calls for one shard."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from pipeline.config import Config
from pipeline.core.shards import write_shard


@dataclass(frozen=True)
class WorkUnit:
    """One output shard's worth of work: `name` is the output shard, `payload` what to read."""

    name: str
    payload: Any


@dataclass(frozen=True)
class ModelPool:
    actors: int
    gpus_per_actor: float
    cpus_per_actor: float


def row_batches(rows: list, size: int) -> list[list]:
    """`rows` in batches of `size`; one empty batch for no rows, so a shard always has a batch."""
    return [rows[i : i + size] for i in range(0, max(len(rows), 1), size)]


def model_pool(settings, cluster_gpus: float, gpus_per_replica: int = 1) -> ModelPool:
    """`settings.num_actors` model replicas, or as many as the GPUs hold (one without GPUs), each
    on `gpus_per_replica` GPUs (a tensor-parallel group) when there are GPUs."""
    gpus = float(gpus_per_replica) if cluster_gpus >= 1 else 0.0
    actors = settings.num_actors or (max(1, int(cluster_gpus // gpus)) if gpus else 1)
    return ModelPool(actors=actors, gpus_per_actor=gpus, cpus_per_actor=settings.cpus_per_actor)


@dataclass
class ShardResult:
    rows_in: int
    table: pa.Table
    rejects: list[dict] = field(default_factory=list)  # key, reason, detail, source
    counters: Counter = field(default_factory=Counter)  # stage-specific named counts
    provenance: dict = field(default_factory=dict)  # models and versions that made the rows


class Stage(ABC):
    """A step that maps work units to shards of `output_kind`.

    `plan` runs on the driver and must reject bad input before any work starts; `process`
    runs on a Ray worker, is deterministic for a unit, and never raises for a bad row (it
    rejects the row instead).
    """

    name: str
    output_kind: str
    config_section: str
    # Other sections whose settings also decide the output (all of them go into the run's hash).
    extra_config_sections: tuple[str, ...] = ()
    # Model stages run `process` in a pool of Ray actors that load the model once
    # (`load_model`), fed with batches that `prepare` builds in CPU tasks beforehand.
    uses_model: bool = False

    @abstractmethod
    def plan(self, config: Config) -> list[WorkUnit]: ...

    @abstractmethod
    def process(self, unit: WorkUnit, config: Config, model: Any = None, prepared: Iterable | None = None) -> ShardResult: ...

    @property
    def config_sections(self) -> tuple[str, ...]:
        return (self.config_section, *self.extra_config_sections)

    def plan_fingerprint(self) -> str:
        """What `plan` decided beyond the work units that still shapes every shard (e.g. the
        demonstrations drawn for augment); part of every shard's fingerprint."""
        return ""

    def load_model(self, config: Config) -> Any:
        raise NotImplementedError(f"{self.name} does not use a model")

    def prepared_batches(self, unit: WorkUnit, config: Config) -> int:
        """How many batches `prepare` returns for `unit` (at least 1)."""
        raise NotImplementedError(f"{self.name} does not use a model")

    def prepare(self, unit: WorkUnit, config: Config) -> list:
        raise NotImplementedError(f"{self.name} does not use a model")

    def pool(self, cluster_gpus: float, config: Config) -> "ModelPool":
        raise NotImplementedError(f"{self.name} does not use a model")

    @abstractmethod
    def lineage(self) -> list[dict]:
        """The inputs this dataset descends from, recorded in the manifest."""


def run_shard(
    stage: Stage, unit: WorkUnit, out_dir: str, config: Config, model: Any = None, prepared: Iterable | None = None, marker: str = ""
) -> dict:
    started = time.perf_counter()
    result = stage.process(unit, config, model=model, prepared=prepared)
    rows_out, rows_rejected = result.table.num_rows, len(result.rejects)
    if result.rows_in != rows_out + rows_rejected:
        raise RuntimeError(
            f"{stage.name} lost rows in {unit.name}: {result.rows_in} in, {rows_out} out, {rows_rejected} rejected"
        )
    rejected = Counter(f"rejected_{r['reason']}" for r in result.rejects)
    stats = {
        "shard": unit.name,
        "rows_in": result.rows_in,
        "rows_out": rows_out,
        "rows_rejected": rows_rejected,
        "counters": dict(result.counters + rejected),
        "provenance": result.provenance,
        "seconds": round(time.perf_counter() - started, 4),
    }
    write_shard(Path(out_dir), unit.name, result.table, stage.output_kind, result.rejects, stats, marker=marker)
    return stats
