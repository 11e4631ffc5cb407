"""`fgdata hierarcaps distill`: fine-tune Flan-T5 on validated chains, in both directions.

One model learns two tasks, told apart by a prefix: `generalize: <caption>` → the generic
tiers above it (`animal => goat => goat on an island`), and `specify: <tier>` → the next, more
specific tier (`specify: goat` → `goat on an island`; `specify: ` → a top tier). The first
builds hierarchies for new captions; the second hallucinates siblings of a tier for negatives.

Plain PyTorch in `fgdata train`'s loop (loop.run_training): a deterministic batch order (a fixed
permutation per epoch), checkpoints in safetensors with the optimizer, schedule, RNG state and best
evaluation loss, so a killed run resumes to the same weights; evaluation loss on chains held out by
key, and exact match at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

from pipeline.config import DistillConfig
from pipeline.core.shards import (
    MODEL_DIR_ENTRIES,
    claim_output,
    lineage_entry,
    read_json,
    write_json,
)
from pipeline.core.storage import Location, location, resolved
from pipeline.datasets.chains import SEPARATOR, TO_GENERAL, TO_SPECIFIC, normal_text
from pipeline.datasets.hierarcaps_csv import read_chains
from pipeline.errors import FgdataError
from pipeline.models.reference import (
    RANDOM_WEIGHTS_MARKER,
    absolute_local_paths,
    is_random_model,
)
from pipeline.train.checkpoints import latest_checkpoint, local_model_dir, remove_checkpoints, seeded
from pipeline.train.loop import Checkpoints, run_training
from pipeline.train.optim import adamw

log = logging.getLogger(__name__)

REPORT_FILE = "distill.json"


def distillation_pairs(tiers: list[str]) -> list[tuple[str, str]]:
    """The (source, target) pairs one chain teaches: caption → generic tiers, and each tier (from
    the empty root) → the next more specific one."""
    pairs = [(TO_GENERAL + tiers[-1], SEPARATOR.join(tiers[:-1]))]
    parents = [""] + tiers[:-1]
    pairs += [(TO_SPECIFIC + parent, child) for parent, child in zip(parents, tiers)]
    return pairs


def held_out(key: str, fraction: float) -> bool:
    """Stable by key, so a resumed or repeated run holds out the same chains."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def distill(dataset_dirs: list[Location | str], out_dir: Path | str, settings: DistillConfig, *, overwrite: bool = False, progress: bool = True) -> dict:
    """`dataset_dirs`: hierarcaps datasets or official CSVs, local paths or URIs (read through their
    store); `out_dir`: a local folder."""
    import torch

    out_dir = local_model_dir(out_dir).resolve()
    dataset_dirs = [location(d) for d in dataset_dirs]  # a local path's text, in the settings hash, is what it was
    absolute_local_paths(settings, "base_model")
    settings_hash = hashlib.sha256(json.dumps({**asdict(settings), "inputs": sorted(map(str, dataset_dirs))}, sort_keys=True).encode()).hexdigest()[:16]
    dropped: Counter = Counter()  # chains the reader left out, by reason: they go in the report
    # the first input's chain of a key: `fgdata run hierarcaps` seeds and augments the same captions
    chains = [(key, tiers) for key, tiers, _ in read_chains(dataset_dirs, counts=dropped, first_of_each_key=True)]
    claim_output(out_dir, "hierarcaps-distill", settings_hash, overwrite, inputs=list(dataset_dirs), owned=MODEL_DIR_ENTRIES)
    report = read_json(out_dir / REPORT_FILE)
    if report and report.get("finished"):
        log.info("%s already holds a finished distillation; --overwrite to train again", out_dir)
        return report

    evaluation = [tiers for key, tiers in chains if held_out(key, settings.eval_fraction)][: settings.max_eval_chains]
    training = [tiers for key, tiers in chains if not held_out(key, settings.eval_fraction)]
    if not training:
        raise FgdataError("no chains left to train on; give more chains or a smaller distill.eval_fraction")
    pairs = [pair for tiers in training for pair in distillation_pairs(tiers)]
    eval_pairs = [pair for tiers in evaluation for pair in distillation_pairs(tiers)]
    steps_per_epoch = math.ceil(len(pairs) / settings.batch_size)
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = latest_checkpoint(out_dir)
    from pipeline.models.seq2seq import load_seq2seq

    # a checkpoint folder is a model folder: resuming loads its weights as the base's
    tokenizer, model = load_seq2seq(str(checkpoint or settings.base_model), revision=None if checkpoint else settings.revision)
    model.to(device)
    # the transformers Trainer's rule: no decay on biases and LayerNorm (T5LayerNorm) weights
    optimizer, schedule = adamw(model, settings.learning_rate, settings.weight_decay, "norms_biases", settings.warmup_steps, total_steps, "linear")
    log.info(
        "distilling %s on %d chains (%d pairs), %d held out; %d steps of %d pairs on %s",
        settings.base_model, len(training), len(pairs), len(evaluation), total_steps, settings.batch_size, device,
    )

    objective = Seq2SeqObjective(tokenizer, model, settings, eval_pairs, device)

    def batches(start: int):
        return (_batch_at(s, pairs, settings.batch_size, steps_per_epoch, settings.seed) for s in itertools.count(start))

    started = time.perf_counter()
    # seeded for T5's dropout (the batch order has its own generator); a resumed run takes the checkpoint's state
    with seeded(settings.seed, device):
        trained = run_training(
            model, optimizer, schedule, objective.step, batches, total_steps=total_steps, log_every=settings.eval_every, record=objective.record,
            # model.safetensors + config.json, and the tokenizer, so a checkpoint loads like a model
            checkpoints=Checkpoints(out_dir, settings.save_every, settings.keep_checkpoints, lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)), asdict(settings)),
            resume=checkpoint, max_grad_norm=1.0, best_of="eval_loss", device=device, desc="distill", progress=progress,
        )

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    base_is_random = is_random_model(settings.base_model)
    if base_is_random:
        # trained from random weights on what we gave it: still a toy, and its rows say so
        (out_dir / RANDOM_WEIGHTS_MARKER).write_text(json.dumps({"note": f"fine-tuned from the random-weight model {settings.base_model}"}))
    from pipeline.models.seq2seq import Seq2SeqGenerator

    generator = Seq2SeqGenerator(str(out_dir), max_source_tokens=settings.max_source_tokens)
    report = {
        "finished": True,
        "base_model": settings.base_model,
        "base_is_random": base_is_random,
        "inputs": [lineage_entry(resolved(d)) for d in dataset_dirs],
        "settings": asdict(settings),
        "chains": {"train": len(training), "held_out": len(evaluation)},
        "chains_dropped": dict(sorted(dropped.items())),  # left out by the reader, by reason
        "pairs": {"train": len(pairs), "held_out": len(eval_pairs)},
        "steps": total_steps,
        "history": trained.history,
        "held_out_exact_match": exact_match(generator, evaluation, known_children(tiers for _, tiers in chains)) if evaluation else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out_dir / REPORT_FILE, report)
    remove_checkpoints(out_dir)
    return report


