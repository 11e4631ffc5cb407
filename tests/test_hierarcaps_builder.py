"""The HierarCaps builder: seed/augment (LLM), distill (Flan-T5 shaped, both directions),
generate, and the negatives filter, on tiny models built from real configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, SAMPLE_IMAGES, assert_dataset_invariants, make_config, read_rows, run_cli
from synthetic import is_valid_child, synthetic_chains

from pipeline.config import DistillConfig
from pipeline.core.schemas import conform
from pipeline.datasets.chains import SEPARATOR, TO_GENERAL, TO_SPECIFIC, complete_chain
from pipeline.models.seq2seq import Seq2SeqGenerator
from pipeline.runner import run_stage
from pipeline.stages.hierarcaps.negatives import choose_negatives, negative_pairs
from pipeline.train.distill import distill, distillation_pairs, held_out

EVAL_FRACTION = 0.15


def write_chains(directory: Path, chains: list[list[str]], **columns) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"key": f"chain-{i:05d}", "split": "train", "tiers": tiers, "source": "synthetic", **columns} for i, tiers in enumerate(chains)]
    pq.write_table(conform(rows, "hierarcaps"), directory / "part-00000.parquet")
    return directory


def distill_settings(base: Path, **overrides) -> DistillConfig:
    settings = dict(base_model=str(base), max_steps=400, learning_rate=3e-3, warmup_steps=20, batch_size=32, eval_every=100, save_every=10_000, eval_fraction=EVAL_FRACTION)
    return DistillConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """600 rule-generated chains, a tiny random T5 whose vocabulary covers them, and that T5
    distilled on them for 400 CPU steps."""
    from pipeline.models.tiny import build_tiny_t5

    root = tmp_path_factory.mktemp("world")
    chains = synthetic_chains(600, seed=1)
    texts = [text for tiers in chains for pair in distillation_pairs(tiers) for text in pair]
    base = build_tiny_t5(root / "t5", texts)
    data = write_chains(root / "chains", chains)
    report = distill([data], root / "distilled", distill_settings(base), progress=False)
    evaluation = [tiers for i, tiers in enumerate(chains) if held_out(f"chain-{i:05d}", EVAL_FRACTION)]
    return {"root": root, "chains": chains, "base": base, "data": data, "distilled": root / "distilled", "report": report, "held_out": evaluation}


def world_exact_match(model_dir: Path, chains: list[list[str]]) -> tuple[float, float]:
    """(caption → tiers exact match, tier → a valid child of it in the world's rules)."""
    generator = Seq2SeqGenerator(str(model_dir))
    answers = generator.generate([TO_GENERAL + tiers[-1] for tiers in chains], max_new_tokens=32)
    general = sum(out[0] == SEPARATOR.join(tiers[:-1]) for out, tiers in zip(answers, chains)) / len(chains)
    parents = [parent for tiers in chains for parent in ["", *tiers[:-1]]]
    answers = generator.generate([TO_SPECIFIC + parent for parent in parents], max_new_tokens=32)
    specific = sum(is_valid_child(parent, out[0]) for out, parent in zip(answers, parents)) / len(parents)
    return general, specific


def test_distillation_learns_both_directions_on_held_out_chains(world):
    assert len(world["held_out"]) >= 50
    untrained = world_exact_match(world["base"], world["held_out"])
    trained = world_exact_match(world["distilled"], world["held_out"])
    assert untrained == (0.0, 0.0)
    assert trained[0] >= 0.8, f"caption -> tiers exact match only {trained[0]:.2f}"
    assert trained[1] >= 0.8, f"tier -> valid child only {trained[1]:.2f}"
    report = world["report"]
    losses = [entry["eval_loss"] for entry in report["history"]]
    assert losses[-1] < losses[0] and report["chains"]["held_out"] == len(world["held_out"])
    assert report["held_out_exact_match"]["to_general"] >= 0.8
    assert (world["distilled"] / "model.safetensors").exists() and report["base_is_random"]


def test_distill_killed_after_a_checkpoint_resumes_to_the_same_weights(world, tmp_path):
    import torch
    from safetensors.torch import load_file

    overrides = ["distill.max_steps=300", "distill.batch_size=8", "distill.save_every=50", "distill.eval_every=100", "distill.learning_rate=3e-3", "run.progress=false"]
    command = [str(REPO / ".venv" / "bin" / "fgdata"), "hierarcaps", "distill", str(world["data"]), "--out", str(tmp_path / "killed"), "--base", str(world["base"])]
    command += [arg for item in overrides for arg in ("--set", item)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not list((tmp_path / "killed" / "checkpoints").glob("step-*[0-9]")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "distill.json").exists(), "the run finished before the kill; nothing was resumed"
    resumed = run_cli(*command[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step-" in resumed.stderr
    uninterrupted = run_cli(*[arg if arg != str(tmp_path / "killed") else str(tmp_path / "whole") for arg in command[1:]])
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    a, b = load_file(tmp_path / "killed" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    history = [json.loads((tmp_path / d / "distill.json").read_text())["history"] for d in ("killed", "whole")]
    assert [round(e["eval_loss"], 5) for e in history[0]] == [round(e["eval_loss"], 5) for e in history[1]]


@pytest.mark.usefixtures("ray_session")
def test_generate_writes_chains_and_sibling_candidates(world, tmp_path):
    from pipeline.stages.hierarcaps.generate import HierarcapsGenerateStage

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join([tiers[-1] for tiers in world["held_out"][:30]] + ["   "]) + "\n")
    settings = make_config(f"hierarcaps.generator={world['distilled']}", "ingest.rows_per_shard=16", "hierarcaps.batch_size=8")
    summary = run_stage(HierarcapsGenerateStage(captions), tmp_path / "generated", settings)
    assert summary.rows_in == 31 and summary.shards_total == 2
    assert_dataset_invariants(tmp_path / "generated")
    rows = read_rows(tmp_path / "generated")
    expected = {tiers[-1]: tiers for tiers in world["held_out"]}
    assert sum(row["tiers"] == expected[row["tiers"][-1]] for row in rows) >= 0.8 * 30
    for row in rows:
        assert len(row["negative_candidates"]) == 4 and row["model_is_random"] is True
        for positive, candidates in zip(row["tiers"], row["negative_candidates"]):
            assert positive not in candidates
    parents_ok = [is_valid_child(parent, c) for row in rows for parent, cands in zip(["", *row["tiers"][:-1]], row["negative_candidates"]) for c in cands]
    assert sum(parents_ok) / len(parents_ok) > 0.5  # sampled siblings are mostly children of the same parent
    assert {r["reason"] for r in pq.read_table(tmp_path / "generated" / "_rejects").to_pylist()} >= {"empty_caption"}


@pytest.mark.parametrize(
    "answer, problem",
    [
        ("animal => goat => goat on an island", None),
        ("Hierarchy: animal => goat => goat on an island", None),
        ("1. animal\n2. goat\n3. goat on an island", None),
        ('["animal", "goat", "goat on an island"]', None),
        ("animal => goat => goat on an island => a white goat standing on a rocky island", None),  # caption repeated
        ("animal => goat", "wrong_tier_count"),
        ("animal => goat => goat on an island => a black goat", "wrong_tier_count"),  # a fourth tier that is not the caption
        ("animal => => goat on an island", "blank_tier"),
        ("animal => goat => goat", "repeated_tier"),
        ("Sure! I would describe it as a goat.", "unparseable"),
        ("", "empty_output"),
    ],
)
def test_llm_answers_become_chains_or_reasons(answer, problem):
    tiers, reason = complete_chain(answer, "a white goat standing on a rocky island")
    assert (reason and reason[0]) == problem
    assert reason is None or f"model answered {answer!r}" in reason[1]  # the detail quotes the answer
    assert tiers == ([] if problem else ["animal", "goat", "goat on an island", "a white goat standing on a rocky island"])


def score(entailment: float, contradiction: float = 0.0) -> dict:
    return {"entailment": entailment, "contradiction": contradiction, "neutral": 1 - entailment - contradiction}


def test_sampled_candidates_keep_distinct_siblings_only():
    from pipeline.stages.hierarcaps.generate import sibling_candidates

    tiers = ["vehicle", "motorcycle"]
    sampled = [["Vehicle", "animal", "animal ", "building"], ["car", "motorcycle", "", "car car car car", "bus"]]
    assert sibling_candidates(tiers, sampled) == [["animal", "building"], ["car", "bus"]]


def test_negative_choice_needs_a_sibling_under_the_same_parent():
    tiers = ["transportation", "motorized transportation", "motorcycle", "a red motorcycle parked in a garage"]
    candidates = [["food"], ["walking", "cars"], ["car", "scooter", "motorbike"], ["a red car parked in a garage"]]
    assert negative_pairs(tiers, candidates)[:4] == [
        ("transportation", "food"), ("motorized transportation", "walking"), ("walking", "transportation"), ("motorized transportation", "cars"),
    ]
    scores = [
        score(0.01, 0.9),                                  # food vs transportation
        score(0.02, 0.8), score(0.1),                      # walking: not motorized, but not transportation-entailing either
        score(0.05, 0.7), score(0.95),                     # cars: a sibling
        score(0.10, 0.85), score(0.97),                    # car
        score(0.20, 0.40), score(0.96),                    # scooter: valid, less contradictory
        score(0.90, 0.01), score(0.99),                    # motorbike: the positive entails it (a synonym)
        score(0.03, 0.9), score(0.9),                      # a red car ...
    ]
    chosen, problem = choose_negatives(tiers, candidates, scores, max_entailed=0.5, min_parent=0.5)
    assert problem is None
    assert chosen == ["food", "cars", "car", "a red car parked in a garage"]

    scores[3:5] = [score(0.7, 0.1), score(0.95)]  # now "cars" is entailed by the positive too
    chosen, problem = choose_negatives(tiers, candidates, scores, max_entailed=0.5, min_parent=0.5)
    assert chosen is None
    assert problem == ("no_valid_negative", "tier 2 ('motorized transportation'): 1 does_not_entail_parent, 1 entailed_by_positive")
    _, problem = choose_negatives(tiers, [["food"], [], ["car"], ["x"]], [score(0.0, 1.0), score(0.0), score(0.9), score(0.0), score(0.9)], 0.5, 0.5)
    assert problem == ("no_valid_negative", "tier 2 ('motorized transportation'): no candidates")


@pytest.mark.usefixtures("ray_session")
def test_negatives_stage_and_export_round_trip(world, tmp_path):
    from pipeline.datasets.hierarcaps_csv import write_official_csv
    from pipeline.models.tiny import build_tiny_nli
    from pipeline.stages.hierarcaps.import_csv import HierarcapsImportStage
    from pipeline.stages.hierarcaps.negatives import HierarcapsNegativesStage

    nli = build_tiny_nli(tmp_path / "nli", [" ".join(tiers) for tiers in world["chains"]])
    chains = world["chains"][:12]
    candidates = [[["bird"], [f"pink {t[0]}"], [f"pink {t[0]} on the moon"], [t[-1].replace(" a ", " one ", 1) + " at night"]] for t in chains]
    data = tmp_path / "generated"
    data.mkdir()
    rows = [{"key": f"g{i:03d}", "split": "train", "tiers": t, "negative_candidates": c, "source": "test"} for i, (t, c) in enumerate(zip(chains, candidates))]
    rows[0]["negative_candidates"] = [[], [], [], []]  # nothing to choose from: rejected, tier 1 named
    pq.write_table(conform(rows, "hierarcaps"), data / "part-00000.parquet")
    # random NLI scores are noise: thresholds open, so the structure is what is tested here
    settings = make_config(f"hierarcaps.nli_model={nli}", "hierarcaps.min_entailment=0", "hierarcaps.min_negative_contradiction=0")
    summary = run_stage(HierarcapsNegativesStage(data), tmp_path / "final", settings)
    assert (summary.rows_out, summary.rows_rejected) == (11, 1)
    assert_dataset_invariants(tmp_path / "final", {row["key"] for row in rows})
    (reject,) = pq.read_table(tmp_path / "final" / "_rejects").to_pylist()
    assert reject["reason"] == "no_valid_negative" and reject["detail"].startswith("tier 1 (")
    kept = read_rows(tmp_path / "final")
    assert all(row["negative_tiers"] == [c[0] for c in cands] for row, cands in zip(kept, candidates[1:]))

    write_official_csv(tmp_path / "final", tmp_path / "train.csv", "train")
    run_stage(HierarcapsImportStage(tmp_path / "train.csv"), tmp_path / "imported", make_config())
    again = read_rows(tmp_path / "imported")
    assert [(r["tiers"], r["negative_tiers"]) for r in again] == [(r["tiers"], r["negative_tiers"]) for r in kept]


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from pipeline.models.tiny import build_tiny_llm

    prompt = (REPO / "prompts" / "hierarcaps_seed.v1.txt").read_text()
    return build_tiny_llm(tmp_path_factory.mktemp("models") / "llm", [prompt] * 20)


FAKE_ANSWERS = {  # what the FAKE vLLM answers, by caption
    "a brown dog asleep on a red sofa": "animal => dog => dog on a sofa",
    "two boats moored in a small harbour": "1. vehicle\n2. boats\n3. boats in a harbour",
    "a man riding a horse on a beach": "Here you go: person => man on a horse",
    "a bowl of soup next to bread": "food => soup => soup => a bowl of soup next to bread",
}


def test_seed_parses_or_rejects_every_llm_answer_through_the_vllm_adapter(tiny_llm, tmp_path, monkeypatch):
    """The FAKE vLLM (tests/fakes) answers per caption; the real adapter and stage do the rest."""
    from pipeline.stages.hierarcaps.caption_inputs import caption_units
    from pipeline.stages.hierarcaps.seed import HierarcapsSeedStage

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fakes"))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm  # the FAKE from tests/fakes

    monkeypatch.setattr(vllm, "RESPONDER", lambda prompt: next(a for c, a in FAKE_ANSWERS.items() if f"Caption: {c}\n" in prompt))
    captions = tmp_path / "captions.csv"
    captions.write_text("caption,image_url\n" + "".join(f"{c},http://x/{i}.jpg\n" for i, c in enumerate(FAKE_ANSWERS)) + ",\n")
    settings = make_config("hierarcaps.backend=vllm", f"hierarcaps.model={tiny_llm}")
    stage = HierarcapsSeedStage(captions)
    (unit,) = stage.plan(settings)
    assert unit.payload["rows"] == 5 and caption_units(captions, 2, ["caption"])[-1].payload["rows"] == 1
    result = stage.process(unit, settings, model=stage.load_model(settings), prepared=stage.prepare(unit, settings))
    rows = result.table.to_pylist()
    assert [row["tiers"] for row in rows] == [
        ["animal", "dog", "dog on a sofa", "a brown dog asleep on a red sofa"],
        ["vehicle", "boats", "boats in a harbour", "two boats moored in a small harbour"],
    ]
    assert rows[0]["image_url"] == "http://x/0.jpg" and rows[0]["split"] == "train" and rows[0]["model_is_random"] is True
    assert "prompt hierarcaps_seed.v1 sha256:" in rows[0]["source"]
    assert sorted(r["reason"] for r in result.rejects) == ["empty_caption", "repeated_tier", "wrong_tier_count"]


def test_augment_prompts_show_validated_chains_never_the_captions_own(tiny_llm, tmp_path):
    from pipeline.stages.hierarcaps.augment import HierarcapsAugmentStage, draw_demonstrations

    chains = synthetic_chains(40, seed=3)
    demos = write_chains(tmp_path / "validated", chains)
    captions = tmp_path / "captions.txt"
    captions.write_text(f"{chains[0][-1]}\na cat on a mat\n")
    settings = make_config(f"hierarcaps.model={tiny_llm}", "hierarcaps.demonstrations=5")
    stage = HierarcapsAugmentStage(captions, demonstrations=demos)
    (unit,) = stage.plan(settings)
    assert len(stage.examples) == 40
    template = (REPO / "prompts" / "hierarcaps_augment.v1.txt").read_text()
    own = stage._fill(template, {"key": "captions-000000000", "caption": chains[0][-1]}, settings.hierarcaps)
    other = stage._fill(template, {"key": "captions-000000001", "caption": "a cat on a mat"}, settings.hierarcaps)
    assert own.count("Hierarchy:") == other.count("Hierarchy:") == 6  # 5 examples + the question
    assert own.count(chains[0][-1]) == 1  # only as the question, never as an example
    assert draw_demonstrations(stage.examples, "k", "x", 5, 0) == draw_demonstrations(stage.examples, "k", "x", 5, 0)
    assert draw_demonstrations(stage.examples, "k", "x", 5, 0) != draw_demonstrations(stage.examples, "k2", "x", 5, 0)


@pytest.mark.usefixtures("ray_session")
def test_seed_with_a_random_llm_runs_end_to_end_and_rejects_its_noise(tiny_llm, tmp_path):
    from pipeline.stages.hierarcaps.seed import HierarcapsSeedStage

    captions = [p.read_text().strip() for p in sorted(SAMPLE_IMAGES.glob("*.txt"))] * 3
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    settings = make_config(f"hierarcaps.model={tiny_llm}", "hierarcaps.max_new_tokens=16", "ingest.rows_per_shard=20")
    summary = run_stage(HierarcapsSeedStage(tmp_path / "captions.txt"), tmp_path / "seed", settings)
    assert summary.rows_in == len(captions) and summary.shards_total == 2
    assert_dataset_invariants(tmp_path / "seed", {f"captions-{i:09d}" for i in range(len(captions))})
    rejects = pq.read_table(tmp_path / "seed" / "_rejects").to_pylist()
    assert all(r["detail"].startswith("model answered ") for r in rejects)
    manifest = json.loads((tmp_path / "seed" / "_manifest.json").read_text())
    assert manifest["provenance"]["random_weights"] == [True]


def test_cli_refuses_bad_hierarcaps_input_with_a_message(tmp_path):
    missing_model = run_cli("hierarcaps", "generate", str(SAMPLE_IMAGES / "horse.txt"), str(tmp_path / "out"))
    assert missing_model.returncode == 2 and "no distilled model" in missing_model.stderr
    (tmp_path / "empty").mkdir()
    empty = run_cli("hierarcaps", "distill", str(tmp_path / "empty"), "--out", str(tmp_path / "model"))
    assert empty.returncode == 2 and "holds no part-*.parquet shards" in empty.stderr and not (tmp_path / "model").exists()
    wrong_split = run_cli("hierarcaps", "seed", str(tmp_path / "x.txt"), str(tmp_path / "o"), "--split", "dev")
    assert wrong_split.returncode == 2 and "--split must be train or test" in wrong_split.stderr
    no_file = run_cli("hierarcaps", "seed", str(tmp_path / "x.txt"), str(tmp_path / "o"))
    assert no_file.returncode == 2 and "does not exist" in no_file.stderr
