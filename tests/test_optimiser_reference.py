"""The optimiser and schedule of `fgdata train` and `fgdata hierarcaps distill` against the reference
trainers: FG-CLIP (360CVGroup/FG-CLIP 0fcea59: scripts/train.sh, scripts/zero2.json,
fgclip/train/clean_clip_trainer.py:40-41, 76-89) and HierarCaps (code/train.py:212, 249). The
reference rules are computed here with transformers' own functions, not with pipeline code."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.config import Config, FgclipTrainConfig, load_config
from pipeline.errors import FgdataError
from pipeline.train.optim import exempt_names, lr_factor, parameter_groups


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.datasets.synthetic_world import COLOURS, SHAPES, write_world
    from pipeline.models.tiny import build_tiny_clip, build_tiny_t5

    root = tmp_path_factory.mktemp("opt")
    vocabulary = [f"a {c} {s}" for c in COLOURS for s in SHAPES] * 5 + ["a photo of shape animal plant vehicle person"] * 5
    return {"world": write_world(root / "world", 40, seed=3), "clip": build_tiny_clip(root / "clip", vocabulary), "t5": build_tiny_t5(root / "t5", vocabulary), "root": root}


def fgclip_like(path: Path):
    """A tiny CLIPModel with the extras FG-CLIP trains (train_fgclip.py:386-387): two more logit scales."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(path)
    model.logit_scale_finegraind = torch.nn.Parameter(torch.ones([]) * model.logit_scale)
    model.logit_scale_hardneg = torch.nn.Parameter(torch.ones([]) * model.logit_scale)
    return model


def decayed(groups) -> set[int]:
    return {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}


def test_fgclip_decays_all_but_layernorm_parameters_and_biases_as_clean_clip_trainer(tiny):
    from transformers.trainer_pt_utils import get_parameter_names

    model = fgclip_like(tiny["clip"])
    # clean_clip_trainer.py:40-41: ALL_LAYERNORM_LAYERS was [nn.LayerNorm]
    reference = [n for n in get_parameter_names(model, [torch.nn.LayerNorm]) if "bias" not in n]
    named = dict(model.named_parameters())
    groups = parameter_groups(model, FgclipTrainConfig().weight_decay, FgclipTrainConfig().weight_decay_exempt)
    assert decayed(groups) == {id(named[n]) for n in reference}
    assert all(g["weight_decay"] in (0.0, 1e-3) for g in groups)
    # what open_clip would exempt and FG-CLIP does not: logit scales and embedding tables are decayed
    for name in ("logit_scale", "logit_scale_finegraind", "logit_scale_hardneg", "text_model.embeddings.position_embedding.weight",
                 "text_model.embeddings.token_embedding.weight", "vision_model.embeddings.class_embedding"):
        assert id(named[name]) in decayed(groups), name
    assert id(named["text_model.final_layer_norm.weight"]) not in decayed(groups)
    assert id(named["visual_projection.weight"]) in decayed(groups)


def test_open_clip_rule_exempts_every_1d_parameter_and_the_logit_scales(tiny):
    model = fgclip_like(tiny["clip"])
    named = dict(model.named_parameters())
    groups = parameter_groups(model, 1e-3, "open_clip")
    # open_clip's main.py rule, restated: p.ndim < 2 or a logit scale
    assert decayed(groups) == {id(p) for n, p in named.items() if not (p.ndim < 2 or "logit_scale" in n)}
    assert id(named["logit_scale"]) not in decayed(groups) and id(named["vision_model.embeddings.class_embedding"]) not in decayed(groups)


def test_none_rule_decays_every_trainable_parameter_as_torch_adamw_does(tiny):
    model = fgclip_like(tiny["clip"])
    for p in model.vision_model.parameters():
        p.requires_grad = False  # the re objective trains the text side only
    groups = parameter_groups(model, 0.01, "none")
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.01
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters() if p.requires_grad}


def test_distill_decays_as_the_transformers_trainer(tiny, monkeypatch):
    from transformers import T5ForConditionalGeneration, Trainer

    from pipeline.config import DistillConfig
    from pipeline.train.distill import distill

    model = T5ForConditionalGeneration.from_pretrained(tiny["t5"])
    reference = set(Trainer.get_decay_parameter_names(None, model))  # its self is not used
    assert exempt_names(model, "norms_biases") == {n for n, _ in model.named_parameters()} - reference
    assert any("layer_norm" in n for n in exempt_names(model, "norms_biases"))  # T5LayerNorm is no nn.LayerNorm

    # the groups distill hands to AdamW
    seen = {}

    class Stop(Exception):
        pass

    class Spy(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            seen["groups"], seen["kwargs"] = list(params), kwargs
            raise Stop

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    with pytest.raises(Stop):
        distill([tiny["world"]["hierarcaps"]], tiny["root"] / "distilled", DistillConfig(base_model=str(tiny["t5"]), eval_fraction=0.0), progress=False)
    # the same architecture loaded by distill: its groups hold exactly the reference's counts (the
    # reference lists tied embeddings once per name, AdamW gets each tensor once)
    decayed_tensors = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in reference}
    assert [g["weight_decay"] for g in seen["groups"]] == [0.01, 0.0]
    assert len(seen["groups"][0]["params"]) == len(decayed_tensors)
    assert len(seen["groups"][1]["params"]) == len(list(model.parameters())) - len(decayed_tensors) > 0