class Seq2SeqObjective:
    """What distill gives the loop: Flan-T5's cross-entropy on a batch of (source, target) pairs, and at
    each log the mean loss on the held-out pairs."""

    def __init__(self, tokenizer, model, settings: DistillConfig, eval_pairs: list, device: str):
        self.tokenizer, self.model, self.settings, self.eval_pairs, self.device = tokenizer, model, settings, eval_pairs, device

    def _encode(self, batch):
        sources, targets = zip(*batch)
        s, tokenizer = self.settings, self.tokenizer
        inputs = tokenizer(list(sources), max_length=s.max_source_tokens, truncation=True, padding=True, return_tensors="pt")
        labels = tokenizer(text_target=list(targets), max_length=s.max_target_tokens, truncation=True, padding=True, return_tensors="pt").input_ids
        labels[labels == tokenizer.pad_token_id] = -100  # padding does not count in the loss
        return inputs.to(self.device), labels.to(self.device)

    def loss(self, batch):
        import torch

        inputs, labels = self._encode(batch)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
            return self.model(**inputs, labels=labels).loss

    def step(self, batch) -> dict:
        loss = self.loss(batch)
        loss.backward()
        return {"loss": loss.item()}

    def evaluation_loss(self) -> float | None:
        import torch

        pairs, size = self.eval_pairs, self.settings.batch_size
        if not pairs:
            return None
        self.model.eval()
        with torch.no_grad():
            losses = [(self.loss(pairs[i : i + size]).item(), len(pairs[i : i + size])) for i in range(0, len(pairs), size)]
        self.model.train()
        return sum(loss * n for loss, n in losses) / len(pairs)

    def record(self, step: int, means: dict, lr: float) -> dict:
        entry = {"step": step, "train_loss": means["loss"], "eval_loss": self.evaluation_loss()}
        log.info("step %d: train loss %.4f, eval loss %s", step, entry["train_loss"], "n/a" if entry["eval_loss"] is None else f"{entry['eval_loss']:.4f}")
        return entry


def known_children(chains) -> dict[str, set[str]]:
    """Every child each tier has in the data (the root "" included): the right answers for `specify:`."""
    children = defaultdict(set)
    for tiers in chains:
        for parent, child in zip([""] + tiers[:-1], tiers):
            children[normal_text(parent)].add(normal_text(child))
    return children


def exact_match(generator, chains: list[list[str]], children: dict[str, set[str]], max_new_tokens: int = 64, batch_size: int = 64) -> dict:
    """Greedy decoding on held-out chains. to_general: the generated tiers equal the chain's;
    to_specific: the generated child is one the data has for that parent (there are many right answers)."""
    general_hits = specific_hits = specific_total = 0
    for start in range(0, len(chains), batch_size):
        batch = chains[start : start + batch_size]
        outputs = generator.generate([TO_GENERAL + tiers[-1] for tiers in batch], max_new_tokens=max_new_tokens)
        general_hits += sum(normal_text(out[0]) == normal_text(SEPARATOR.join(tiers[:-1])) for out, tiers in zip(outputs, batch))
        parents = [parent for tiers in batch for parent in [""] + tiers[:-1]]
        outputs = generator.generate([TO_SPECIFIC + parent for parent in parents], max_new_tokens=max_new_tokens)
        specific_hits += sum(normal_text(out[0]) in children[normal_text(parent)] for out, parent in zip(outputs, parents))
        specific_total += len(parents)
    return {"to_general": general_hits / len(chains), "to_specific": specific_hits / specific_total}


def _batch_at(step: int, pairs: list, batch_size: int, steps_per_epoch: int, seed: int) -> list:
    """The batch of `step` is fixed by the seed, so a resumed run sees the same batches."""
    import torch

    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [pairs[i] for i in order[index * batch_size : (index + 1) * batch_size]]
