"""One training loop for `fgdata train` and `fgdata hierarcaps distill` (`run_training`): gradient
accumulation, gradients averaged across processes under torchrun, optional clipping, logging,
the best metric, and checkpoints that hold everything a resumed run needs to end with the same
weights as an uninterrupted one: model (safetensors), optimizer, schedule, every random generator,
step, history, best metric and the run's settings.

`train` is `fgdata train`: AdamW and schedule as each reference builds them (build_optimizer),
bf16 autocast on GPU (a setting), and data parallelism under torchrun: contrastive features are
gathered across processes (with gradients) before the loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.core.shards import MODEL_DIR_ENTRIES, claim_output, read_json, write_json
from pipeline.core.storage import Location, location, resolved
from pipeline.errors import FgdataError
from pipeline.models.reference import absolute_local_paths, is_random_model
from pipeline.train.checkpoints import (
    latest_checkpoint,
    load_state,
    local_model_dir,
    remove_checkpoints,
    rng_state,
    save_checkpoint,
    seeded,
    set_rng_state,
)
from pipeline.train.optim import adamw

log = logging.getLogger(__name__)

REPORT_FILE = "train.json"


@dataclass
class Checkpoints:
    """How a run saves itself: every `every` steps (not at the last) under OUT/checkpoints/, the newest
    `keep` kept. `write_weights` puts the model's files in a checkpoint folder; `config` (the run's
    settings) is saved with each and must match on resume."""

    out_dir: Path
    every: int
    keep: int
    write_weights: Callable[[Path], None]
    config: dict


@dataclass
class Trained:
    history: list[dict]  # one entry per logged step, as `record` built it
    best: dict | None  # {"step", "name", "value"}: the lowest logged value of the metric `best_of` names


def run_training(
    module, optimizer, schedule, step_fn: Callable[[object], dict], batches: Callable[[int], Iterator], *,
    total_steps: int, log_every: int, record: Callable[[int, dict, float], dict], checkpoints: Checkpoints,
    resume: Path | None = None, accumulation: int = 1, max_grad_norm: float = 0.0, best_of: str = "loss",
    device: str = "cpu", rank: int = 0, world: int = 1, desc: str = "train", progress: bool = True, data_name: str = "the data",
) -> Trained:
    """Trains `module` from step 0, or from the checkpoint `resume` (whose weights the caller has
    already loaded into `module`), to `total_steps`.

    step_fn(batch) runs one micro-batch's forward and backward (the loss divided by `accumulation`)
    and returns its floats ({"loss": ..., parts}); batches(step) is the batch stream from optimizer
    step `step` on; record(step, means, lr) turns the means of the steps since the last log into a
    history entry (and logs it)."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    step, history, best, state = 0, [], None, None
    if resume:
        state = _resume(resume, optimizer, schedule, checkpoints.config)
        step, history, best = state["step"], state["history"], state.get("best")
        log.info("resuming from %s (step %d of %d)", resume.name, step, total_steps)
    # the stream first: a DataLoader draws its workers' seed as it starts, from the run's seed as in an
    # uninterrupted run; then the generators as the checkpoint left them
    stream = batches(step)
    if state:
        set_rng_state(state, device)
    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", disable=not progress or rank != 0)
    window: list[dict] = []
    module.train()
    while step < total_steps:
        parts = _accumulate(step_fn, stream, accumulation, f"the training data ran out at step {step}: a whole pass over {data_name} yielded no sample")
        if world > 1:
            _average_gradients(parameters, world)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.append(parts)
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.4f}")
        if step % log_every == 0 or step == total_steps:
            means = {k: sum(w[k] for w in window if k in w) / sum(k in w for w in window) for k in window[-1]}
            history.append(record(step, means, schedule.get_last_lr()[0]))
            window = []
            best = _better(best, history[-1], step, best_of)
        if rank == 0 and step % checkpoints.every == 0 and step < total_steps:
            state = {
                "history": history, "best": best, "config": _settings_text(checkpoints.config),
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), **rng_state(device),
            }
            save_checkpoint(checkpoints.out_dir, step, checkpoints.write_weights, state, checkpoints.keep)
    bar.close()
    return Trained(history, best)


def _resume(checkpoint: Path, optimizer, schedule, config: dict) -> dict:
    # read onto the CPU: the RNG states must be CPU tensors; the optimizer moves its own to the parameters' device
    state = load_state(checkpoint)
    if state.get("config") is not None and state["config"] != _settings_text(config):
        raise FgdataError(f"cannot resume from {checkpoint}: it was written with other settings; delete {checkpoint.parent} to start over")
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return state


def _settings_text(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _accumulate(step_fn, stream, accumulation: int, ran_out: str) -> dict:
    """One optimizer step's micro-batches: their gradients add up, their floats are averaged."""
    parts_sum: dict[str, float] = {}
    for _ in range(accumulation):
        batch = next(stream, None)
        if batch is None:
            raise FgdataError(ran_out)
        for name, value in step_fn(batch).items():
            parts_sum[name] = parts_sum.get(name, 0.0) + value / accumulation
    return parts_sum


def _better(best: dict | None, entry: dict, step: int, name: str) -> dict | None:
    value = entry.get(name)
    if value is None or (best is not None and best["value"] <= value):
        return best
    return {"step": step, "name": name, "value": value}


def build_optimizer(module, settings, total_steps: int):
    """AdamW and its schedule, as the references build them. FG-CLIP (train.sh, clean_clip_trainer.py:
    40-41, 76-89): wd 1e-3 on all but LayerNorm parameters and biases, 200 warm-up steps then cosine,
    no clipping (zero2.json sets no gradient_clipping). HierarCaps (train.py:212, 249): AdamW's own
    wd 0.01 on every parameter, constant lr, clipping commented out. The settings name each rule."""
    return adamw(module, settings.learning_rate, settings.weight_decay, settings.weight_decay_exempt, settings.warmup_steps, total_steps, settings.schedule)


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); starts the process group when torchrun launched us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # so NCCL's barrier and collectives use this process's GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, local_rank


