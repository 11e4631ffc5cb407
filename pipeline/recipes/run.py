"""Runs a recipe as one job. On Ray, every step's shards go through one scheduling loop: a step
that maps shard N to shard N (`Stage.streams`) starts shard N as soon as shard N of every step it
reads is done, model steps keep one actor pool for the whole job, and CPU and model steps overlap.
A step that needs its inputs whole (ingest, seed and generate read SOURCE; augment draws examples
from all of its demonstrations; distill trains on all chains; generate waits for the distilled
model) is planned once they are finished. Each step claims OUT/<step> and writes its manifest as
the single-stage command does, so resume works per (step, shard) and every folder is a normal
dataset. The local executor runs the steps one after another in this process."""

from __future__ import annotations

import importlib
import logging
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import ray

from pipeline.config import Config, load_config
from pipeline.core import storage
from pipeline.core.shards import check_output_path, claim_output, hold_output, mark_unfinished, record_planned, shard_markers, shard_path, unit_fingerprint
from pipeline.errors import FgdataError, StageFailed
from pipeline.recipes import SOURCE, STEP_KINDS, Recipe, Step
from pipeline.runner import RunSummary, finished_for_this_input, short_error, ensure_ray, finish_stage, ray_submitter, run_stage
from pipeline.stages.base import Stage, WorkUnit

log = logging.getLogger(__name__)

DISTILL = "hierarcaps-distill"


# stage name -> (module, class, the inputs its constructor takes in order); imported when a step
# needs it, so a recipe that never grounds never imports ultralytics
STAGE_CLASSES = {
    "ingest": ("pipeline.stages.fggrn.ingest", "IngestStage", ("input",)),
    "dedup": ("pipeline.stages.fggrn.dedup", "DedupStage", ("input",)),
    "screen": ("pipeline.stages.fggrn.screen", "ScreenStage", ("input",)),
    "recaption": ("pipeline.stages.fggrn.recaption", "RecaptionStage", ("input",)),
    "phrases": ("pipeline.stages.fggrn.phrases", "PhrasesStage", ("input",)),
    "ground": ("pipeline.stages.fggrn.ground", "GroundStage", ("input", "images")),
    "negatives": ("pipeline.stages.fggrn.negatives", "NegativesStage", ("input",)),
    "hierarcaps-import": ("pipeline.stages.hierarcaps.import_csv", "HierarcapsImportStage", ("input",)),
    "hierarcaps-seed": ("pipeline.stages.hierarcaps.seed", "HierarcapsSeedStage", ("input",)),
    "hierarcaps-augment": ("pipeline.stages.hierarcaps.augment", "HierarcapsAugmentStage", ("input", "demonstrations")),
    "hierarcaps-filter": ("pipeline.stages.hierarcaps.filter", "HierarcapsFilterStage", ("input",)),
    "hierarcaps-generate": ("pipeline.stages.hierarcaps.generate", "HierarcapsGenerateStage", ("input",)),
    "hierarcaps-negatives": ("pipeline.stages.hierarcaps.negatives", "HierarcapsNegativesStage", ("input",)),
}


def make_stage(step: Step, paths: dict[str, list[Path]]) -> Stage | None:
    """The stage a step runs, reading `paths` (input name -> datasets); None for distill, which trains."""
    if step.stage == DISTILL:
        return None
    module, name, inputs = STAGE_CLASSES[step.stage]
    stage_class = getattr(importlib.import_module(module), name)
    return stage_class(*(paths[key][0] for key in inputs))


@dataclass
class StepRun:
    """One step of a running recipe: its stage, settings, output and the state of its shards."""

    step: Step
    stage: Stage | None
    config: Config
    out_dir: Path
    input_dirs: dict[str, list[Path]]
    settings_hash: str = ""
    streams: bool = False
    names: list[str] | None = None  # the shards this step will write, once known
    planned: set[str] = field(default_factory=set)
    fingerprints: dict[str, str] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)
    queue: deque = field(default_factory=deque)
    in_flight: int = 0
    ran: int = 0
    submit: object = None  # the Ray submitter (holding the actor pool) while the step runs
    limit: int = 0
    pool: tuple[float, float] = (0.0, 0.0)  # CPUs and GPUs the step's actors hold
    started: float = 0.0
    summary: RunSummary | None = None
    finished: bool = False


