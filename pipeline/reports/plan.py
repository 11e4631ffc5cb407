"""`fgdata plan`: the bill before the run — GPU-hours, CPU core-hours and wall time per stage.

What is planned is what will run: the steps of a recipe (a bundled one by name, or the user's file),
each with the settings it will run with (--config, --set, the step's own `set`), plus `export fgclip`
when asked. A step's figure comes from a record of the same stage and backend (`negatives.backend=rules`
is never priced from the LLM's record), from `bench/results/*.json` (`make bench`) or the manifest of
a run on the user's own hardware (`--from-runs`). A stage's wall time is

    fixed start-up + rows x units per row / (rate of one worker x workers busy at once)

where a worker is one CPU core for CPU stages on Ray, this one process for the local executor, and
one model actor (`num_actors`, else one per GPU, one without GPUs: as the runner's pool) for model
stages; the workers busy at once are capped by the shard count (a shard is the unit of work). Fixed
costs are counted as they are paid: `fgdata run` starts local Ray once; as separate commands
(`commands=True`) each command that runs on Ray starts its own, and one that runs in its process
(the runner's "auto": at most one shard of a stage without a model) starts none; every model stage
pays its actor start. Stages are summed as if run one after another; `fgdata run` streams shards
between steps and overlaps them, so its total is an upper bound.

Bench records say the load average and CPU they were taken under; the plan notes them, and warns
when this machine's load now differs by more than one per core: a shared machine moves the figures.

A figure is never silently borrowed from another device: a GPU stage on a GPU target uses a record
from that GPU (the same chip: names are compared without case, vendor, memory size or form factor,
so an A100 is not an A10), or from another GPU scaled by memory bandwidth (decode-bound generation
scales with it) and flagged as an estimate; a CPU record of a model stage never stands in for a GPU.
Records made with random weights or tiny models are labelled so per stage.

Records and manifests are untrusted files. One that is not a JSON object (not JSON, not a file,
nested past Python's limit) stops the plan with a one-line error naming it; a run manifest that is
one but holds no usable measurement (rows_in and timings.shard_seconds missing, of the wrong type,
NaN, infinite, not positive or past MAX_COUNT) is skipped with a warning naming it and why. Every
figure of a plan is a finite number, so `--json` is always valid JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import SCREEN_CORES_PER_ACTOR, Config
from pipeline.errors import FgdataError, first_line, shown

log = logging.getLogger(__name__)

BENCH_RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
MANIFEST_FILE = "_manifest.json"

# Peak memory bandwidth (TB/s) of common data-centre GPUs: autoregressive decode is bound by it, so
# it is the one stated factor used to carry a measurement from one GPU to another.
GPU_BANDWIDTH_TBS = {
    "h200": 4.8,
    "h100": 3.35,
    "a100": 2.0,
    "l40s": 0.86,
    "a10": 0.6,
    "v100": 0.9,
    "l4": 0.3,
    "t4": 0.32,
}
CPU_CORES_PER_GPU = 16  # assumed for CPU stages on GPU machines unless --cpus says otherwise
# the most rows, GPUs or cores a plan takes: far past any real run (the reference set is 1.6B
# images), and under 2**53, so every count is exact as a float
MAX_COUNT = 10**15
# words of a GPU's name that are not its chip: vendor, product line, memory size and type, form
# factor, and a count ("nvidia-h100-x1")
_NOT_THE_CHIP = re.compile(r"nvidia|tesla|geforce|\d+gb|hbm\d*e?|sxm\d*|pcie|x\d+")

NO_MODEL = "no model"
REAL = "real weights"
RANDOM_REAL_ARCH = "random weights of the real architecture"
TINY_RANDOM = "tiny random model"


@dataclass(frozen=True)
class StageKind:
    model: bool  # a model stage: an actor pool
    unit: str  # what a bench record's rate counts
    section: str | None = None  # the config section whose `backend` and `num_actors` it runs with
    gpu: bool = True  # a model stage's actors hold a GPU when there are any (screen's do not)
    cores_per_actor: int = 0  # a CPU model stage's pool without num_actors: one actor per this many cores (0: one)

    @property
    def on_gpu(self) -> bool:
        return self.model and self.gpu

    def default_actors(self, gpus: float, cpus: float) -> float:
        """The runner's pool of a model stage without num_actors: one per GPU (when its actors take
        one and there are any), else one per cores_per_actor cores, else one."""
        if self.gpu and gpus >= 1:
            return gpus
        return max(1, cpus // self.cores_per_actor) if self.cores_per_actor else 1


# every stage a recipe can name (pipeline.recipes.STEP_KINDS), and the commands after one
STAGES = {
    "ingest": StageKind(False, "images"),
    "dedup": StageKind(False, "images"),
    "screen": StageKind(True, "images", "screen", gpu=False, cores_per_actor=SCREEN_CORES_PER_ACTOR),
    "recaption": StageKind(True, "images", "recaption"),
    "phrases": StageKind(False, "captions"),
    "ground": StageKind(True, "images", "ground"),
    "negatives": StageKind(True, "regions", "negatives"),
    "hierarcaps-import": StageKind(False, "rows"),
    "hierarcaps-seed": StageKind(True, "hierarchies"),
    "hierarcaps-augment": StageKind(True, "hierarchies"),
    "hierarcaps-filter": StageKind(True, "NLI pairs"),
    "hierarcaps-distill": StageKind(True, "training steps"),
    "hierarcaps-generate": StageKind(True, "hierarchies"),
    "hierarcaps-negatives": StageKind(True, "NLI pairs"),
    # `fgdata export fgclip`: this process, no Ray (the export is local)
    "export fgclip": StageKind(False, "images"),
}
EXPORTS = ("fgclip",)
LOAD_PER_CORE_WARNING = 1.0  # a load average this much per core away from a record's: the figures may not hold


@dataclass
class Measure:
    """One stage's measured throughput and what it was measured with."""

    stage: str
    per_worker_per_s: float  # units/s of one worker: a CPU core, or one model actor
    units_per_row: float  # units per input row (regions per image, NLI pairs per caption)
    unit: str
    device: str  # "cpu", or the GPU's name
    weights: str
    model: str
    settings: dict
    source: str  # the record's path
    fixed_seconds: float | None  # start-up paid once per stage (actor start, model load)
    from_run: bool = False
    ray_start_in_fixed: bool = False  # a run's whole wall time: it holds the Ray start that command paid
    mean_caption_chars: float | None = None  # phrases: spaCy's time per caption grows with its length
    backend: str | None = None  # the stage's backend (recaption, ground, negatives); None: it has none
    load_average: float | None = None  # the 1-min load average the record was taken under
    cpus: float | None = None  # the cores of the machine it was taken on
    cpu_model: str | None = None