def test_schedule_is_transformers_cosine_with_warmup_and_constant():
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    def factors(make, steps):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = make(optimizer)
        out = []
        for _ in range(steps):
            out.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return out

    total = 1000
    cosine = factors(lambda o: get_cosine_schedule_with_warmup(o, 200, total), total + 5)
    assert [lr_factor(s, 200, total) for s in range(total + 5)] == pytest.approx(cosine, abs=1e-12)
    constant = factors(lambda o: get_constant_schedule_with_warmup(o, 20), 100)
    assert [lr_factor(s, 20, 100, "constant") for s in range(100)] == pytest.approx(constant, abs=1e-12)
    assert lr_factor(0, 0, 100, "constant") == lr_factor(99, 0, 100, "constant") == 1.0


def test_fgclip_build_optimizer_runs_train_sh_recipe(tiny):
    from pipeline.train.loop import build_optimizer

    settings = FgclipTrainConfig()
    # train.sh:27, 36-39: 1 epoch, lr 1e-6, wd 0.001, 200 warm-up steps, cosine
    assert (settings.epochs, settings.learning_rate, settings.weight_decay, settings.warmup_steps, settings.schedule) == (1.0, 1e-6, 1e-3, 200, "cosine")
    # zero2.json has no gradient_clipping (DeepSpeed's default 0); train.sh:28, 41: bf16, tf32
    assert (settings.max_grad_norm, settings.bf16, settings.tf32, settings.weight_decay_exempt) == (0.0, True, True, "norms_biases")
    model = fgclip_like(tiny["clip"])
    optimizer, schedule = build_optimizer(model, settings, 1000)
    lrs = []
    for _ in range(1000):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[0] == 0.0 and lrs[100] == pytest.approx(0.5e-6) and max(lrs) == pytest.approx(1e-6)
    assert lrs[600] == pytest.approx(0.5e-6 * (1 + math.cos(math.pi * 400 / 800)))
    assert {g["weight_decay"] for g in optimizer.param_groups} == {1e-3, 0.0}


@pytest.mark.parametrize("clip", [None, 1.0])
def test_train_clips_gradients_only_when_asked_and_runs_one_epoch(tiny, tmp_path, monkeypatch, clip):
    from pipeline.train import loop

    calls = []
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, *a, **k: calls.append(max_norm) or original(params, max_norm, *a, **k))
    built = {}

    def spy(module, settings, total):
        built["optimizer"], built["schedule"] = result = build(module, settings, total)
        return result

    build = loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer", spy)
    overrides = [f"radial.model={tiny['clip']}", "radial.log_every=1", "run.progress=false"] + ([f"radial.max_grad_norm={clip}"] if clip else [])
    report = loop.train("re", [tiny["world"]["hierarcaps"]], tmp_path / "re", load_config(None, overrides), progress=False)
    steps_per_epoch = report["data"]["rows_usable"] // 8
    assert report["steps"] == steps_per_epoch >= 2  # 1 epoch of batches of 8
    assert calls == ([] if clip is None else [1.0] * report["steps"])
    # HierarCaps: constant lr 1e-7 from the first step, every trainable parameter decayed at 0.01
    assert [e["lr"] for e in report["history"]] == [1e-7] * report["steps"]
    assert [g["weight_decay"] for g in built["optimizer"].param_groups] == [0.01]


def test_unknown_schedule_or_decay_rule_is_one_line_before_any_work():
    with pytest.raises(FgdataError, match=r"setting fgclip.schedule='linear' must be one of cosine, constant"):
        load_config(None, ["fgclip.schedule=linear"])
    with pytest.raises(FgdataError, match=r"radial.weight_decay_exempt='all' must be one of norms_biases, open_clip, none"):
        load_config(None, ["radial.weight_decay_exempt=all"])
    with pytest.raises(FgdataError, match=r"fgclip.max_grad_norm=-1.0 is out of range"):
        load_config(None, ["fgclip.max_grad_norm=-1"])
    assert Config().radial.schedule == "constant" and Config().fgclip.schedule == "cosine"