def plan_steps(recipe: Recipe, source: Path, out: Path, config_file: Path | None, overrides: list[str], overwrite: bool, held: ExitStack) -> list[StepRun]:
    """Builds every step, checks its settings, holds its folder (until `held` closes) and claims it,
    before any work."""
    # SOURCE apart from all of OUT, not only from the steps that read it: another step's
    # --overwrite would otherwise delete it
    source, out = storage.resolved(source), storage.location(out)  # a bad URI is its own error, not an overlap
    out = check_output_path(out, [source])  # its messages name what is wrong: a symlink, a file, a bucket, an overlap
    runs: list[StepRun] = []
    for step in recipe.steps:
        paths = {key: [source if ref == SOURCE else out / ref for ref in refs] for key, refs in step.inputs.items()}
        implied = [f"{setting}={paths[key][0]}" for key, setting in STEP_KINDS[step.stage].settings.items()]
        try:
            config = load_config(config_file, [*implied, *step.overrides, *overrides])
        except FgdataError as exc:
            raise FgdataError(f"step {step.name!r}: {exc}") from None
        # every folder held before any is claimed: a step another run holds stops the recipe before
        # --overwrite deletes anything
        held.enter_context(hold_output(out / step.name, config.run.lock_stale_s))
        stage = make_stage(step, paths)
        run = StepRun(step=step, stage=stage, config=config, out_dir=out / step.name, input_dirs=paths)
        if stage is not None:
            run.config = stage.resolve(config)
            # streams only from other steps: SOURCE is whole from the start
            run.streams = stage.streams and SOURCE not in {ref for refs in step.inputs.values() for ref in refs}
            if run.streams:
                stage.check(run.config)
            run.settings_hash = run.config.sections_hash(stage.config_sections)
        runs.append(run)
    for run in runs:
        if run.stage is not None:
            inputs = [p for value in run.input_dirs.values() for p in value]
            run.out_dir = claim_output(run.out_dir, run.stage.name, run.settings_hash, overwrite, inputs=inputs)
            run.stage.output_dir = run.out_dir  # where a stage that `plans_in_output` keeps its planning's work
            mark_unfinished(run.out_dir)
    return runs


def run_recipe(recipe: Recipe, source: Path, out: Path, config_file: Path | None = None, overrides: list[str] | None = None, overwrite: bool = False) -> list[RunSummary]:
    started = time.perf_counter()
    with ExitStack() as held:
        runs = plan_steps(recipe, source, out, config_file, list(overrides or []), overwrite, held)
        executor = runs[0].config.run.executor
        if executor == "local":
            summaries = [s for s in map(_run_whole, runs) if s]
        else:
            summaries = _Scheduler(runs).run()
    log.info("recipe %s: %d steps in %.1fs", recipe.name, len(runs), time.perf_counter() - started)
    return summaries


def _run_whole(run: StepRun) -> RunSummary | None:
    """One step in this process, as its single-stage command runs it."""
    if run.stage is None:
        _distill(run)
        return None
    return run_stage(run.stage, run.out_dir, run.config)


def _distill(run: StepRun) -> dict:
    from pipeline.train.distill import distill

    return distill(run.input_dirs["input"], run.out_dir, run.config.distill, progress=run.config.run.progress)


