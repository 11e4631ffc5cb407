"""Runs a stage: planning, claiming the output, resume and the manifest are shared; the shards
run on an executor, Ray (tasks and model actor pools, local or a cluster) or this process (one
shard after another, no Ray). Both call the same `run_shard`, so they write the same shards."""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterator

import ray
from tqdm import tqdm

from pipeline import __version__
from pipeline.config import Config, RunConfig
from pipeline.core.shards import (
    DONE_DIR,
    MANIFEST_FILE,
    STATS_DIR,
    check_output_path,
    claim_output,
    hold_output,
    mark_finished,
    mark_unfinished,
    read_json,
    record_planned,
    shard_markers,
    unfinished_reason,
    unit_fingerprint,
    write_json,
)
from pipeline.core.scoped import torch_threads
from pipeline.core.storage import location
from pipeline.datasets.datacard import write_datacard
from pipeline.errors import FgdataError, StageFailed, first_line
from pipeline.stages.base import Stage, run_shard

log = logging.getLogger(__name__)

# Recorded in every manifest, None when not installed (vllm is an optional extra).
_REPORTED_PACKAGES = ("torch", "transformers", "ultralytics", "vllm", "ray", "pyarrow", "spacy", "pandas", "pillow", "typer")


@dataclass
class RunSummary:
    out_dir: Path
    shards_total: int
    shards_run: int
    shards_skipped: int
    rows_in: int
    rows_out: int
    rows_rejected: int
    seconds: float


_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _quiet_token_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def ensure_ray(run: RunConfig) -> None:
    """Starts local Ray, or joins the cluster named by RAY_ADDRESS; reuses a running session."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        problem = ray_address_problem(address)
        if problem is None:
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except ConnectionError as exc:  # Ray's own "Failed to connect to Ray cluster at ..."
                problem = first_line(exc)
                if "RAY_AUTH_MODE" not in os.environ:
                    # Ray 2.5x starts clusters with token authentication, and a driver sends its token
                    # only when the mode is set before Ray loads (plain `ray.init` fails the same way)
                    problem += "; if the cluster uses Ray's token authentication (its default), export RAY_AUTH_MODE=token"
        if problem:
            raise FgdataError(f"cannot use the Ray cluster at {address} (RAY_ADDRESS): {problem}")
    else:
        # Ray 2.5x turns token authentication on for every new local cluster and says so at each
        # start. Kept on, the notice is dropped: RAY_AUTH_MODE=token set here, after `import ray`,
        # leaves this driver without the token (its GCS refuses it), and "disabled" would open the
        # cluster to anyone who reaches the node. A user's cluster (RAY_ADDRESS) says what it says.
        logging.getLogger(_RAY_AUTH_LOGGER).addFilter(_quiet_token_notice)
        # "local" always starts a fresh instance: without it Ray would silently join a cluster
        # left by an earlier `ray start` on this machine.
        ray.init(address="local", num_cpus=run.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    resources = ray.cluster_resources()
    log.info(
        "Ray %s: %d node(s), %g CPU(s), %g GPU(s)",
        "cluster" if address else "local",
        sum(node["Alive"] for node in ray.nodes()),  # the GCS still lists nodes that died
        resources.get("CPU", 0),
        resources.get("GPU", 0),
    )


def ray_address_problem(address: str) -> str | None:
    """Why nothing answers at a RAY_ADDRESS of the form host:port, or None. Ray itself waits for a
    cluster's GCS that is not there for minutes (over 5 at a refused port here) before it fails;
    one TCP connection, 5 s at most, tells first. "auto" and ray:// (Ray Client) are Ray's to resolve."""
    if address == "auto" or "://" in address:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return "not host:port (e.g. 10.0.0.1:6379), auto, or ray://host:10001"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:  # refused, unknown host, unreachable, timed out
        return first_line(exc) or type(exc).__name__
    return None


