"""`fgdata plan`: the bill before the run — GPU-hours, CPU core-hours and wall time per stage.

Every figure comes from a measured throughput record: `bench/results/*.json` (`make bench`) or the
manifest of a run on the user's own hardware (`--from-runs`). A stage's wall time is

    fixed start-up + rows x units per row / (rate of one worker x workers busy at once)

where a worker is one CPU core for CPU stages and one model actor (one GPU) for model stages, and
the workers busy at once are capped by the shard count (a shard is the unit of work). Local Ray's
start-up is added once. Stages are summed as if run one after another; a recipe that streams shards
between stages overlaps them, so the total wall time is an upper bound.

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

from pipeline.config import Config
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
class Step:
    name: str  # the stage's name, as manifests and bench records spell it
    on_gpu: bool  # a model stage: runs on GPUs when there are any
    unit: str  # what a bench record's rate counts


RECIPES = {
    "fggrn": (
        Step("ingest", False, "images"),
        Step("recaption", True, "images"),
        Step("phrases", False, "captions"),
        Step("ground", True, "images"),
        Step("negatives", True, "regions"),
    ),
    "hierarcaps": (
        Step("hierarcaps-generate", True, "hierarchies"),
        Step("hierarcaps-filter", True, "NLI pairs"),
    ),
}


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
    mean_caption_chars: float | None = None  # phrases: spaCy's time per caption grows with its length


@dataclass
class StagePlan:
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


def _model_stage(record: dict, path: Path, stage: str, unit: str, busy_key: str, wall_key: str, count_key: str, rows_key: str | None = None) -> Measure:
    """A model stage's bench record: the actor's busy rate, its start-up from wall minus busy time."""
    count = _number(record, count_key, path)
    busy, wall = _number(record, busy_key, path), _number(record, wall_key, path)
    rows = _number(record, rows_key, path) if rows_key else count
    model = str(record.get("model", "unknown model"))
    device = str(record.get("device") or _dict(record, "machine").get("gpu") or "cpu")
    return Measure(
        stage, busy, count / rows, unit, device, _weights(record, model), model, _settings(record), str(path),
        fixed_seconds=max(0.0, count / wall - count / busy),
    )


def load_bench(results: Path) -> tuple[list[Measure], dict]:
    """The bench records under `results` as measures, and the start-up record (may be empty)."""
    if not results.is_dir():
        raise FgdataError(f"{results} is not a folder of bench records; run `make bench`, or pass --results or --from-runs")
    measures: list[Measure] = []
    startup: dict = {}
    for path in sorted(results.glob("*.json")):
        record = _read_json(path)
        name = record.get("benchmark")
        cpus = _positive(_dict(record, "machine").get("cpus")) or 1.0
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
            busy, rows = _dict(manifest, "timings").get("shard_seconds"), manifest.get("rows_in")
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
            measures.append(
                Measure(
                    str(manifest.get("stage")), rate, 1.0, "rows", device, weights, ", ".join(models) or "no model",
                    # copied into the plan, whose JSON holds no NaN
                    {"fgdata": version if isinstance(version, str) else None, "host": host if isinstance(host, str) else None},
                    str(path), None, from_run=True,
                )
            )
    return measures


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


def _choose(step: Step, measures: list[Measure], gpu: str | None) -> tuple[Measure | None, float, str]:
    """The measure a stage's figure rests on, the factor applied to its rate, and why."""
    mine = [m for m in measures if m.stage == step.name]
    mine.sort(key=lambda m: not m.from_run)  # the user's own runs first
    if not (step.on_gpu and gpu):
        usable = mine if not step.on_gpu else [m for m in mine if m.device == "cpu"]
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
    return None, 1.0, f"no record for {step.name}"


def _trust(m: Measure) -> str:
    where = "your run" if m.from_run else "bench"
    if m.weights == TINY_RANDOM:
        return f"{where}, {m.device}: {TINY_RANDOM} - measures fgdata's overhead, not the real model's speed"
    if m.weights in (RANDOM_REAL_ARCH, "random weights"):
        return f"{where}, {m.device}: {m.weights} - speed of the architecture, output lengths of a trained model may differ"
    return f"{where}, {m.device}: measured"