class _Scheduler:
    """The Ray loop: plans shards as their inputs finish, submits them (downstream steps first, so
    finished rows leave the pipeline early), and finishes a step once all its shards are done."""

    def __init__(self, runs: list[StepRun]):
        self.runs = runs
        self.by_name = {run.step.name: run for run in runs}
        self.in_flight: dict = {}  # ref -> (run, shard name, on_done)

    def run(self) -> list[RunSummary]:
        ensure_ray(self.runs[0].config.run)
        while True:
            for run in self.runs:
                self._advance(run)
            self._submit()
            if not self.in_flight:
                break
            ready, _ = ray.wait(list(self.in_flight), num_returns=1)
            self._collect(ready[0])
        failed = next((run for run in self.runs if run.failures), None)
        if failed:
            waiting = [run.step.name for run in self.runs if not run.finished and run is not failed]
            note = f" (not finished, rerun to resume: {', '.join(waiting)})" if waiting else ""
            raise StageFailed(f"{failed.step.name}{note}", failed.failures)
        stuck = [run.step.name for run in self.runs if not run.finished]
        if stuck:
            raise FgdataError(f"recipe steps {', '.join(stuck)} could not start: their inputs never finished")
        return [run.summary for run in self.runs if run.summary]

    def _inputs_finished(self, run: StepRun) -> bool:
        return all(self.by_name[name].finished for name in run.step.upstream())

    def _advance(self, run: StepRun) -> None:
        if run.finished or any(self.by_name[name].failures for name in run.step.upstream()):
            return
        if run.names is None:
            if run.streams:
                source = self.by_name[run.step.inputs["input"][0]]
                if source.names is None:
                    return
                # no return: on a rerun every shard may be done already, and the step finishes below
                self._plan_ready_shards(run, source.names)
            elif not self._inputs_finished(run):
                return
            elif run.stage is None:
                self._start_distill(run)
                return
            else:
                self._plan_whole(run)
        elif run.streams and len(run.planned) < len(run.names):
            self._plan_ready_shards(run, run.names)
        if run.names is not None and run.stage is not None and not run.queue and not run.in_flight and len(run.planned) == len(run.names):
            if len(run.done) + len(run.failures) == len(run.names) and not run.failures and self._inputs_finished(run):
                self._finish(run)

    def _plan_whole(self, run: StepRun) -> None:
        units = run.stage.plan(run.config)
        shared = run.stage.plan_fingerprint()
        run.fingerprints = {u.name: unit_fingerprint(run.settings_hash, u.name, u.payload, shared) for u in units}
        run.done = finished_for_this_input(run.out_dir, run.fingerprints)
        run.names, run.planned, run.started = [u.name for u in units], {u.name for u in units}, time.perf_counter()
        record_planned(run.out_dir, len(units))
        run.queue.extend(u for u in units if u.name not in run.done)

    def _plan_ready_shards(self, run: StepRun, names: list[str]) -> None:
        """Plans the shards whose inputs are all done. The first time, also takes the shards an earlier
        run of the recipe finished (their inputs were done then, so they are planned now)."""
        first = run.names is None
        if first:
            run.names, run.started = list(names), time.perf_counter()
            record_planned(run.out_dir, len(names))
            stale = sorted(set(shard_markers(run.out_dir)) - set(names))
            if stale:
                raise FgdataError(f"{run.out_dir} holds a finished shard {stale[0]} that the input no longer has; rerun with --overwrite to redo it")
        upstream = [self.by_name[name] for name in run.step.upstream()]
        source_dir = run.input_dirs["input"][0]
        units: list[WorkUnit] = []
        for name in run.names:
            if name not in run.planned and all(name in up.done for up in upstream):
                unit = run.stage.plan_shard(shard_path(source_dir, name), run.config)
                run.fingerprints[name] = unit_fingerprint(run.settings_hash, name, unit.payload, run.stage.plan_fingerprint())
                run.planned.add(name)
                units.append(unit)
        if first:
            run.done = finished_for_this_input(run.out_dir, run.fingerprints)
        run.queue.extend(u for u in units if u.name not in run.done)

    def _submit(self) -> None:
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        # Pools start upstream first, so a step's model never waits behind the models of the steps
        # it feeds (they would wait for its shards forever); shards go downstream first, so
        # finished rows leave the pipeline early.
        for run in self.runs:
            if run.queue and run.submit is None and not self._start_pool(run, cpus, gpus) and self._release_idle_pools_after(run):
                self._start_pool(run, cpus, gpus)
        for run in reversed(self.runs):
            while run.submit is not None and run.queue and run.in_flight < run.limit:
                unit = run.queue.popleft()
                ref, on_done = run.submit(unit)
                self.in_flight[ref] = (run, unit.name, on_done)
                run.in_flight += 1
                run.ran += 1

    def _release_idle_pools_after(self, run: StepRun) -> bool:
        """Drops the actor pools of downstream steps with nothing to do, so `run` can start its own
        (they start again when more of their shards are ready)."""
        idle = [r for r in self.runs[self.runs.index(run) + 1 :] if r.submit is not None and r.pool != (0.0, 0.0) and not r.queue and not r.in_flight]
        for r in idle:
            log.info("%s: its model actors stop while %s needs the room", r.step.name, run.step.name)
            r.submit, r.pool = None, (0.0, 0.0)
        return bool(idle)

    def _start_pool(self, run: StepRun, cpus: float, gpus: float) -> bool:
        """Starts the step's submitter. A model step's actors start only while the CPUs and GPUs
        left, after the pools already running and one CPU task, hold them; otherwise the step waits
        for an earlier pool to finish (taking those would starve the steps that feed this one)."""
        if run.stage.uses_model:
            pool = run.stage.pool(gpus, run.config, cpus)
            need = (pool.actors * pool.cpus_per_actor, pool.actors * pool.gpus_per_actor)
            held = [sum(r.pool[i] for r in self.runs if r.submit is not None) for i in (0, 1)]
            busy = any(r.submit is not None for r in self.runs if r.stage is not None and r.stage.uses_model)
            if busy and (held[0] + need[0] + run.config.run.cpus_per_task > cpus or held[1] + need[1] > gpus):
                return False
            run.pool = need
        run.submit, run.limit = ray_submitter(run.stage, run.out_dir, run.config, run.fingerprints)
        return True

    def _start_distill(self, run: StepRun) -> None:
        run.names, run.planned = [], set()
        gpu = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(_distill).options(num_cpus=run.config.run.cpus_per_task, num_gpus=gpu, name="fgdata-hierarcaps-distill")
        self.in_flight[task.remote(run)] = (run, None, None)
        run.in_flight += 1

    def _collect(self, ref) -> None:
        run, name, on_done = self.in_flight.pop(ref)
        run.in_flight -= 1
        if on_done:
            on_done()
        try:
            ray.get(ref)
            if name is None:  # distill
                run.finished = True
                log.info("%s: finished", run.step.name)
                return
            run.done.add(name)
        except Exception as exc:  # noqa: BLE001 - any shard failure is reported, the rest go on
            run.failures[name or run.step.name] = short_error(exc)
            log.error("%s: shard %s failed after retries: %s", run.step.name, name, run.failures[name or run.step.name])

    def _finish(self, run: StepRun) -> None:
        run.submit = None  # drops the actor pool: its models leave the GPUs and CPUs for later steps
        run.pool = (0.0, 0.0)
        run.summary = finish_stage(
            run.stage, run.config, run.out_dir, run.settings_hash, run.fingerprints, dict(run.failures),
            started=run.started, lineage=run.stage.lineage(), executor="ray", shards_run=run.ran,
        )
        run.finished = True
        log.info("%s: finished, %d shard(s) (%d run)", run.step.name, len(run.names), run.ran)