def choose_executor(stage: Stage, config: Config, pending: int) -> str:
    """`run.executor`, with "auto" resolved: this process for a tiny run, Ray for everything else.

    Tiny = at most one shard to do, a stage without a model, no RAY_ADDRESS and no Ray already
    running here: then starting Ray (seconds) costs more than the shard. Model stages stay on Ray
    under auto because their actor pool is what places the model on GPUs (tensor-parallel groups,
    restarts); `--executor local` runs one in this process when asked, e.g. to debug it."""
    if config.run.executor != "auto":
        return config.run.executor
    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return "ray"
    return "local" if pending <= 1 and not stage.uses_model else "ray"


def run_stage(stage: Stage, out_dir: Path, config: Config, overwrite: bool = False) -> RunSummary:
    started = time.perf_counter()
    config = stage.resolve(config)  # before planning and hashing: the hash covers what the workers see
    # a stage that keeps its planning's work in OUT is planned once OUT is claimed, its input checked now
    units = None if stage.plans_in_output else stage.plan(config)
    if units is None:
        stage.check_input(config)
    # The inputs' lineage is read now, in planning, so corrupt or unfinished input stops the run
    # before any shard is written.
    lineage = stage.lineage()
    inputs = [location(entry["path"]) for entry in lineage if entry.get("path")]  # a Path, or a UPath for a URI
    for source in inputs:
        reason = unfinished_reason(source)
        if reason:
            raise FgdataError(f"{source} is not finished: {reason}; rerun the command that writes it before {stage.name}")
    settings_hash = config.sections_hash(stage.config_sections)
    out_dir = check_output_path(out_dir, inputs)  # before the lock, which must never land in an input
    with hold_output(out_dir, config.run.lock_stale_s):
        out_dir = claim_output(out_dir, stage.name, settings_hash, overwrite, inputs=inputs)
        if units is None:
            stage.output_dir = out_dir
            units = stage.plan(config)
        return _run_claimed(stage, units, out_dir, config, settings_hash, started=started, lineage=lineage)


def _run_claimed(stage: Stage, units, out_dir: Path, config: Config, settings_hash: str, *, started: float, lineage: list[dict]) -> RunSummary:
    """run_stage once OUT is held and claimed: the pending shards on an executor, then the manifest."""
    record_planned(out_dir, len(units))
    mark_unfinished(out_dir)
    shared = stage.plan_fingerprint()
    fingerprints = {u.name: unit_fingerprint(settings_hash, u.name, u.payload, shared) for u in units}
    done = finished_for_this_input(out_dir, fingerprints)
    pending = [u for u in units if u.name not in done]
    skipped = len(units) - len(pending)
    if skipped:
        log.info("%s: resuming, %d of %d shards already finished", stage.name, skipped, len(units))
    executor = choose_executor(stage, config, len(pending))
    failures: dict[str, str] = {}
    if pending:
        run_pending = _run_in_process if executor == "local" else _run_on_ray
        failures = run_pending(stage, pending, out_dir, config, len(units), skipped, fingerprints)
    return finish_stage(stage, config, out_dir, settings_hash, fingerprints, failures, started=started, lineage=lineage, executor=executor, shards_run=len(pending))


def finish_stage(
    stage: Stage, config: Config, out_dir: Path, settings_hash: str, fingerprints: dict[str, str], failures: dict[str, str],
    *, started: float, lineage: list[dict], executor: str, shards_run: int,
) -> RunSummary:
    """Once every shard ran: checks each holds this run's marker, then writes the manifest and the
    DATACARD (what `run_stage` and a recipe, for each of its stages, end with)."""
    # A worker of an earlier, killed run can still finish a shard after this run wrote it:
    # only markers carrying this run's fingerprint count.
    markers = shard_markers(out_dir)
    for name, fingerprint in fingerprints.items():
        if name not in failures and markers.get(name) != fingerprint:
            failures[name] = (
                "another run (a worker of an earlier, killed run) wrote this shard after this run did; rerun with --overwrite to redo it"
            )
    if failures:
        raise StageFailed(stage.name, failures)
    stats = {name: read_json(out_dir / STATS_DIR / name.replace(".parquet", ".json")) for name in fingerprints}
    manifest = _manifest(stage, config, settings_hash, stats, time.perf_counter() - started, lineage, executor)
    write_json(out_dir / MANIFEST_FILE, manifest)
    write_datacard(out_dir, manifest)  # the datasheet a person reads, next to the manifest
    mark_finished(out_dir)
    return RunSummary(
        out_dir=out_dir,
        shards_total=len(fingerprints),
        shards_run=shards_run,
        shards_skipped=len(fingerprints) - shards_run,
        rows_in=manifest["rows_in"],
        rows_out=manifest["rows_out"],
        rows_rejected=manifest["rows_rejected"],
        seconds=manifest["timings"]["wall_seconds"],
    )