def claim_then_read(rank: int, claim: Callable[[], object], report: Path) -> dict | None:
    """Rank 0 claims the output (an --overwrite deletes the last run's report); every rank waits at the
    barrier until it has, and only then reads the report, so no rank sees a stale finished
    train.json, returns early and leaves the others waiting in a collective."""
    if rank == 0:
        claim()
    _barrier()
    return read_json(report)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def train(objective_name: str, sources: list[Location | str], out_dir: Path | str, config, *, images: Location | str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """`fgdata train`: `sources` and `images` are local paths or URIs (read through their store);
    `out_dir` is a local folder."""
    from pipeline.train.objectives import OBJECTIVES

    out_dir = local_model_dir(out_dir).resolve()
    # as Paths (or UPaths): a local path's text, in the settings hash and train.json, is what it was
    sources, images = [location(s) for s in sources], location(images) if images else None
    if objective_name not in OBJECTIVES:
        raise FgdataError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective_name!r}")
    objective_class, section = OBJECTIVES[objective_name]
    settings = getattr(config, section)
    absolute_local_paths(settings, "model")
    rank, world, local_rank = _distributed()
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    payload = {"objective": objective_name, "settings": asdict(settings), "sources": sorted(map(str, sources)), "images": str(images), "world": world}
    settings_hash = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    with seeded(settings.seed, device):
        objective = objective_class([resolved(s) for s in sources], settings, images, device, rank, world)
        claim = partial(claim_output, out_dir, f"train-{objective_name}", settings_hash, overwrite, inputs=list(sources), owned=MODEL_DIR_ENTRIES)
        report = claim_then_read(rank, claim, out_dir / REPORT_FILE)
        if report and report.get("finished"):
            log.info("%s already holds a finished run; --overwrite to train again", out_dir)
            return report
        started = time.perf_counter()
        total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * objective.steps_per_epoch()))
        trained = _train_objective(objective, settings, out_dir, total_steps, device, rank, world, progress, ", ".join(map(str, sources)))
    if rank != 0:
        return {}
    objective.save(out_dir, objective.module)
    report = {
        "finished": True,
        "objective": objective_name,
        "model": settings.model,
        "model_is_random": is_random_model(settings.model),
        "sources": [str(s) for s in sources],
        "settings": asdict(settings),
        "steps": total_steps,
        "world_size": world,
        "history": trained.history,
        "data": dict(objective.data),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out_dir / REPORT_FILE, report)
    remove_checkpoints(out_dir)
    return report


def _train_objective(objective, settings, out_dir: Path, total_steps: int, device: str, rank: int, world: int, progress: bool, data_name: str) -> Trained:
    """An objective's step (its loss, or GradCache's chunked backward) in the one loop."""
    module = objective.module
    optimizer, schedule = build_optimizer(module, settings, total_steps)
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint:
        objective.load_weights(checkpoint, module)
    autocast = device != "cpu" and settings.bf16
    if device != "cpu":  # what --tf32 sets in FG-CLIP's train.sh: fp32 matmuls and convolutions on TF32 cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = settings.tf32
    per_process = getattr(objective, "batch_size", settings.batch_size)  # fgclip's global_batch_size shares it out
    log.info("training %s (%s) on %s: %d steps of %d x %d x %d samples", objective.name, settings.model, device, total_steps, per_process, settings.gradient_accumulation, world)

    def step(batch) -> dict:
        if getattr(objective, "grad_cache", False):  # GradCache: the objective runs its own chunked backward
            loss, parts = objective.cached_step(batch, module, 1 / settings.gradient_accumulation, autocast)
        else:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
                loss, parts = objective.loss(batch, module)
            (loss / settings.gradient_accumulation).backward()
        return {"loss": loss.item(), **parts}

    def record(step: int, means: dict, lr: float) -> dict:
        entry = {"step": step, "lr": lr, **means}
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k not in ("step", "lr")))
        return entry

    return run_training(
        module, optimizer, schedule, step, lambda start: objective.batches(skip_batches=start * settings.gradient_accumulation),
        total_steps=total_steps, log_every=settings.log_every, record=record, resume=checkpoint,
        # a checkpoint's weights are a model folder as the finished run's (FG-CLIP's layout: its code reads them)
        checkpoints=Checkpoints(out_dir, settings.save_every, settings.keep_checkpoints, lambda d: objective.save(d, module), asdict(settings)),
        accumulation=settings.gradient_accumulation, max_grad_norm=settings.max_grad_norm,
        device=device, rank=rank, world=world, desc=f"train {objective.name}", progress=progress, data_name=data_name,
    )


def _average_gradients(parameters, world: int) -> None:
    """What DDP does, done by hand: the objectives call parts of the model (towers, projections),
    not one forward, so every process averages its gradients with the others here."""
    import torch.distributed as dist

    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad /= world