@dataclass
class StagePlan:
    step: str  # the recipe step's name (OUT/<step>)
    stage: str
    device: str
    workers: int
    rows: int
    units: float
    unit: str
    per_worker_per_s: float | None
    gpu_hours: float | None
    cpu_core_hours: float | None
    fixed_seconds: float | None
    wall_seconds: float | None
    basis: str  # where the figure comes from, and how far to trust it
    ray_start_seconds: float = 0.0  # as separate commands: this command's own Ray start, in its wall time
    command_start_seconds: float = 0.0  # as separate commands: its Python start and imports, in its wall time
    executor: str = "ray"  # where its shards run: "ray" or "local" (the command's own process)
    model: str = ""
    settings: dict = field(default_factory=dict)
    source: str = ""


def _read_json(path: Path) -> dict:
    if not path.is_file():  # a folder, or a FIFO whose read would wait forever
        raise FgdataError(f"{path} is not a file; remove it or pass the folder of a finished run")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8, not JSON, an int of over 4300 digits
        raise FgdataError(f"{path} is not a readable JSON record ({first_line(exc)}); fix or remove it") from None
    if not isinstance(data, dict):
        raise FgdataError(f"{path} is not a JSON object; fix or remove it")
    return data


def _real(value) -> float | None:
    """`value` as a float when it is a finite number; None for NaN, infinities, JSON's true and false,
    integers past a float's range and anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _positive(value) -> float | None:
    number = _real(value)
    return number if number is not None and number > 0 else None


def _number(record: dict, key: str, path: Path) -> float:
    value = _positive(record.get(key))
    if value is None:
        raise FgdataError(f"{path}: '{key}' is {shown(record.get(key))}, not a positive number; rerun its benchmark")
    return value


def _dict(record: dict, key: str) -> dict:
    value = record.get(key)
    return value if isinstance(value, dict) else {}


def _weights(record: dict, model: str) -> str:
    if "weights" in record:  # a record may say so itself (the GPU records will)
        return str(record["weights"])
    text = model.lower()
    return TINY_RANDOM if "tiny" in text else RANDOM_REAL_ARCH if "random" in text else REAL


def _settings(record: dict) -> dict:
    keys = ("batch_size", "max_new_tokens", "num_beams", "negative_candidates_per_tier", "dtype", "precision")
    # copied into the plan, whose JSON holds no NaN
    return {k: record[k] for k in keys if isinstance(record.get(k), str) or _real(record.get(k)) is not None}


def _backend(stage: str, stated) -> str | None:
    """The backend a record or run measured: what it says, else the stage's default (the records
    that do not say were all taken with it); None for a stage without backends."""
    section = STAGES[stage].section if stage in STAGES else None
    default = getattr(getattr(Config(), section), "backend", None) if section else None
    if default is None:
        return None
    return stated if isinstance(stated, str) else default


def _taken_under(measure: Measure, record: dict) -> Measure:
    """`measure` with the load average, cores and CPU model its record was taken under."""
    machine = _dict(record, "machine")
    load = machine.get("load_average")
    measure.load_average = _real(load[0]) if isinstance(load, list) and load else None
    measure.cpus = _positive(machine.get("cpus"))
    measure.cpu_model = machine.get("cpu_model") if isinstance(machine.get("cpu_model"), str) else None
    return measure


def _model_stage(record: dict, path: Path, stage: str, unit: str, busy_key: str, wall_key: str, count_key: str, rows_key: str | None = None) -> Measure:
    """A model stage's bench record: the actor's busy rate, its start-up from wall minus busy time."""
    count = _number(record, count_key, path)
    busy, wall = _number(record, busy_key, path), _number(record, wall_key, path)
    rows = _number(record, rows_key, path) if rows_key else count
    model = str(record.get("model", "unknown model"))
    device = str(record.get("device") or _dict(record, "machine").get("gpu") or "cpu")
    return Measure(
        stage, busy, count / rows, unit, device, _weights(record, model), model, _settings(record), str(path),
        fixed_seconds=max(0.0, count / wall - count / busy), backend=_backend(stage, record.get("backend")),
    )


def _end_to_end(record: dict, path: Path, stage: str) -> Measure:
    """A model stage's record from bench/cpu_1k.py (one actor on ~1000 rows): the busy rate over its
    shards, its start-up (actor start and model load) as measured before the first shard."""
    breakdown = _dict(record, "breakdown")
    rows = _number(record, "rows", path)
    units = _number(record, "regions", path) if stage == "negatives" else rows
    busy, fixed = _positive(breakdown.get("shard_busy_s")), _real(breakdown.get("startup_s"))
    if busy is None:
        raise FgdataError(f"{path}: 'breakdown.shard_busy_s' is {shown(breakdown.get('shard_busy_s'))}, not a positive number; rerun its benchmark")
    model = str(record.get("model", "unknown model"))
    return Measure(
        stage, units / busy, units / rows, STAGES[stage].unit, str(_dict(record, "machine").get("gpu") or "cpu"), _weights(record, model), model,
        _settings(record), str(path), fixed_seconds=fixed if fixed is not None and fixed >= 0 else None, backend=_backend(stage, record.get("backend")),
    )


def load_bench(results: Path) -> tuple[list[Measure], dict]:
    """The bench records under `results` as measures, and the start-up record (may be empty)."""
    if not results.is_dir():
        raise FgdataError(f"{results} is not a folder of bench records; run `make bench`, or pass --results or --from-runs")
    measures: list[Measure] = []
    end_to_end: list[Measure] = []  # after the stage benchmarks: they fill in what those lack (the rules backend)
    startup: dict = {}
    for path in sorted(results.glob("*.json")):
        record = _read_json(path)
        name = record.get("benchmark")
        cpus = _positive(_dict(record, "machine").get("cpus")) or 1.0
        counts = len(measures), len(end_to_end)
        taken = record  # what the machine was doing: the record's, or its part's own
        if name == "startup":
            startup = record
        elif name == "ingest":
            # the stage ran on Ray over all the machine's cores: per core is the rate / cores
            rate = _number(record, "stage_images_per_s", path) / cpus
            measures.append(Measure("ingest", rate, 1.0, "images", "cpu", NO_MODEL, "Pillow decode, no model", {}, str(path), None))
        elif name == "phrases":
            rate = _number(record, "stage_captions_per_s", path) / cpus
            model = f"spaCy {record.get('spacy_model', 'pipeline (the phrases.spacy_model default)')}"
            chars = _positive(record.get("mean_caption_chars"))
            measures.append(Measure("phrases", rate, 1.0, "captions", "cpu", REAL, model, {}, str(path), None, mean_caption_chars=chars))
        elif name == "recaption":
            measures.append(_model_stage(record, path, "recaption", "images", "stage_actor_busy_images_per_s", "stage_images_per_s", "images"))
        elif name == "ground":
            measures.append(_model_stage(record, path, "ground", "images", "stage_actor_busy_images_per_s", "stage_images_per_s", "images"))
        elif name == "negatives":
            measures.append(_model_stage(record, path, "negatives", "regions", "stage_actor_busy_regions_per_s", "stage_regions_per_s", "regions", "images"))
        elif name == "hierarcaps":
            measures.append(_model_stage(record, path, "hierarcaps-generate", "hierarchies", "stage_actor_busy_hierarchies_per_s", "stage_hierarchies_per_s", "captions"))
            measures.append(_model_stage(record, path, "hierarcaps-filter", "NLI pairs", "filter_actor_busy_nli_pairs_per_s", "filter_stage_nli_pairs_per_s", "nli_pairs", "captions"))
        elif name == "export" and record.get("format") in EXPORTS:
            rate = _number(record, "stage_images_per_s", path)  # one process
            measures.append(Measure(f"export {record['format']}", rate, 1.0, "images", "cpu", NO_MODEL, "no model", {}, str(path), None))
        elif name == "curation" and isinstance(record.get("dedup_rerun"), dict):
            # dedup's pass 1 (decode, pixel digest, pHash) in one process: the cost that grows with the
            # images; grouping the hashes is seconds per million (bench/curation.py's grouping figures)
            rerun = record["dedup_rerun"]  # taken at its own time, under its own load
            taken = {**record, "machine": {**_dict(record, "machine"), "load_average": rerun.get("load_average")}}
            rate = _number(rerun, "images", path) / _number(_dict(rerun, "pass1_seconds"), "first_run", path)
            measures.append(Measure("dedup", rate, 1.0, "images", "cpu", NO_MODEL, "pixel digest + 64-bit pHash (imagehash), no model", {}, str(path), None))
        elif name == "screen_real":
            # the stage in one process on real photos, model load included: one actor's rate
            rate = _number(_dict(record, "throughput"), "stage_images_per_s", path)
            model = f"NudeNet {_dict(record, 'settings').get('model', '320n')} (onnxruntime, CPU)"
            measures.append(Measure("screen", rate, 1.0, "images", "cpu", REAL, model, {}, str(path), None))
        elif name in ("cpu_1k_recaption", "cpu_1k_ground", "cpu_1k_negatives"):
            end_to_end.append(_end_to_end(record, path, name.removeprefix("cpu_1k_")))
        for measure in measures[counts[0] :] + end_to_end[counts[1] :]:
            _taken_under(measure, taken)
    measures += end_to_end
    fixed = _dict(startup, "stage_fixed_seconds")
    for measure in measures:
        seconds = _real(fixed.get(measure.stage))
        if measure.fixed_seconds is None and seconds is not None and seconds >= 0:
            measure.fixed_seconds = seconds
    return measures, startup


def load_runs(folders: list[Path]) -> list[Measure]:
    """Measures from finished runs: a dataset folder, or a folder of them, each with its manifest."""
    measures = []
    for folder in folders:
        manifests = [folder / MANIFEST_FILE] if (folder / MANIFEST_FILE).is_file() else sorted(folder.glob(f"*/{MANIFEST_FILE}"))
        if not manifests:
            raise FgdataError(f"--from-runs {folder}: no {MANIFEST_FILE} in it or its subfolders; give a dataset folder a finished stage wrote")
        for path in manifests:
            manifest = _read_json(path)
            timings = _dict(manifest, "timings")
            busy, rows = timings.get("shard_seconds"), manifest.get("rows_in")
            rate = rows / busy if isinstance(rows, int) and 0 < rows <= MAX_COUNT and _positive(busy) else None
            if not _positive(rate):  # an empty or fully resumed run measured nothing; anything else is a broken manifest
                log.warning("--from-runs: skipped %s: rows_in %s and timings.shard_seconds %s measure no throughput", path, shown(rows), shown(busy))
                continue
            machine = _dict(manifest, "machine")
            gpu_types = machine.get("gpu_types")
            if machine.get("ray_gpus"):
                device = gpu_types[0] if isinstance(gpu_types, list) and gpu_types and isinstance(gpu_types[0], str) else "unknown machine"
            else:
                device = "cpu" if machine else "unknown machine"
            # provenance values are lists of what the shards reported; anything else is ignored
            values = {k: v for k, v in _dict(manifest, "provenance").items() if isinstance(v, list)}
            models = [str(v) for key in ("model", "detector", "llm_model", "nli_model") for v in values.get(key, [])]
            random = True in values.get("random_weights", [])
            weights = "random weights" if random else REAL if models else NO_MODEL
            version, host = _dict(manifest, "versions").get("fgdata"), machine.get("hostname")
            stage = str(manifest.get("stage"))
            section = _dict(_dict(manifest, "config"), STAGES[stage].section) if stage in STAGES and STAGES[stage].section else {}
            on_ray = manifest.get("executor") != "local"
            measures.append(
                Measure(
                    stage, rate, 1.0, "rows", device, weights, ", ".join(models) or "no model",
                    # copied into the plan, whose JSON holds no NaN
                    {"fgdata": version if isinstance(version, str) else None, "host": host if isinstance(host, str) else None},
                    str(path), _start_up(manifest, stage, section, busy if rate else None, on_ray), from_run=True,
                    ray_start_in_fixed=on_ray, backend=_backend(stage, section.get("backend")),
                )
            )
    return measures


def _start_up(manifest: dict, stage: str, section: dict, busy: float | None, on_ray: bool) -> float | None:
    """A run's fixed cost: its whole wall time less its shards' time spread over the workers that ran
    them at once (Ray's start, actor start, model load, planning; the stage command paid them all)."""
    wall, shards = _positive(_dict(manifest, "timings").get("wall_seconds")), manifest.get("shards")
    if wall is None or busy is None:
        return None
    machine = _dict(manifest, "machine")
    actors = section.get("num_actors") if isinstance(section.get("num_actors"), int) and section["num_actors"] > 0 else None
    if not on_ray:
        workers = 1.0  # the local executor: one shard after another
    elif stage in STAGES and STAGES[stage].model:
        workers = actors or STAGES[stage].default_actors(_positive(machine.get("ray_gpus")) or 0.0, _positive(machine.get("ray_cpus")) or 1.0)
    else:
        workers = _positive(machine.get("ray_cpus")) or _positive(machine.get("cpus")) or 1.0
    at_once = min(workers, len(shards)) if isinstance(shards, list) and shards else 1.0
    return max(0.0, wall - busy / at_once)


def gpu_chip(name: str) -> str:
    """The chip a GPU's name names, in one lower-case word: "NVIDIA A100-SXM4-80GB" (as
    `torch.cuda.get_device_name` says), "nvidia-a100" and "A100 40GB" are all "a100"; "A10" is "a10"."""
    words = re.split(r"[\s_-]+", name.lower())
    return "".join(word for word in words if word and not _NOT_THE_CHIP.fullmatch(word))


def gpu_bandwidth_tbs(device: str) -> float | None:
    """Peak memory bandwidth of a GPU named like `torch.cuda.get_device_name` or `--gpu` says, if known."""
    return GPU_BANDWIDTH_TBS.get(gpu_chip(device))


def _same_gpu(device: str, target: str) -> bool:
    return device != "cpu" and gpu_chip(device) == gpu_chip(target)


def _choose(stage: str, measures: list[Measure], gpu: str | None, backend: str | None) -> tuple[Measure | None, float, str]:
    """The measure a stage's figure rests on, the factor applied to its rate, and why. Only a record
    of the backend the step will run with counts: the rules' speed says nothing of an LLM's."""
    on_gpu = STAGES[stage].on_gpu
    of_stage = [m for m in measures if m.stage == stage]
    mine = [m for m in of_stage if m.backend == backend]
    mine.sort(key=lambda m: not m.from_run)  # the user's own runs first
    if of_stage and not mine:
        others = ", ".join(sorted({str(m.backend) for m in of_stage}))
        return None, 1.0, f"no record of {stage} with backend {backend} (only {others}); run its benchmark with that backend, or plan --from-runs a run of it"
    if not (on_gpu and gpu):
        usable = mine if not on_gpu else [m for m in mine if m.device == "cpu"]
        return (usable[0], 1.0, "") if usable else (None, 1.0, "no CPU record")
    exact = [m for m in mine if _same_gpu(m.device, gpu)]
    if exact:
        return exact[0], 1.0, ""
    target_bw = gpu_bandwidth_tbs(gpu)
    for m in mine:
        source_bw = gpu_bandwidth_tbs(m.device) if m.device != "cpu" else None
        if source_bw and target_bw:
            return m, target_bw / source_bw, f"an estimate for {gpu}, from another GPU: extrapolated from {m.device} by memory bandwidth ({source_bw:g} -> {target_bw:g} TB/s)"
    cpu_only = [m for m in mine if m.device == "cpu"]
    if cpu_only:
        m = cpu_only[0]
        return None, 1.0, (
            f"no GPU record: no {gpu} figure, as there is no GPU measurement to extrapolate from; the only measure is a {m.weights} "
            f"on 1 CPU core ({m.per_worker_per_s:.3g} {m.unit}/s, {m.source}), which says nothing about {gpu}; "
            f"run `make bench-gpu` (bench/gpu.py) on a {gpu}, or on another GPU to extrapolate by memory bandwidth"
        )
    return None, 1.0, f"no record for {stage}"


def _trust(m: Measure) -> str:
    where = "your run" if m.from_run else "bench"
    if m.weights == TINY_RANDOM:
        return f"{where}, {m.device}: {TINY_RANDOM} - measures fgdata's overhead, not the real model's speed"
    if m.weights in (RANDOM_REAL_ARCH, "random weights"):
        return f"{where}, {m.device}: {m.weights} - speed of the architecture, output lengths of a trained model may differ"
    return f"{where}, {m.device}: measured"


def plan(
    recipe,
    rows: int,
    config: Config,
    gpu: str | None = None,
    gpus: int = 1,
    cpus: int | None = None,
    measures: list[Measure] | None = None,
    startup: dict | None = None,
    stages: list[str] | None = None,
    caption_chars: float | None = None,
    step_configs: dict[str, Config] | None = None,
    commands: bool = False,
    export: str | None = None,
    load_now: float | None = None,
) -> dict:
    """The bill for `rows` input rows through `recipe` (a pipeline.recipes.Recipe: its name and steps)
    on `gpus` x `gpu` (None: CPU only) and `cpus` cores, each step with its settings from
    `step_configs` (by step name; `config` where absent). `commands`: as the stage commands run one
    after another, each its own process, instead of `fgdata run`; `export`: then `fgdata export EXPORT`."""
    if rows < 1:
        raise FgdataError(f"the number of rows to plan for must be at least 1, not {rows}")
    if rows > MAX_COUNT:
        raise FgdataError(f"the number of rows to plan for must be at most 10^15, not {shown(rows)}")
    if gpu is not None and gpu_chip(gpu) in ("", "cpu"):
        raise FgdataError(f"--gpu {gpu!r} names no GPU; give its type, e.g. h100, or leave --gpu out for CPU only")
    if gpu is not None and not 1 <= gpus <= MAX_COUNT:
        raise FgdataError(f"--gpus must be between 1 and 10^15, not {shown(gpus)}")
    if export is not None and export not in EXPORTS:
        raise FgdataError(f"--export {shown(export)}: the exports are {', '.join(EXPORTS)}")
    steps = [(step.name, step.stage) for step in recipe.steps] + ([(f"export {export}", f"export {export}")] if export else [])
    unknown = sorted(set(stages or []) - {name for step in steps for name in step})
    if unknown:
        raise FgdataError(f"--stages: {', '.join(unknown)} not in {recipe.name}; its steps are {', '.join(f'{n} ({s})' if n != s else n for n, s in steps)}")
    if cpus is None:
        cpus = gpus * CPU_CORES_PER_GPU if gpu else config.run.num_cpus or os.cpu_count() or 1
    if not 1 <= cpus <= MAX_COUNT:
        raise FgdataError(f"--cpus must be between 1 and 10^15, not {shown(cpus)}")
    if caption_chars is not None and _positive(caption_chars) is None:
        raise FgdataError(f"--caption-chars must be a finite number above 0, not {caption_chars}")
    measures, startup = measures or [], startup or {}
    shards = math.ceil(rows / config.ingest.rows_per_shard)  # every later stage keeps ingest's shards
    # a cluster named by RAY_ADDRESS is running already: joining it costs no start
    ray_start = 0.0 if os.environ.get("RAY_ADDRESS") else _positive(startup.get("ray_start_seconds"))
    command_starts = _dict(startup, "command_start_seconds")  # per stage: a fresh Python importing its command's modules
    local_fixed = _dict(startup, "local_stage_fixed_seconds")  # a CPU stage in the command's own process
    planned, used = [], []
    for name, stage in steps:
        if stages and name not in stages and stage not in stages:
            continue
        kind = STAGES[stage]
        step_config = (step_configs or {}).get(name, config)
        section = getattr(step_config, kind.section) if kind.section else None
        measure, factor, why = _choose(stage, measures, gpu, getattr(section, "backend", None))
        on_gpu = kind.on_gpu and gpu is not None
        executor = _executor(stage, step_config, shards, commands)
        if executor == "local":
            workers = 1  # this process, one shard after another
        elif kind.model:  # the runner's pool: num_actors, else as default_actors
            workers = (section.num_actors if section else 0) or kind.default_actors(gpus if on_gpu else 0, cpus)
        else:
            workers = cpus
        if measure is None:
            planned.append(StagePlan(name, stage, gpu if on_gpu else "cpu", workers, rows, 0, kind.unit, None, None, None, None, None, why, executor=executor))
            continue
        used.append(measure)
        if stage == "phrases" and measure.mean_caption_chars:
            if caption_chars:
                factor *= measure.mean_caption_chars / caption_chars
                why = f"scaled from the record's {measure.mean_caption_chars:g}-char captions to {caption_chars:g} chars"
            else:
                why = f"assumes captions of ~{measure.mean_caption_chars:g} chars, as the record's (--caption-chars to change)"
        rate = measure.per_worker_per_s * factor
        units = rows * measure.units_per_row
        worker_seconds = units / rate if rate > 0 else math.inf  # a rate scaled down past a float's range
        busy = min(workers, shards)
        fixed = measure.fixed_seconds
        if executor == "local" and not measure.from_run and _real(local_fixed.get(stage)) is not None:
            fixed = max(0.0, _real(local_fixed.get(stage)))
        # as separate commands, each on Ray starts its own (a run's whole wall time holds it already)
        own_ray = (ray_start or 0.0) if commands and executor == "ray" and not measure.ray_start_in_fixed else 0.0
        own_start = (_positive(command_starts.get(stage)) or 0.0) if commands else 0.0
        wall = own_start + own_ray + (fixed or 0.0) + worker_seconds / busy
        if not all(map(math.isfinite, (rate, units, wall))):  # records of extreme values; NaN and inf are no JSON
            raise FgdataError(f"{stage}: {measure.source} gives no finite figure for {rows:,} rows (rate {rate:g} {measure.unit}/s); check that record")
        basis = "; ".join(part for part in (_trust(measure), why) if part)
        if fixed is None:
            basis += "; start-up not measured"
        elif measure.from_run:
            basis += "; start-up from the run's whole wall time"
        planned.append(
            StagePlan(
                name, stage, gpu if on_gpu else "cpu", workers, rows, round(units, 1), measure.unit, rate,
                worker_seconds / 3600 if on_gpu else None, None if on_gpu else worker_seconds / 3600,
                fixed, wall, basis, own_ray, own_start, executor, measure.model, measure.settings, measure.source,
            )
        )
    # `fgdata run` starts Ray once for all its steps (on Ray unless run.executor=local)
    run_ray = (ray_start or 0.0) if not commands and any(p.executor == "ray" for p in planned) else 0.0
    # the one `fgdata run` process imports every step's module: about the costliest of them
    run_start = 0.0 if commands else max((_positive(command_starts.get(p.stage)) or 0.0 for p in planned), default=0.0)
    missing = [p.step for p in planned if p.wall_seconds is None]
    total = {
        "gpu_hours": sum(p.gpu_hours or 0 for p in planned) if gpu else None,
        "cpu_core_hours": sum(p.cpu_core_hours or 0 for p in planned),
        "ray_start_seconds": run_ray + sum(p.ray_start_seconds for p in planned),
        "ray_starts": (run_ray > 0) + sum(p.ray_start_seconds > 0 for p in planned),
        "command_start_seconds": run_start + sum(p.command_start_seconds for p in planned),
        "wall_seconds": sum(p.wall_seconds or 0 for p in planned) + run_ray + run_start,
        "complete": not missing,
        "stages_without_a_figure": missing,
    }
    if not all(map(math.isfinite, (total["cpu_core_hours"], total["wall_seconds"], total["gpu_hours"] or 0.0))):
        raise FgdataError(f"the stages' figures add up past a float's range for {rows:,} rows; check the records they come from")
    gpu_records = sorted({m.device for m in measures if m.device not in ("cpu", "unknown machine")})
    load = _load_notes(used, os.getloadavg()[0] if load_now is None else load_now)
    how = "as separate commands, one after another" if commands else "as one `fgdata run`"
    start_note = (
        f"each command's start (Python and its imports) is counted {'per command' if commands else 'once, the costliest step module'}"
        if command_starts else "a command's start (Python and imports) is not counted: the startup record predates it (bench/run.py --only startup)"
    )
    if not ray_start:
        ray_note = "Ray start-up not counted (a cluster from RAY_ADDRESS, or no startup record)"
    elif commands:
        within = sum(p.executor == "ray" and not p.ray_start_seconds and p.wall_seconds is not None for p in planned)
        also = f", {within} more within your runs' wall times" if within else ""
        ray_note = (
            f"Ray start-up counted for each command that runs on Ray: {total['ray_starts']} start(s) added{also}; "
            "a command of one shard without a model runs in its own process"
        )
    else:
        ray_note = "Ray start-up (local) is counted once, as `fgdata run` starts it once"
    return {
        "recipe": recipe.name,
        "how": how,
        "rows": rows,
        "gpu": gpu,
        "gpus": gpus if gpu else 0,
        "cpus": cpus,
        "shards": shards,
        "stages": [asdict(p) for p in planned],
        "total": total,
        "gpu_records": gpu_records,
        "load_warning": load["warning"],
        "notes": [
            "stages are summed one after another; `fgdata run` streams shards between them and overlaps them, so its total wall time is an upper bound",
            ray_note,
            start_note,
            *([] if gpu_records else ["no GPU measurement exists in the records read: GPU figures need `make bench-gpu` (bench/gpu.py) on a GPU"]),
            *load["notes"],
        ],
    }


def _executor(stage: str, config: Config, shards: int, commands: bool) -> str:
    """Where a step's shards run, as the code decides it (runner.choose_executor): the export in its
    own process; a setting other than auto as set; `fgdata run` on Ray; a stage command in its own
    process when it has at most one shard and no model, and no cluster is named."""
    if stage.startswith("export "):
        return "local"
    if config.run.executor != "auto":
        return config.run.executor
    if not commands or os.environ.get("RAY_ADDRESS"):
        return "ray"
    return "local" if shards <= 1 and not STAGES[stage].model else "ray"


def _load_notes(used: list[Measure], load_now: float) -> dict:
    """What the records' load averages and CPUs were, and a warning when this machine's load now is
    more than LOAD_PER_CORE_WARNING per core away from one of theirs."""
    cores = os.cpu_count() or 1
    notes, far = [], []
    for source, group in sorted({m.source: m for m in used if not m.from_run}.items()):
        if group.load_average is None:
            notes.append(f"{source}: taken under a load average it does not record")
            continue
        then = f"load average {group.load_average:g} on {group.cpus:g} cores" if group.cpus else f"load average {group.load_average:g}"
        notes.append(f"{source}: taken under {then}{f' ({group.cpu_model})' if group.cpu_model else ''}")
        if abs(load_now / cores - group.load_average / (group.cpus or cores)) > LOAD_PER_CORE_WARNING:
            far.append(f"{Path(source).name} ({group.load_average:g})")
    warning = None
    if far:
        warning = (
            f"this machine's load average is {load_now:.2f} on {cores} cores, more than {LOAD_PER_CORE_WARNING:g} per core from the one "
            f"these records were taken under: {', '.join(far)}; the figures may be off by that much; take them again now (make bench) or plan --from-runs"
        )
    return {"notes": notes, "warning": warning}


def _hours(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:,.1f}h"


def format_plan(bill: dict) -> str:
    where = f"{bill['gpus']} x {bill['gpu']} + {bill['cpus']} CPU cores" if bill["gpu"] else f"{bill['cpus']} CPU cores"
    lines = [f"fgdata plan {bill['recipe']} ({bill['how']}): {bill['rows']:,} rows on {where}, {bill['shards']:,} shard(s)", ""]
    header = ("step", "stage", "device", "runs on", "workers", "rate/worker", "GPU-h", "core-h", "wall", "basis")
    table = [header]
    for s in bill["stages"]:
        rate = "-" if s["per_worker_per_s"] is None else f"{s['per_worker_per_s']:,.3g} {s['unit']}/s"
        runs_on = f"Ray (+{s['ray_start_seconds']:.1f}s start)" if s["ray_start_seconds"] else "Ray" if s["executor"] == "ray" else "its process"
        table.append((s["step"], s["stage"], s["device"], runs_on, str(s["workers"]), rate, _hours(s["gpu_hours"]), _hours(s["cpu_core_hours"]), _duration(s["wall_seconds"]), s["basis"]))
    total = bill["total"]
    suffix = "" if total["complete"] else f" (incomplete: no figure for {', '.join(total['stages_without_a_figure'])})"
    table.append(("total", "", "", "", "", "", _hours(total["gpu_hours"]), _hours(total["cpu_core_hours"]), _duration(total["wall_seconds"]), suffix.strip(" ()")))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    lines += ["", "assumed:"]
    for s in bill["stages"]:
        if s["source"]:
            settings = ", ".join(f"{k}={v}" for k, v in s["settings"].items() if v is not None)
            per_row = "" if s["unit"] == "rows" else f"; {s['units'] / max(s['rows'], 1):.3g} {s['unit']} per row"
            lines.append(f"  {s['step']}: {s['model']}{f' ({settings})' if settings else ''}{per_row}; from {s['source']}")
    lines += [f"note: {note}" for note in bill["notes"]]
    if bill["load_warning"]:
        lines.append(f"warning: {bill['load_warning']}")
    return "\n".join(lines)