def finished_for_this_input(out_dir: Path, fingerprints: dict[str, str]) -> set[str]:
    """The shards already done from this very input and settings. A finished shard made from
    another input, or one the input no longer has, would mix two inputs in one dataset: refused."""
    done = set()
    for name, marker in sorted(shard_markers(out_dir).items()):
        if marker != fingerprints.get(name):
            what = "that the input no longer has" if name not in fingerprints else "made from a different input"
            raise FgdataError(
                f"{out_dir} holds a finished shard {name} {what}: the input changed since that run. "
                "Write to a new output directory, or rerun with --overwrite to redo it whole"
            )
        try:
            stats = read_json(out_dir / STATS_DIR / name.replace(".parquet", ".json"))
        except FgdataError:
            stats = None
        if stats is None or not {"rows_in", "rows_out", "rows_rejected", "counters", "provenance", "seconds"} <= set(stats):
            # a damaged stats file: the shard is simply done again
            log.warning("%s: %s has unreadable stats; redoing it", out_dir, name)
            (out_dir / DONE_DIR / f"{name}.done").unlink()
            continue
        done.add(name)
    return done


def _progress(stage: Stage, config: Config, total: int, skipped: int) -> tqdm:
    return tqdm(total=total, initial=skipped, unit="shard", desc=stage.name, disable=not config.run.progress)


def _run_in_process(stage: Stage, pending, out_dir: Path, config: Config, total: int, skipped: int, fingerprints: dict[str, str]) -> dict[str, str]:
    """The local executor: the shards one after another in this process, the model loaded once,
    each failing shard retried `run.max_retries` times as a Ray task would be."""
    log.info("%s: %d shard(s) in this process (executor local)", stage.name, len(pending))
    # the CPUs a Ray actor or task of this stage would have, so both executors give the same numbers
    threads = stage.pool(0.0, config).cpus_per_actor if stage.uses_model else config.run.cpus_per_task
    with torch_threads(threads):
        return _run_units_in_process(stage, pending, out_dir, config, total, skipped, fingerprints)


def _run_units_in_process(stage: Stage, pending, out_dir: Path, config: Config, total: int, skipped: int, fingerprints: dict[str, str]) -> dict[str, str]:
    model = None
    if stage.uses_model:
        try:
            model = stage.load_model(config)
        except Exception as exc:  # noqa: BLE001 - as on Ray, where every shard fails on the dead actor
            reason = short_error(exc)
            log.error("%s: the model did not load: %s", stage.name, reason)
            return {unit.name: reason for unit in pending}
    failures: dict[str, str] = {}
    rows_done, started = 0, time.perf_counter()
    with _progress(stage, config, total, skipped) as bar:
        for unit in pending:
            for attempt in range(config.run.max_retries + 1):
                try:
                    prepared = _prepared_in_process(stage, unit, config) if stage.uses_model else None
                    stats = run_shard(stage, unit, str(out_dir), config, model=model, prepared=prepared, marker=fingerprints[unit.name])
                    rows_done += stats["rows_in"]
                    break
                except Exception as exc:  # noqa: BLE001 - any shard failure is reported, the rest go on
                    if attempt == config.run.max_retries:
                        failures[unit.name] = short_error(exc)
                        log.error("%s: shard %s failed after retries: %s", stage.name, unit.name, failures[unit.name])
            bar.update(1)
            bar.set_postfix(rows_per_s=f"{rows_done / max(time.perf_counter() - started, 1e-9):.1f}", failed=len(failures))
    return failures


