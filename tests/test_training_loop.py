"""The one training loop behind `fgdata train` and `fgdata hierarcaps distill` (train/loop.py):
a run stopped after a checkpoint and resumed ends with exactly the weights of an uninterrupted run,
because the checkpoint holds model, optimizer, schedule, every random generator, step, config and
best metric; training leaves the caller's random state alone; under torchrun every rank waits for
rank 0's claim of the output before reading its report."""

from __future__ import annotations

import json
import random
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import DistillConfig, load_config
from pipeline.core.shards import MODEL_DIR_ENTRIES, claim_output, write_json
from pipeline.errors import FgdataError
from pipeline.train import loop
from pipeline.train.checkpoints import latest_checkpoint, load_state, save_checkpoint, seeded
from pipeline.train.optim import adamw, lr_factor


class Killed(Exception):
    pass


@pytest.fixture
def kill_after(monkeypatch):
    """Makes the loop's checkpoint save at `step` the last thing the run does, as a kill right after it would."""

    def arm(step: int):
        def save_then_die(out_dir, at, *args, **kwargs):
            saved = save_checkpoint(out_dir, at, *args, **kwargs)
            if at == step:
                raise Killed(saved)
            return saved

        monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
        return monkeypatch

    return arm


# --- the loop itself, on a toy model that draws from every generator ------------------------------


def toy_run(out: Path, total: int = 8, config: dict | None = None):
    """A linear model whose loss is scaled by draws from python's, numpy's and torch's global generators
    (as dropout or augmentation would draw), with warm-up + cosine AdamW, logged every step."""
    weights = torch.Generator().manual_seed(1)
    module = torch.nn.utils.skip_init(torch.nn.Linear, 4, 1)  # no draw from the caller's generator
    with torch.no_grad():
        module.weight.copy_(torch.randn(1, 4, generator=weights))
        module.bias.zero_()
    checkpoint = latest_checkpoint(out)
    if checkpoint:
        module.load_state_dict(load_file(checkpoint / "model.safetensors"))
    optimizer, schedule = adamw(module, 0.05, 0.01, "norms_biases", 2, total, "cosine")

    def step(x):
        noise = 1 + random.random() + float(np.random.rand()) + torch.rand(()).item()
        loss = ((module(x).squeeze(-1) - x.sum(-1)) ** 2).mean() * noise
        loss.backward()
        return {"loss": loss.item()}

    def batches(start):
        # the data of step s depends only on s, as a resumed stream must
        for s in range(start, 10_000):
            yield torch.randn(5, 4, generator=torch.Generator().manual_seed(100 + s))

    def record(at, means, lr):
        return {"step": at, "lr": lr, **means, "score": abs(at - 3) + means["loss"] * 0}  # lowest at step 3

    def write(folder: Path):
        save_file({k: v.detach().clone() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))

    with seeded(7):
        trained = loop.run_training(
            module, optimizer, schedule, step, batches, total_steps=total, log_every=1, record=record,
            checkpoints=loop.Checkpoints(out, 2, 2, write, config or {"seed": 7}), resume=checkpoint, best_of="score", progress=False,
        )
    return module, trained


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights_history_and_best(tmp_path, kill_after):
    whole_module, whole = toy_run(tmp_path / "whole")
    patch = kill_after(4)
    with pytest.raises(Killed):
        toy_run(tmp_path / "killed")
    patch.undo()
    state = load_state(latest_checkpoint(tmp_path / "killed"))
    assert state["step"] == 4 and state["best"] == {"step": 3, "name": "score", "value": 0}
    assert set(state) >= {"optimizer", "schedule", "rng", "cuda_rng", "python_rng", "numpy_rng", "config", "history"}
    resumed_module, resumed = toy_run(tmp_path / "killed")
    # every generator, the AdamW moments and the schedule step restored: the same floats, not close ones
    assert all(torch.equal(a, b) for a, b in zip(whole_module.state_dict().values(), resumed_module.state_dict().values()))
    assert resumed.history == whole.history and len(resumed.history) == 8
    assert resumed.best == whole.best == {"step": 3, "name": "score", "value": 0}  # found before the kill