def plan(
    recipe: str,
    rows: int,
    config: Config,
    gpu: str | None = None,
    gpus: int = 1,
    cpus: int | None = None,
    measures: list[Measure] | None = None,
    startup: dict | None = None,
    stages: list[str] | None = None,
    caption_chars: float | None = None,
) -> dict:
    """The bill for `rows` input rows through `recipe` on `gpus` x `gpu` (None: CPU only) and `cpus` cores."""
    if recipe not in RECIPES:
        raise FgdataError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    if rows < 1:
        raise FgdataError(f"the number of rows to plan for must be at least 1, not {rows}")
    if rows > MAX_COUNT:
        raise FgdataError(f"the number of rows to plan for must be at most 10^15, not {shown(rows)}")
    if gpu is not None and gpu_chip(gpu) in ("", "cpu"):
        raise FgdataError(f"--gpu {gpu!r} names no GPU; give its type, e.g. h100, or leave --gpu out for CPU only")
    if gpu is not None and not 1 <= gpus <= MAX_COUNT:
        raise FgdataError(f"--gpus must be between 1 and 10^15, not {shown(gpus)}")
    steps = RECIPES[recipe]
    unknown = sorted(set(stages or []) - {s.name for s in steps})
    if unknown:
        raise FgdataError(f"--stages: {', '.join(unknown)} not in {recipe}; its stages are {', '.join(s.name for s in steps)}")
    if cpus is None:
        cpus = gpus * CPU_CORES_PER_GPU if gpu else config.run.num_cpus or os.cpu_count() or 1
    if not 1 <= cpus <= MAX_COUNT:
        raise FgdataError(f"--cpus must be between 1 and 10^15, not {shown(cpus)}")
    if caption_chars is not None and _positive(caption_chars) is None:
        raise FgdataError(f"--caption-chars must be a finite number above 0, not {caption_chars}")
    measures, startup = measures or [], startup or {}
    shards = math.ceil(rows / config.ingest.rows_per_shard)  # every later stage keeps ingest's shards
    planned = []
    for step in steps:
        if stages and step.name not in stages:
            continue
        measure, factor, why = _choose(step, measures, gpu)
        on_gpu = step.on_gpu and gpu is not None
        # on CPU a model actor reserves a core and one more decodes for it
        workers = gpus if on_gpu else (max(1, cpus - 1) if step.on_gpu else cpus)
        if measure is None:
            planned.append(StagePlan(step.name, gpu if on_gpu else "cpu", workers, rows, 0, step.unit, None, None, None, None, None, why))
            continue
        if step.name == "phrases" and measure.mean_caption_chars:
            if caption_chars:
                factor *= measure.mean_caption_chars / caption_chars
                why = f"scaled from the record's {measure.mean_caption_chars:g}-char captions to {caption_chars:g} chars"
            else:
                why = f"assumes captions of ~{measure.mean_caption_chars:g} chars, as the record's (--caption-chars to change)"
        rate = measure.per_worker_per_s * factor
        units = rows * measure.units_per_row
        worker_seconds = units / rate if rate > 0 else math.inf  # a rate scaled down past a float's range
        busy = min(workers, shards)
        wall = (measure.fixed_seconds or 0.0) + worker_seconds / busy
        if not all(map(math.isfinite, (rate, units, wall))):  # records of extreme values; NaN and inf are no JSON
            raise FgdataError(f"{step.name}: {measure.source} gives no finite figure for {rows:,} rows (rate {rate:g} {measure.unit}/s); check that record")
        basis = "; ".join(part for part in (_trust(measure), why) if part)
        if measure.fixed_seconds is None:
            basis += "; start-up not measured"
        planned.append(
            StagePlan(
                step.name, gpu if on_gpu else "cpu", workers, rows, round(units, 1), measure.unit, rate,
                worker_seconds / 3600 if on_gpu else None, None if on_gpu else worker_seconds / 3600,
                measure.fixed_seconds, wall, basis, measure.model, measure.settings, measure.source,
            )
        )
    ray_start = _positive(startup.get("ray_start_seconds")) if not os.environ.get("RAY_ADDRESS") else 0.0
    missing = [p.stage for p in planned if p.wall_seconds is None]
    total = {
        "gpu_hours": sum(p.gpu_hours or 0 for p in planned) if gpu else None,
        "cpu_core_hours": sum(p.cpu_core_hours or 0 for p in planned),
        "ray_start_seconds": ray_start,
        "wall_seconds": sum(p.wall_seconds or 0 for p in planned) + (ray_start or 0),
        "complete": not missing,
        "stages_without_a_figure": missing,
    }
    if not all(map(math.isfinite, (total["cpu_core_hours"], total["wall_seconds"], total["gpu_hours"] or 0.0))):
        raise FgdataError(f"the stages' figures add up past a float's range for {rows:,} rows; check the records they come from")
    gpu_records = sorted({m.device for m in measures if m.device not in ("cpu", "unknown machine")})
    return {
        "recipe": recipe,
        "rows": rows,
        "gpu": gpu,
        "gpus": gpus if gpu else 0,
        "cpus": cpus,
        "shards": shards,
        "stages": [asdict(p) for p in planned],
        "total": total,
        "gpu_records": gpu_records,
        "notes": [
            "stages are summed one after another; a recipe streaming shards between them overlaps them, so the total wall time is an upper bound",
            "Ray start-up (local) is counted once" if ray_start else "Ray start-up not counted (a cluster from RAY_ADDRESS, or no startup record)",
            *([] if gpu_records else ["no GPU measurement exists in the records read: GPU figures need `make bench-gpu` (bench/gpu.py) on a GPU"]),
        ],
    }


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
    lines = [f"fgdata plan {bill['recipe']}: {bill['rows']:,} rows on {where}, {bill['shards']:,} shard(s)", ""]
    header = ("stage", "device", "workers", "rate/worker", "GPU-h", "core-h", "wall", "basis")
    table = [header]
    for s in bill["stages"]:
        rate = "-" if s["per_worker_per_s"] is None else f"{s['per_worker_per_s']:,.3g} {s['unit']}/s"
        table.append((s["stage"], s["device"], str(s["workers"]), rate, _hours(s["gpu_hours"]), _hours(s["cpu_core_hours"]), _duration(s["wall_seconds"]), s["basis"]))
    total = bill["total"]
    suffix = "" if total["complete"] else f" (incomplete: no figure for {', '.join(total['stages_without_a_figure'])})"
    table.append(("total", "", "", "", _hours(total["gpu_hours"]), _hours(total["cpu_core_hours"]), _duration(total["wall_seconds"]), suffix.strip(" ()")))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    lines += ["", "assumed:"]
    for s in bill["stages"]:
        if s["source"]:
            settings = ", ".join(f"{k}={v}" for k, v in s["settings"].items() if v is not None)
            per_row = "" if s["unit"] == "rows" else f"; {s['units'] / max(s['rows'], 1):.3g} {s['unit']} per row"
            lines.append(f"  {s['stage']}: {s['model']}{f' ({settings})' if settings else ''}{per_row}; from {s['source']}")
    lines += [f"note: {note}" for note in bill["notes"]]
    return "\n".join(lines)