def _prepared_in_process(stage: Stage, unit, config: Config) -> Iterator:
    """`prepare`'s batches, held to the count it announced, as Ray's `num_returns` holds them;
    made when first asked for, so run_shard's clock counts the decoding as prepare time."""
    batches = stage.prepare(unit, config)
    expected = stage.prepared_batches(unit, config)
    if len(batches) != expected:
        raise RuntimeError(f"{stage.name}: prepare returned {len(batches)} batch(es) for {unit.name}, prepared_batches said {expected}")
    yield from batches


def _run_on_ray(stage: Stage, pending, out_dir: Path, config: Config, total: int, skipped: int, fingerprints: dict[str, str]) -> dict[str, str]:
    """The Ray executor: CPU stages as tasks, model stages on a pool of model actors."""
    ensure_ray(config.run)
    # a task bigger than every node would wait for one forever
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
    if config.run.cpus_per_task > largest:
        raise FgdataError(f"run.cpus_per_task={config.run.cpus_per_task:g} is more than the largest Ray node's {largest:g} CPUs; lower it")
    submit, limit = ray_submitter(stage, out_dir, config, fingerprints)
    queue = deque(pending)
    in_flight: dict = {}
    failures: dict[str, str] = {}
    rows_done, started = 0, time.perf_counter()
    with _progress(stage, config, total, skipped) as bar:
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                unit = queue.popleft()
                ref, on_done = submit(unit)
                in_flight[ref] = (unit.name, on_done)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            name, on_done = in_flight.pop(ready[0])
            if on_done:
                on_done()
            try:
                stats = ray.get(ready[0])
                rows_done += stats["rows_in"]
            except Exception as exc:  # noqa: BLE001 - any shard failure is reported, the rest go on
                failures[name] = short_error(exc)
                log.error("%s: shard %s failed after retries: %s", stage.name, name, failures[name])
            bar.update(1)
            bar.set_postfix(rows_per_s=f"{rows_done / max(time.perf_counter() - started, 1e-9):.1f}", failed=len(failures))
    return failures


def ray_submitter(stage: Stage, out_dir: Path, config: Config, fingerprints: dict[str, str]):
    """A submit(unit) -> (shard result ref, callback for when it is done or None) for `stage` on Ray,
    and how many shards to keep in flight: CPU stages as tasks, model stages on an actor pool (which
    lives as long as `submit` does). `fingerprints` is read at submit time, so it may still grow."""
    stage_ref, config_ref = ray.put(stage), ray.put(config)
    if stage.uses_model:
        return _model_pool_submitter(stage, stage_ref, config_ref, out_dir, config, fingerprints)
    task = ray.remote(run_shard).options(
        num_cpus=config.run.cpus_per_task,
        max_retries=config.run.max_retries,
        retry_exceptions=True,
        name=f"fgdata-{stage.name}",
    )

    def submit(unit):
        return task.remote(stage_ref, unit, str(out_dir), config_ref, marker=fingerprints[unit.name]), None

    return submit, config.run.max_shards_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


class ModelWorker:
    """A Ray actor that loads the stage's model once and writes shards from prepared batches."""

    def __init__(self, stage: Stage, config: Config):
        self.stage, self.config = stage, config
        self.model = stage.load_model(config)

    def run(self, unit, batch_refs: list, out_dir: str, marker: str) -> dict:
        # Batches arrive as references so the next one can still be decoding while this one
        # is on the model; each is fetched only when the model is ready for it.
        batches = (ray.get(ref) for ref in batch_refs)
        return run_shard(self.stage, unit, out_dir, self.config, model=self.model, prepared=batches, marker=marker)


def _prepare_batches(stage: Stage, unit, config: Config):
    batches = stage.prepare(unit, config)
    return batches[0] if len(batches) == 1 else tuple(batches)