def test_a_checkpoint_of_other_settings_is_refused_in_one_line(tmp_path, kill_after):
    patch = kill_after(2)
    with pytest.raises(Killed):
        toy_run(tmp_path / "run", config={"seed": 7, "learning_rate": 0.05})
    patch.undo()
    with pytest.raises(FgdataError, match="written with other settings") as refused:
        toy_run(tmp_path / "run", config={"seed": 7, "learning_rate": 0.5})
    assert "\n" not in str(refused.value)


def test_training_is_deterministic_and_leaves_the_callers_random_state_alone(tmp_path):
    def draws():
        return random.random(), float(np.random.rand()), torch.rand(()).item()

    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = draws()
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    first, _ = toy_run(tmp_path / "a")
    assert draws() == expected
    second, _ = toy_run(tmp_path / "b")  # another caller state, the same seed: the same weights
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_one_schedule_function_serves_train_and_distill():
    # distill's rule: the warm-up counts the step being taken, then a straight line to 0 at the end
    assert [lr_factor(s, 4, 12, "linear") for s in (0, 1, 3, 4, 8, 12)] == [0.25, 0.5, 1.0, 1.0, 0.5, 0.0]
    # transformers' cosine warm-up starts at 0 (checked against transformers in test_optimiser_reference.py)
    assert lr_factor(0, 4, 12) == 0.0 and lr_factor(8, 4, 12) == pytest.approx(0.5)
    import pipeline.train.distill as distill_module

    assert not hasattr(distill_module, "_lr_factor") and distill_module.run_training is loop.run_training


# --- fgdata train and fgdata hierarcaps distill, killed and resumed -------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from synthetic import synthetic_chains  # bench/, on the path through conftest

    from pipeline.datasets.synthetic_world import COLOURS, SHAPES, write_world
    from pipeline.models.tiny import build_tiny_clip, build_tiny_t5
    from pipeline.train.distill import distillation_pairs

    root = tmp_path_factory.mktemp("loop")
    vocabulary = [f"a {c} {s}" for c in COLOURS for s in SHAPES] * 5 + ["a photo of shape animal plant vehicle person"] * 5
    chains = synthetic_chains(60, seed=4)
    t5 = build_tiny_t5(root / "t5", [text for tiers in chains for pair in distillation_pairs(tiers) for text in pair])
    # dropout on: the resumed run matches only if torch's generator is restored too
    config = json.loads((t5 / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.1}))
    return {"world": write_world(root / "world", 40, seed=3), "clip": build_tiny_clip(root / "clip", vocabulary), "t5": t5, "chains": chains}


def same_files(a: Path, b: Path) -> bool:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("objective", ["re", "fgclip"])
def test_train_stopped_after_a_checkpoint_resumes_to_the_same_weights(tiny, tmp_path, kill_after, objective):
    if objective == "re":
        source, overrides = tiny["world"]["hierarcaps"], [f"radial.model={tiny['clip']}", "radial.learning_rate=1e-3", "radial.max_steps=6", "radial.save_every=2", "radial.log_every=1"]
    else:
        source = tiny["world"]["fggrn"]
        overrides = [f"fgclip.model={tiny['clip']}", "fgclip.batch_size=8", "fgclip.num_workers=0", "fgclip.shuffle_buffer=16", "fgclip.learning_rate=1e-3",
                     "fgclip.warmup_steps=2", "fgclip.max_steps=6", "fgclip.save_every=2", "fgclip.log_every=1"]
    settings = partial(load_config, None, [*overrides, "run.progress=false"])
    whole = loop.train(objective, [source], tmp_path / "whole", settings(), progress=False)
    patch = kill_after(4)
    with pytest.raises(Killed):
        loop.train(objective, [source], tmp_path / "killed", settings(), progress=False)
    patch.undo()
    assert not (tmp_path / "killed" / "train.json").exists()
    resumed = loop.train(objective, [source], tmp_path / "killed", settings(), progress=False)
    assert same_files(tmp_path / "whole", tmp_path / "killed")
    assert [e["loss"] for e in resumed["history"]] == [e["loss"] for e in whole["history"]] and len(whole["history"]) == 6


