"""Which parameters AdamW decays, and the learning-rate schedule: the rules of the reference trainers.

Weight decay (`weight_decay_exempt`):
- "norms_biases": every trainable parameter except LayerNorm parameters and biases. This is the
  transformers Trainer's rule, which FG-CLIP's trainer copies (clean_clip_trainer.py:40-41, 76-89):
  logit scales, embeddings and position tables *are* decayed. For a CLIP model the names matched by
  today's transformers patterns are exactly the LayerNorm modules and biases of the FG-CLIP era.
- "open_clip": open_clip's rule: no decay on any parameter of fewer than 2 dimensions (biases,
  norms, scalars) nor on the logit scales.
- "none": nothing exempt, every parameter decayed: `AdamW(model.parameters())` as HierarCaps'
  train.py:212 builds it.
"""

from __future__ import annotations

import math
import re

import torch

from pipeline.config import CHOICES

DECAY_RULES = CHOICES["weight_decay_exempt"]

# transformers' Trainer.get_decay_parameter_names: name patterns, on the lower-cased name
_NORM_OR_BIAS = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def _norm_module(module: torch.nn.Module) -> bool:
    # nn.LayerNorm, and the models' own norm classes (T5LayerNorm is not an nn.LayerNorm)
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def exempt_names(module: torch.nn.Module, rule: str) -> set[str]:
    """Names of the parameters of `module` that get no weight decay under `rule`."""
    if rule not in DECAY_RULES:
        raise ValueError(f"weight_decay_exempt must be one of {', '.join(DECAY_RULES)}, got {rule!r}")
    if rule == "none":
        return set()
    if rule == "open_clip":
        return {name for name, p in module.named_parameters() if p.ndim < 2 or "logit_scale" in name}
    exempt = {name for name, _ in module.named_parameters() if _NORM_OR_BIAS.search(name.lower())}
    for prefix, sub in module.named_modules():
        if _norm_module(sub):
            exempt.update(f"{prefix}.{name}" if prefix else name for name, _ in sub.named_parameters())
    return exempt


def parameter_groups(module: torch.nn.Module, weight_decay: float, rule: str) -> list[dict]:
    """AdamW groups of the trainable parameters: decayed at `weight_decay`, and the exempt at 0."""
    exempt = exempt_names(module, rule)
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if name not in exempt], "weight_decay": weight_decay},
        {"params": [p for name, p in trainable if name in exempt], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def adamw(module: torch.nn.Module, learning_rate: float, weight_decay: float, rule: str, warmup: int, total: int, schedule: str):
    """AdamW over the trainable parameters (decay by `rule`) and its LambdaLR schedule: the one
    builder behind `fgdata train` and `fgdata hierarcaps distill`."""
    optimizer = torch.optim.AdamW(parameter_groups(module, weight_decay, rule), lr=learning_rate)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, schedule))


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """The factor on the learning rate at optimizer step `step` (0-based).

    "cosine" and "constant" are transformers' get_cosine_schedule_with_warmup /
    get_constant_schedule_with_warmup (FG-CLIP's train.sh runs the first): linear from 0 over
    `warmup` steps, then a half cosine to 0 at `total`, or flat.
    "linear" is distill's: its warm-up counts the step being taken, (step + 1) / warmup, so the
    first step already learns; then a straight line to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup if schedule == "linear" else step / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