def _model_pool_submitter(stage: Stage, stage_ref, config_ref, out_dir: Path, config: Config, fingerprints: dict[str, str]):
    """Starts the actor pool; returns a submit(unit) that preprocesses on CPU then runs on an actor."""
    resources = ray.cluster_resources()
    pool = stage.pool(resources.get("GPU", 0), config, resources.get("CPU", 0))
    if pool.actors * pool.cpus_per_actor + config.run.cpus_per_task > resources.get("CPU", 0):
        raise FgdataError(
            f"{stage.name}: {pool.actors} model actor(s) x {pool.cpus_per_actor} CPU leave no CPU for decoding "
            f"(cluster has {resources.get('CPU', 0):g}); lower {stage.config_section}.cpus_per_actor or num_actors"
        )
    retries = config.run.max_retries
    worker = ray.remote(ModelWorker).options(
        num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor, max_restarts=retries, max_task_retries=retries
    )
    # stage and config go by value: a restarted actor must not depend on object-store refs
    actors = [worker.remote(stage, config) for _ in range(pool.actors)]
    log.info("%s: %d model actor(s), %g GPU(s) each", stage.name, pool.actors, pool.gpus_per_actor)
    prepare = ray.remote(num_cpus=config.run.cpus_per_task, max_retries=retries, retry_exceptions=True)(_prepare_batches)
    load = {index: 0 for index in range(len(actors))}

    def submit(unit):
        count = stage.prepared_batches(unit, config)
        refs = prepare.options(num_returns=count, name=f"fgdata-{stage.name}-prepare").remote(stage_ref, unit, config_ref)
        refs = refs if isinstance(refs, list) else [refs]
        index = min(load, key=load.get)
        load[index] += 1
        result = actors[index].run.options(name=f"fgdata-{stage.name}", retry_exceptions=True).remote(unit, refs, str(out_dir), fingerprints[unit.name])

        def on_done():
            load[index] -= 1

        return result, on_done

    # Two shards per actor: one on the model, the next one being decoded.
    return submit, config.run.max_shards_in_flight or 2 * len(actors)


_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Exit): ")


def short_error(exc: BaseException) -> str:
    """The line that says what went wrong: Ray wraps worker errors in long tracebacks."""
    cause = getattr(exc, "cause", None) or exc
    lines = [line.strip() for line in f"{type(cause).__name__}: {cause}".splitlines() if line.strip()]
    return next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), lines[0])[:500]


def _manifest(
    stage: Stage, config: Config, settings_hash: str, stats: dict[str, dict], wall_seconds: float, lineage: list[dict], executor: str
) -> dict:
    counters: Counter = Counter()
    provenance: dict = {}
    for shard in stats.values():
        counters.update(shard["counters"])
        for name, value in shard["provenance"].items():
            provenance.setdefault(name, [])
            if value not in provenance[name]:
                provenance[name].append(value)
    return {
        "stage": stage.name,
        "kind": stage.output_kind,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "settings_hash": settings_hash,
        "inputs": lineage,
        "provenance": provenance,
        "versions": _versions(),
        "machine": _machine(),  # `fgdata plan --from-runs` reads which hardware these timings are from
        "executor": executor,  # what ran this run's shards: "ray" or "local" (this process)
        "shards": sorted(stats),
        "rows_in": sum(s["rows_in"] for s in stats.values()),
        "rows_out": sum(s["rows_out"] for s in stats.values()),
        "rows_rejected": sum(s["rows_rejected"] for s in stats.values()),
        "counters": dict(sorted(counters.items())),
        "timings": {
            "wall_seconds": round(wall_seconds, 3),
            "shard_seconds": round(sum(s["seconds"] for s in stats.values()), 3),
        },
    }


def _machine() -> dict:
    """Where the shards ran: this host, and the Ray cluster's CPUs, GPUs and GPU types when Ray is up."""
    machine = {"hostname": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()}
    if ray.is_initialized():
        resources = ray.cluster_resources()
        machine["ray_cpus"], machine["ray_gpus"] = resources.get("CPU", 0), resources.get("GPU", 0)
        machine["gpu_types"] = sorted(key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:"))
    return machine


def _versions() -> dict:
    versions = {"fgdata": __version__, "python": platform.python_version()}
    for package in _REPORTED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