def test_distill_stopped_after_a_checkpoint_resumes_to_the_same_weights(tiny, tmp_path, kill_after):
    import pyarrow.parquet as pq

    from pipeline.core.schemas import conform
    from pipeline.train.distill import distill

    data = tmp_path / "chains"
    data.mkdir()
    rows = [{"key": f"chain-{i:05d}", "split": "train", "tiers": tiers, "source": "synthetic"} for i, tiers in enumerate(tiny["chains"])]
    pq.write_table(conform(rows, "hierarcaps"), data / "part-00000.parquet")
    settings = DistillConfig(base_model=str(tiny["t5"]), max_steps=6, save_every=2, eval_every=2, batch_size=8, eval_fraction=0.2, max_eval_chains=3, warmup_steps=2, learning_rate=3e-3)
    whole = distill([data], tmp_path / "whole", settings, progress=False)
    patch = kill_after(4)
    with pytest.raises(Killed):
        distill([data], tmp_path / "killed", settings, progress=False)
    patch.undo()
    state = load_state(latest_checkpoint(tmp_path / "killed"))
    assert state["best"]["name"] == "eval_loss" and state["best"]["value"] == min(e["eval_loss"] for e in state["history"])
    resumed = distill([data], tmp_path / "killed", settings, progress=False)
    assert same_files(tmp_path / "whole", tmp_path / "killed")
    assert resumed["history"] == whole["history"] and [e["step"] for e in whole["history"]] == [2, 4, 6]


# --- torchrun: rank 0 claims, every rank waits -----------------------------------------------------


def stale_finished_run(out: Path) -> partial:
    """OUT holding a finished train.json, and the claim a rerun with --overwrite makes (it deletes the report)."""
    claim = partial(claim_output, out, "train-re", "abc", True, owned=MODEL_DIR_ENTRIES)
    claim_output(out, "train-re", "abc", False, owned=MODEL_DIR_ENTRIES)
    write_json(out / loop.REPORT_FILE, {"finished": True})
    return claim


def test_no_rank_reads_the_report_before_rank_zero_has_claimed_the_output(tmp_path, monkeypatch):
    """Two ranks as threads, the barrier a threading.Barrier: rank 0 claims slowly (an --overwrite
    of a finished run); rank 1 must not see the old finished train.json and return early."""
    import torch.distributed as dist

    claim = stale_finished_run(tmp_path / "out")
    barrier = threading.Barrier(2, timeout=30)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: barrier.wait())

    def slow_claim():
        time.sleep(0.3)
        claim()

    seen = {}

    def rank(number):
        seen[number] = loop.claim_then_read(number, slow_claim, tmp_path / "out" / loop.REPORT_FILE)

    threads = [threading.Thread(target=rank, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert seen == {0: None, 1: None}, "a rank read the stale report of the run being overwritten"


def test_claim_waits_at_a_real_gloo_barrier_when_a_process_group_is_up(tmp_path, monkeypatch):
    import torch.distributed as dist

    claim = stale_finished_run(tmp_path / "out")
    calls = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier") or real_barrier(*a, **k))
    assert loop.claim_then_read(0, claim, tmp_path / "out" / loop.REPORT_FILE) is None and calls == []  # no group: no barrier
    claim_output(tmp_path / "out", "train-re", "abc", False, owned=MODEL_DIR_ENTRIES)
    write_json(tmp_path / "out" / loop.REPORT_FILE, {"finished": True})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert loop.claim_then_read(0, lambda: calls.append("claim") or claim(), tmp_path / "out" / loop.REPORT_FILE) is None
    finally:
        dist.destroy_process_group()
    assert calls == ["claim", "barrier"]
