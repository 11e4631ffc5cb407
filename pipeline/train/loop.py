"""`fgdata train`: one loop for both objectives — AdamW and schedule as each reference builds them
(build_optimizer), gradient accumulation, bf16 autocast on GPU (a setting), safetensors checkpoints with optimizer/schedule/RNG state,
resume, and data parallelism under torchrun: contrastive features are gathered across processes
(with gradients) and gradients are averaged across them before each optimizer step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.core.shards import MODEL_DIR_ENTRIES, claim_output, read_json, write_json
from pipeline.errors import FgdataError
from pipeline.models.reference import absolute_local_paths, is_random_model
from pipeline.train.checkpoints import latest_checkpoint, load_state, remove_checkpoints, save_checkpoint
from pipeline.train.objectives import OBJECTIVES
from pipeline.train.optim import lr_factor, parameter_groups

log = logging.getLogger(__name__)

REPORT_FILE = "train.json"
_MODEL_FILE = "model.safetensors"


def build_optimizer(module, settings, total_steps: int):
    """AdamW and its schedule, as the references build them. FG-CLIP (train.sh, clean_clip_trainer.py:
    40-41, 76-89): wd 1e-3 on all but LayerNorm parameters and biases, 200 warm-up steps then cosine,
    no clipping (zero2.json sets no gradient_clipping). HierarCaps (train.py:212, 249): AdamW's own
    wd 0.01 on every parameter, constant lr, clipping commented out. The settings name each rule."""
    groups = parameter_groups(module, settings.weight_decay, settings.weight_decay_exempt)
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, settings.warmup_steps, total_steps, settings.schedule))
    return optimizer, schedule


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); starts the process group when torchrun launched us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def train(objective_name: str, sources: list[Path], out_dir: Path, config, *, images: Path | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    if objective_name not in OBJECTIVES:
        raise FgdataError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective_name!r}")
    objective_class, section = OBJECTIVES[objective_name]
    settings = getattr(config, section)
    absolute_local_paths(settings, "model")
    rank, world, local_rank = _distributed()
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    out_dir = Path(out_dir).resolve()
    payload = {"objective": objective_name, "settings": asdict(settings), "sources": sorted(map(str, sources)), "images": str(images), "world": world}
    settings_hash = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    torch.manual_seed(settings.seed)
    objective = objective_class([Path(s).resolve() for s in sources], settings, images, device, rank, world)
    if rank == 0:
        claim_output(out_dir, f"train-{objective_name}", settings_hash, overwrite, inputs=list(sources), owned=MODEL_DIR_ENTRIES)
    report = read_json(out_dir / REPORT_FILE)
    if report and report.get("finished"):
        log.info("%s already holds a finished run; --overwrite to train again", out_dir)
        return report

    module = objective.module
    parameters = [p for p in module.parameters() if p.requires_grad]
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * objective.steps_per_epoch()))
    optimizer, schedule = build_optimizer(module, settings, total_steps)
    step, history = 0, []
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint:
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(checkpoint / _MODEL_FILE), device=str(device)), strict=False)
        state = load_state(checkpoint, device)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        step, history = state["step"], state["history"]
        log.info("resuming from %s (step %d of %d)", checkpoint.name, step, total_steps)
    autocast = device != "cpu" and settings.bf16
    if device != "cpu":  # what --tf32 sets in FG-CLIP's train.sh: fp32 matmuls and convolutions on TF32 cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = settings.tf32
    log.info("training %s (%s) on %s: %d steps of %d x %d x %d samples", objective_name, settings.model, device, total_steps, settings.batch_size, settings.gradient_accumulation, world)

    batches = objective.batches(skip_batches=step * settings.gradient_accumulation)
    started, window = time.perf_counter(), []
    bar = tqdm(total=total_steps, initial=step, desc=f"train {objective_name}", unit="step", disable=not progress or rank != 0)
    module.train()
    while step < total_steps:
        parts_sum: dict[str, float] = {}
        for _ in range(settings.gradient_accumulation):
            batch = next(batches, None)
            if batch is None:
                raise FgdataError(f"the training data ran out at step {step}: a whole pass over {', '.join(map(str, sources))} yielded no sample")
            if getattr(objective, "grad_cache", False):  # GradCache: the objective runs its own chunked backward
                loss, parts = objective.cached_step(batch, module, 1 / settings.gradient_accumulation, autocast)
            else:
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss, parts = objective.loss(batch, module)
                (loss / settings.gradient_accumulation).backward()
            for name, value in {"loss": loss.item(), **parts}.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + value / settings.gradient_accumulation
        if world > 1:
            _average_gradients(parameters, world)
        if settings.max_grad_norm > 0:  # off by default: neither reference clips (see build_optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.append(parts_sum)
        bar.update(1)
        bar.set_postfix(loss=f"{parts_sum['loss']:.4f}")
        if step % settings.log_every == 0 or step == total_steps:
            entry = {"step": step, "lr": schedule.get_last_lr()[0], **{k: sum(w[k] for w in window if k in w) / sum(k in w for w in window) for k in window[-1]}}
            history.append(entry)
            window = []
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k not in ("step", "lr")))
        if rank == 0 and step % settings.save_every == 0 and step < total_steps:
            state = {"history": history, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "rng": torch.get_rng_state()}
            save_checkpoint(out_dir, step, lambda d: _save_weights(module, d / _MODEL_FILE), state, settings.keep_checkpoints)
    bar.close()
    if rank != 0:
        return {}
    objective.save(out_dir, module)
    report = {
        "finished": True,
        "objective": objective_name,
        "model": settings.model,
        "model_is_random": is_random_model(settings.model),
        "sources": [str(s) for s in sources],
        "settings": asdict(settings),
        "steps": total_steps,
        "world_size": world,
        "history": history,
        "data": dict(objective.data),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out_dir / REPORT_FILE, report)
    remove_checkpoints(out_dir)
    return report


def _average_gradients(parameters, world: int) -> None:
    """What DDP does, done by hand: the objectives call parts of the model (towers, projections),
    not one forward, so every process averages its gradients with the others here."""
    import torch.distributed as dist

    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad /= world


def _save_weights(module, path: Path) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share memory (tied or viewed weights)
    save_file({k: v.detach().clone().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))
