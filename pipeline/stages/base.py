"""What a stage is, and `run_shard`, the one function every executor calls for one shard."""

from __future__ import annotations

import dataclasses
import math
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa

from pipeline.config import Config
from pipeline.core.shards import list_shards, read_shard, write_shard
from pipeline.models.generation import Sampling
from pipeline.models.reference import resolve_local_paths

# What every per-row check returns: None when the row is fine, else (reason, detail). `reason` is
# machine-readable (it names the `rejected_<reason>` counter), `detail` says what a person checks.
Problem = tuple[str, str]


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


def reject(key: str, problem: Problem, source: str) -> dict:
    """The reject row for a row a check turned down: the one place reject rows are built."""
    reason, detail = problem
    return {"key": key, "reason": reason, "detail": detail, "source": source}


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
    # ModelStage: `process` runs in a pool of Ray actors that load the model once
    # (`load_model`), fed with batches that `prepare` builds in CPU tasks beforehand.
    uses_model: bool = False
    # A stage whose planning keeps work in its output for a rerun (dedup's pass-1 hashes) is planned
    # once OUT is held and claimed, with `output_dir` set to it; `check_input` runs before the claim,
    # so bad input still stops the run before --overwrite deletes anything. Planned without an
    # output_dir (None), it keeps nothing.
    plans_in_output: bool = False
    output_dir: Any = None

    @abstractmethod
    def plan(self, config: Config) -> list[WorkUnit]: ...

    @abstractmethod
    def process(self, unit: WorkUnit, config: Config, model: Any = None, prepared: Iterable | None = None) -> ShardResult: ...

    @property
    def config_sections(self) -> tuple[str, ...]:
        return (self.config_section, *self.extra_config_sections)

    def resolve(self, config: Config) -> Config:
        """The settings as this run uses them (e.g. local model paths made absolute), as a new Config:
        the runner calls it before hashing, so the hash covers what the workers see, and neither
        `resolve` nor `plan` ever changes the Config they are given."""
        return config

    def plan_fingerprint(self) -> str:
        """What `plan` decided beyond the work units that still shapes every shard (e.g. the
        demonstrations drawn for augment); part of every shard's fingerprint."""
        return ""

    # A stage that maps input shard N to output shard N plans one input shard at a time
    # (`plan_shard`, after the checks of `check`), so a recipe can start shard N here as soon as
    # shard N upstream is done. A stage without them (ingest, seed, augment) plans its input whole.
    def check(self, config: Config) -> None:
        """What `plan` checks before reading any input shard (models, prompts, settings)."""

    def check_input(self, config: Config) -> None:
        """What `plan` checks of its input before any work: for a stage that `plans_in_output`, run
        before OUT is claimed."""
        self.check(config)

    def plan_shard(self, path: Path, config: Config) -> WorkUnit:
        """The work unit for one input shard, checked as `plan` checks each."""
        raise NotImplementedError(f"{self.name} plans its input whole")

    def plan_each_shard(self, input_dir: Path, config: Config) -> list[WorkUnit]:
        """`check`, then `plan_shard` for every shard of `input_dir`: the whole `plan` of a stage that
        maps shard N to shard N and checks nothing more when it has all of its input."""
        self.check(config)
        return [self.plan_shard(path, config) for path in list_shards(input_dir)]

    @property
    def streams(self) -> bool:
        return type(self).plan_shard is not Stage.plan_shard

    @abstractmethod
    def lineage(self) -> list[dict]:
        """The inputs this dataset descends from, recorded in the manifest."""


