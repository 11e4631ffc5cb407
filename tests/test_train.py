"""`fgdata train` / `fgdata eval`: tiny CLIPs trained from scratch on the synthetic world learn
what each objective teaches, and a killed run resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

from pipeline.config import load_config
from pipeline.datasets.synthetic_world import COLOURS, PATTERNS, SHAPES, SIZES, hard_negatives, write_world
from pipeline.eval.evaluate import Encoder, fggrn_items, fgovd_accuracy, fgovd_items, hierarcaps_items, hierarchy_metrics, kendall_tau, regional_retrieval
from pipeline.models.clip_model import encode_text, extend_text_positions, load_clip
from pipeline.train.loop import train
from pipeline.train.losses import exterior_angle, hard_negative_loss

FAST = ["fgclip.num_workers=0", "fgclip.batch_size=32", "fgclip.learning_rate=1e-3", "fgclip.warmup_steps=20", "fgclip.weight_decay=0", "fgclip.shuffle_buffer=200", "run.progress=false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline.models.tiny import build_tiny_clip

    root = tmp_path_factory.mktemp("world")
    vocabulary = [f"a {s} {p} {c} {shape}" for s in SIZES for p in PATTERNS for c in COLOURS for shape in SHAPES] * 5
    vocabulary += ["An image on a dark grey background showing at the top bottom left right and a photo of shape animal plant vehicle person"] * 20
    return {
        "train": write_world(root / "train", 600, seed=0),
        "test": write_world(root / "test", 150, seed=99),
        "clip": build_tiny_clip(root / "clip", vocabulary),
        "root": root,
    }


def fine_grained(model: Path, world) -> tuple[float, float, float]:
    items = fggrn_items([world["test"]["fggrn"]], None, 1000)
    encoder = Encoder(str(model))
    regional = regional_retrieval(encoder, items)
    return fgovd_accuracy(encoder, items, 10)["accuracy"], regional["top1"], regional["chance"]


def test_hard_negative_loss_lifts_fg_ovd_accuracy_from_chance(world, tmp_path):
    runs = {}
    for weight in (0.5, 0.0):
        settings = load_config(None, [f"fgclip.model={world['clip']}", "fgclip.max_steps=300", f"fgclip.hard_negative_weight={weight}", *FAST])
        train("fgclip", [world["train"]["fggrn"]], tmp_path / f"hn-{weight}", settings, progress=False)
        runs[weight] = fine_grained(tmp_path / f"hn-{weight}", world)
    untrained = fine_grained(world["clip"], world)
    chance = 1 / 11
    assert untrained[0] < 2 * chance, f"untrained accuracy {untrained[0]:.2f}"
    assert runs[0.5][0] > 4 * chance, f"accuracy with the hard-negative loss only {runs[0.5][0]:.2f}"
    assert runs[0.5][0] > runs[0.0][0] + 0.05, f"hard-negative loss {runs[0.5][0]:.2f} vs none {runs[0.0][0]:.2f}"
    # regional retrieval: each box finds its own phrase among every phrase of the held-out set
    assert runs[0.5][1] > 10 * runs[0.5][2] and untrained[1] < 3 * untrained[2]
    report = json.loads((tmp_path / "hn-0.5" / "train.json").read_text())
    assert report["history"][-1]["hard_negative"] < report["history"][0]["hard_negative"]
    assert (tmp_path / "hn-0.5" / "model.safetensors").exists() and report["model_is_random"] is True


def test_radial_embedding_orders_tiers_by_distance_to_the_root(world, tmp_path):
    settings = load_config(None, [
        f"radial.model={world['clip']}", "radial.max_steps=600", "radial.learning_rate=1e-3", "radial.batch_size=32",
        "radial.lambda_p=0.1", "run.progress=false",
    ])
    train("re", [world["train"]["hierarcaps"]], tmp_path / "re", settings, progress=False)
    chains, images = hierarcaps_items([world["test"]["hierarcaps"]], 1000)
    assert images is not None and len(chains) == 150
    before = hierarchy_metrics(Encoder(str(world["clip"])), chains, images)
    after = hierarchy_metrics(Encoder(str(tmp_path / "re")), chains, images)
    assert before["ordered_chains"] < 0.2 and after["ordered_chains"] > 0.6, (before, after)
    assert after["d_corr"] > before["d_corr"] + 0.3
    # only the text side learnt
    trained, original = load_clip(str(tmp_path / "re")).model, load_clip(str(world["clip"])).model
    assert torch.equal(trained.vision_model.embeddings.patch_embedding.weight, original.vision_model.embeddings.patch_embedding.weight)
    assert not torch.equal(trained.text_projection.weight, original.text_projection.weight)


def test_training_killed_after_a_checkpoint_resumes_like_an_uninterrupted_run(world, tmp_path):
    from safetensors.torch import load_file

    overrides = [f"--set={item}" for item in [*FAST, "fgclip.max_steps=200", "fgclip.batch_size=16", "fgclip.save_every=20", "fgclip.log_every=20"]]
    command = ["train", str(world["train"]["fggrn"]), "--model", str(world["clip"]), *overrides]
    process = subprocess.Popen([str(REPO / ".venv" / "bin" / "fgdata"), *command, "--out", str(tmp_path / "killed")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while not list((tmp_path / "killed" / "checkpoints").glob("step-*[0-9]")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "train.json").exists(), "the run finished before the kill; nothing was resumed"
    resumed = run_cli(*command, "--out", str(tmp_path / "killed"))
    assert resumed.returncode == 0 and "resuming from step-" in resumed.stderr, resumed.stderr
    whole = run_cli(*command, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    histories = [json.loads((tmp_path / d / "train.json").read_text())["history"] for d in ("killed", "whole")]
    assert [e["step"] for e in histories[0]] == [e["step"] for e in histories[1]]
    for a, b in zip(*histories):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    a, b = load_file(tmp_path / "killed" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_long_captions_get_long_clip_positions_and_short_ones_keep_the_original(world):
    parts = load_clip(str(world["clip"]))
    model, tokenizer = parts.model.eval(), parts.tokenizer
    original = model.text_model.embeddings.position_embedding.weight.detach().clone()
    short_before = encode_text(model, tokenizer, ["a small red circle"], long=False, device="cpu")
    extend_text_positions(model, long_tokens=248, keep=20)
    table = model.text_model.embeddings.position_embedding.weight.detach()
    assert table.shape[0] == 77 + 248
    assert torch.equal(table[:77], original) and torch.equal(table[77 : 77 + 20], original[:20])
    # Long-CLIP's rule: row 244 is the last position, rows 245-247 extrapolate (checked row by row in test_fgclip_reference.py)
    assert torch.allclose(table[77 + 244], original[-1]) and torch.allclose(table[77 + 20], original[20])
    with torch.no_grad():
        assert torch.allclose(encode_text(model, tokenizer, ["a small red circle"], long=False, device="cpu"), short_before, atol=1e-6)
        words = " ".join(["circle"] * 150)
        long_a = encode_text(model, tokenizer, [words + " red"], long=True, device="cpu")
        long_b = encode_text(model, tokenizer, [words + " blue"], long=True, device="cpu")
    assert not torch.allclose(long_a, long_b), "words after the 77th token must still count"


def test_losses_and_metrics_on_hand_made_numbers():
    e = torch.nn.functional.normalize
    regions = e(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    negatives = e(torch.tensor([[[0.0, 1.0], [-1.0, 0.0]], [[1.0, 0.0], [0.0, -1.0]]]), dim=-1)
    good = hard_negative_loss(regions, regions, negatives, torch.tensor(10.0))
    bad = hard_negative_loss(regions, negatives[:, 0], torch.cat([regions.unsqueeze(1), negatives[:, 1:]], 1), torch.tensor(10.0))
    assert good < 0.01 < 5 < bad
    root = torch.zeros(2)
    assert exterior_angle(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), root).item() == pytest.approx(0, abs=1e-2)
    assert exterior_angle(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), root).item() == pytest.approx(3.1416, abs=1e-2)
    assert kendall_tau([0.1, 0.2, 0.3, 0.4]) == 1.0 and kendall_tau([0.4, 0.3, 0.2, 0.1]) == -1.0
    assert hard_negatives("small", "solid", "red", "circle")[0] == ("a small solid green circle", "colour") and len(hard_negatives("small", "solid", "red", "circle")) == 10


def test_fg_ovd_jsonl_boxes_become_relative_to_the_image(tmp_path, world):
    from PIL import Image

    Image.new("RGB", (200, 100), (10, 10, 10)).save(tmp_path / "a.png")
    lines = [
        {"img_path": "a.png", "bbox": [20, 10, 100, 50], "pos_expression": "a red circle", "neg_expression": ["a blue circle", "a green circle"], "test_type": "hard"},
        {"img_path": "a.png", "bbox": [0, 0, 200, 100], "pos_expression": "a square", "neg_expression": ["a circle"], "test_type": "easy"},
    ]
    (tmp_path / "fg.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (item,) = fgovd_items(tmp_path / "fg.jsonl", None)
    assert item["boxes"][0] == ([0.1, 0.1, 0.6, 0.6], "a red circle", ["a blue circle", "a green circle"])
    # every box is scored with all its negatives, as FG-CLIP's evaluator does; none is left out for having few
    scored = fgovd_accuracy(Encoder(str(world["clip"])), [item])
    assert scored["boxes"] == 2 and scored["negatives_per_box"] == {"min": 1, "max": 2, "mean": 1.5}
    (tmp_path / "bad.jsonl").write_text('{"img_path": "a.png"}\n')
    result = run_cli("eval", "--model", str(world["clip"]), "--fg-ovd", str(tmp_path / "bad.jsonl"))
    assert result.returncode == 2 and "line 1: not an FG-OVD record" in result.stderr


def test_eval_cli_writes_a_table_and_json(world, tmp_path):
    result = run_cli("eval", "--model", str(world["clip"]), "--fggrn", str(world["test"]["fggrn"]), "--hierarcaps", str(world["test"]["hierarcaps"]),
                     "--out", str(tmp_path / "eval.json"), "--limit", "40")
    assert result.returncode == 0, result.stderr
    assert "fggrn.fg_ovd.accuracy" in result.stdout and "hierarcaps.d_corr" in result.stdout
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["fggrn"]["fg_ovd"]["chance"] == pytest.approx(1 / 11) and saved["hierarcaps"]["chains"] == 40
    assert set(saved["hierarcaps"]) >= {"d_corr", "hierarchical_precision", "hierarchical_recall"}


def test_train_cli_stops_on_bad_input_with_a_message(world, tmp_path):
    wrong = run_cli("train", str(world["train"]["fggrn"]), "--out", str(tmp_path / "o"), "--objective", "simclr")
    assert wrong.returncode == 2 and "--objective must be one of fgclip, re" in wrong.stderr
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "part-00000.parquet").write_bytes((world["train"]["fggrn"] / "train" / "part-00000.parquet").read_bytes())
    missing = run_cli("train", str(orphan), "--out", str(tmp_path / "o2"), "--model", str(world["clip"]))
    assert missing.returncode == 2 and "pass --images DIR" in missing.stderr
    size = run_cli("train", str(world["train"]["fggrn"]), "--out", str(tmp_path / "o3"), "--model", str(world["clip"]), "--set", "fgclip.image_size=224")
    assert size.returncode == 2 and "takes 64 px images" in size.stderr


@pytest.mark.slow
def test_two_processes_under_torchrun_train_one_model(world, tmp_path):
    """Data parallel on CPU (gloo): the contrastive features are gathered, so both ranks log the
    same global losses, and the gradients are averaged, so they keep one set of weights."""
    torchrun = REPO / ".venv" / "bin" / "torchrun"
    overrides = [f"--set={item}" for item in [*FAST, "fgclip.max_steps=6", "fgclip.batch_size=8", "fgclip.log_every=3"]]
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(REPO / ".venv" / "bin" / "fgdata"), "train", str(world["train"]["fggrn"]),
         "--model", str(world["clip"]), "--out", str(tmp_path / "ddp"), *overrides],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    logged = [line for line in result.stderr.splitlines() if line.startswith("fgdata: step 6:")]
    assert len(logged) == 2
    global_losses = [line.split(", regional")[0].split("long ")[1] for line in logged]
    assert global_losses[0] == global_losses[1]
    assert json.loads((tmp_path / "ddp" / "train.json").read_text())["world_size"] == 2
