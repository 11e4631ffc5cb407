"""`fgdata run hierarcaps` against its eight stage-by-stage commands, wall time, on the same captions.

Both sides run the console script a user types (Ray start-up and model loading included) with one
settings file: the rule world's captions (bench/synthetic.py), a tiny random NLI model with the
thresholds at 0, a tiny T5 distilled for a few steps. Seed and augment are answered by the FAKE vLLM
of tests/fakes (tests/fakes/hierarcaps_world puts it on every process's path and makes it answer
the world's chain): no LLM runs, so the figures measure fgdata's scheduling (one Ray start, one
actor pool per step, filter shards streaming behind seed), not generation. The row check compares
every step's rows with the stage-by-stage datasets'. tests/test_recipe_hierarcaps.py runs the same
world and commands. Writes bench/results/recipe_vs_stages_hierarcaps.json:
`python bench/recipe_hierarcaps.py` (not part of `make test`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import torch  # noqa: E402
from records import write_result  # noqa: E402
from synthetic import synthetic_chains  # noqa: E402

from pipeline.core.shards import read_json  # noqa: E402

FGDATA = str(Path(sys.executable).parent / "fgdata")
FAKES = BENCH.parent / "tests" / "fakes"
# the datasets the recipe writes (distilled is a model folder)
STEPS = ("seed", "seed-valid", "augmented", "augmented-valid", "generated", "generated-valid", "final")


def fake_llm_env() -> dict[str, str]:
    """The environment in which `fgdata` and its Ray workers import the FAKE vLLM answering world chains."""
    path = [str(FAKES / "hierarcaps_world"), str(FAKES), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1"}


def write_world(work: Path, captions: int = 160, rows_per_shard: int = 40, distill_steps: int = 150) -> tuple[Path, Path]:
    """captions.txt (world captions, one caption the fake LLM refuses and a blank line, so seed and
    augment reject something) and settings.yaml: vLLM backend on a tiny Llama-shaped model (the fake
    engine only checks how it is called), tiny NLI and T5 from the world's words."""
    from pipeline.models.tiny import build_tiny_llm, build_tiny_nli, build_tiny_t5
    from pipeline.train.distill import distillation_pairs

    work.mkdir(parents=True, exist_ok=True)
    chains = synthetic_chains(captions, seed=5)
    pairs = [text for tiers in chains for pair in distillation_pairs(tiers) for text in pair]
    t5 = build_tiny_t5(work / "t5", pairs)
    nli = build_tiny_nli(work / "nli", [" ".join(tiers) for tiers in chains])
    llm = build_tiny_llm(work / "llm", [(BENCH.parent / "prompts" / "hierarcaps_seed.v1.txt").read_text()] * 5)
    source = work / "captions.txt"
    source.write_text("\n".join([tiers[-1] for tiers in chains] + ["two boats moored in a small harbour", ""]) + "\n")
    settings = work / "settings.yaml"
    settings.write_text(
        f"ingest: {{rows_per_shard: {rows_per_shard}}}\n"
        f"hierarcaps: {{backend: vllm, model: {llm}, nli_model: {nli}, min_entailment: 0, min_negative_contradiction: 0, "
        "demonstrations: 2, num_beams: 2, negative_candidates: 3}\n"
        f"distill: {{base_model: {t5}, max_steps: {distill_steps}, learning_rate: 0.003, warmup_steps: 10, batch_size: 32, "
        "eval_every: 50, save_every: 10000, eval_fraction: 0.1}\n"
        "run: {progress: false}\n"
    )
    return source, settings


def stage_commands(captions: Path, out: Path, settings: Path) -> dict[str, list[str]]:
    """The single-stage commands for the recipe's steps, in its order, writing OUT/<step name>."""
    common = ["--config", str(settings)]
    cap, d = str(captions), {step: str(out / step) for step in (*STEPS, "distilled")}
    return {
        "seed": ["hierarcaps", "seed", cap, d["seed"], *common],
        "seed-valid": ["hierarcaps", "filter", d["seed"], d["seed-valid"], *common],
        "augmented": ["hierarcaps", "augment", cap, d["augmented"], "--demonstrations", d["seed-valid"], *common],
        "augmented-valid": ["hierarcaps", "filter", d["augmented"], d["augmented-valid"], *common],
        "distilled": ["hierarcaps", "distill", d["seed-valid"], d["augmented-valid"], "--out", d["distilled"], *common],
        "generated": ["hierarcaps", "generate", cap, d["generated"], "--model", d["distilled"], *common],
        "generated-valid": ["hierarcaps", "filter", d["generated"], d["generated-valid"], *common],
        "final": ["hierarcaps", "negatives", d["generated-valid"], d["final"], *common],
    }


def timed_command(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([FGDATA, *args], check=True, capture_output=True, text=True, env=fake_llm_env())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--captions", type=int, default=160)
    parser.add_argument("--rows-per-shard", type=int, default=40)
    parser.add_argument("--distill-steps", type=int, default=150)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        captions, settings = write_world(work / "world", args.captions, args.rows_per_shard, args.distill_steps)
        stage_seconds = {step: timed_command(*command) for step, command in stage_commands(captions, work / "stages", settings).items()}
        recipe_seconds = timed_command("run", "hierarcaps", str(captions), str(work / "recipe"), "--config", str(settings))
        rows = {}
        for step in STEPS:
            ours, theirs = read_json(work / "recipe" / step / "_manifest.json"), read_json(work / "stages" / step / "_manifest.json")
            rows[step] = {key: ours[key] for key in ("rows_in", "rows_out", "rows_rejected")} | {"shards": len(ours["shards"])}
            if any(ours[key] != theirs[key] for key in ("rows_in", "rows_out", "rows_rejected")):
                raise SystemExit(f"{step}: the recipe wrote {ours['rows_out']} rows, the stages {theirs['rows_out']}")
        # the training loop alone (distill.json): the command trains on torch's default threads, the
        # recipe's distill task on the one thread Ray gives it
        distill_seconds = {side: read_json(work / side / "distilled" / "distill.json")["seconds"] for side in ("stages", "recipe")}
    stages_total = sum(stage_seconds.values())
    write_result(
        "recipe_vs_stages_hierarcaps",
        {
            "what": "wall seconds: `fgdata run hierarcaps` (one Ray job) vs its eight stage commands run one after another, start-up included",
            "measures": "scheduling, not generation: seed and augment are answered by the FAKE vLLM of tests/fakes (no LLM runs)",
            "captions": args.captions + 2,
            "settings": (
                f"rows_per_shard {args.rows_per_shard}; hierarcaps: FAKE vLLM answering the synthetic world's chain, tiny random NLI "
                f"(min_entailment 0, min_negative_contradiction 0), 2 beams, 3 candidates; tiny T5 distilled {args.distill_steps} steps"
            ),
            "stage_seconds": {name: round(value, 2) for name, value in stage_seconds.items()},
            "stages_total_seconds": round(stages_total, 2),
            "recipe_seconds": round(recipe_seconds, 2),
            "speedup": round(stages_total / recipe_seconds, 3),
            "rows": rows,
            "distill_training_seconds": distill_seconds,
            "torch_threads": {"stages": torch.get_num_threads(), "recipe": 1},
        },
        file_name="recipe_vs_stages_hierarcaps",
    )


if __name__ == "__main__":
    main()