class ModelStage(Stage):
    """A stage whose rows go through a model held by a pool of actors (`uses_model`).

    Everything here reads the stage's own config section (`settings`, a ModelStageSettings) and a
    unit payload with the input shard's "path" and "rows"; a stage overrides only what differs
    (`read_rows` for another input, `prepare` for decoded batches, `gpus_per_replica`).
    """

    uses_model = True
    # Settings of the section that name a model (hub id or local path): local ones become absolute
    # in `resolve`, so actors on other nodes or in another working directory find the same files.
    model_settings: tuple[str, ...] = ()

    @abstractmethod
    def load_model(self, config: Config) -> Any:
        """The model `process` gets, loaded once per actor (or once per in-process run)."""

    def settings(self, config: Config):
        return getattr(config, self.config_section)

    def resolve(self, config: Config) -> Config:
        settings = self.settings(config)
        resolved = resolve_local_paths(settings, *self.model_settings)
        return config if resolved == settings else dataclasses.replace(config, **{self.config_section: resolved})

    def gpus_per_replica(self, config: Config) -> int:
        """GPUs one model replica spans (a tensor-parallel group)."""
        return 1

    def pool(self, cluster_gpus: float, config: Config, cluster_cpus: float = 0.0) -> ModelPool:
        return model_pool(self.settings(config), cluster_gpus, gpus_per_replica=self.gpus_per_replica(config))

    def prepared_batches(self, unit: WorkUnit, config: Config) -> int:
        """How many batches `prepare` returns for `unit` (at least 1: Ray's num_returns)."""
        return max(1, math.ceil(unit.payload["rows"] / self.settings(config).batch_size))

    def read_rows(self, unit: WorkUnit, config: Config) -> list[dict]:
        return read_shard(unit.payload["path"]).to_pylist()

    def prepare(self, unit: WorkUnit, config: Config) -> list:
        return row_batches(self.read_rows(unit, config), self.settings(config).batch_size)


class GeneratorStage(ModelStage):
    """A model stage whose model is its section's LLM or VLM (a GeneratorSettings section)."""

    model_settings = ("model",)

    def gpus_per_replica(self, config: Config) -> int:
        settings = self.settings(config)
        return settings.tensor_parallel_size if settings.backend == "vllm" else 1

    def sampling(self, config: Config) -> Sampling:
        settings = self.settings(config)
        return Sampling(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed)

    def load_generator(self, config: Config, loader):
        """The section's model through `loader` (a registry function: text or image+text)."""
        s = self.settings(config)
        return loader(s.backend, s.model, revision=s.revision, trust_remote_code=s.trust_remote_code, dtype=s.dtype, tensor_parallel_size=s.tensor_parallel_size)


_END = object()


def _timed(batches: Iterable, timings: Counter) -> Iterator:
    """`batches`, adding the time spent getting each one (decoding it, or waiting for the CPU task that
    does) to timings["prepare_s"]."""
    batches = iter(batches)
    while True:
        started = time.perf_counter()
        batch = next(batches, _END)
        timings["prepare_s"] += time.perf_counter() - started
        if batch is _END:
            return
        yield batch


def run_shard(
    stage: Stage, unit: WorkUnit, out_dir: str, config: Config, model: Any = None, prepared: Iterable | None = None, marker: str = ""
) -> dict:
    """Processes one unit and writes its shard. A model stage given no `prepared` batches (an
    in-process run) prepares them here. The stats time the shard: `seconds` in all, and in
    `timings` its parts: for a model stage prepare_s (getting the batches), model_s (the rest of
    `process`: the model and the row checks) and write_s; for a CPU stage process_s and write_s."""
    started = time.perf_counter()
    timings: Counter = Counter()
    if stage.uses_model:
        prepared = _timed(prepared if prepared is not None else _lazy_prepare(stage, unit, config), timings)
    result = stage.process(unit, config, model=model, prepared=prepared)
    work = "model_s" if stage.uses_model else "process_s"
    timings[work] = time.perf_counter() - started - timings["prepare_s"]
    rows_out, rows_rejected = result.table.num_rows, len(result.rejects)
    if result.rows_in != rows_out + rows_rejected:
        raise RuntimeError(
            f"{stage.name} lost rows in {unit.name}: {result.rows_in} in, {rows_out} out, {rows_rejected} rejected"
        )
    rejected = Counter(f"rejected_{r['reason']}" for r in result.rejects)
    written = time.perf_counter()

    def stats() -> dict:  # made once data and rejects are written, so the writing is timed too
        now = time.perf_counter()
        timings["write_s"] = now - written
        return {
            "shard": unit.name,
            "rows_in": result.rows_in,
            "rows_out": rows_out,
            "rows_rejected": rows_rejected,
            "counters": dict(result.counters + rejected),
            "provenance": result.provenance,
            # the whole rounded up and its parts down, so the parts never add up to more than `seconds`
            "seconds": math.ceil((now - started) * 1e4) / 1e4,
            "timings": {name: math.floor(value * 1e4) / 1e4 for name, value in timings.items()},
        }

    return write_shard(out_dir, unit.name, result.table, stage.output_kind, result.rejects, stats, marker=marker)


def _lazy_prepare(stage: Stage, unit: WorkUnit, config: Config) -> Iterator:
    yield from stage.prepare(unit, config)
