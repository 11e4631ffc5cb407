"""`fgdata negatives`: hard negatives for every region phrase, checked for structure, meaning and by NLI.

Each candidate must keep the object, change 1-3 content words, not merely reword the positive or
an accepted negative (lexicons, then sentence-embedding similarity), and contradict the positive
when both are read in the caption ("... a red cup ..." vs "... a blue cup ...": negatives.nli_rule).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
from spacy.tokens import Doc

from pipeline.config import Config
from pipeline.core.llm_output import parse_negatives
from pipeline.core.prompts import fill_template, load_prompt
from pipeline.core.schemas import check_input_columns, conform
from pipeline.core.shards import lineage_entry, read_shard_schema, shard_rows
from pipeline.core.storage import resolved
from pipeline.errors import FgdataError
from pipeline.models.embedding import TextEmbedder, resolve_embedding_model
from pipeline.models.generation import Sampling
from pipeline.models.nli import NliDecision, NliScorer
from pipeline.models.reference import check_model_reference
from pipeline.models.registry import check_text_backend, load_text_generator, note_provenance
from pipeline.models.spacy_nlp import load_spacy, spacy_id
from pipeline.stages.base import GeneratorStage, ShardResult, WorkUnit
from pipeline.stages.fggrn.attribute_swap import attribute_swaps
from pipeline.stages.fggrn.negative_checks import embedding_texts, meaning_problem, structure_problem, words

REGION_COLUMNS = {"key": pa.string(), "short_caption": pa.string(), "long_caption": pa.string(), "phrase_source": pa.string()}
# v2: contradicting classes, no swaps inside compounds; v3: antonym scales, noun classes, multi-word units;
# v4: silver/golden apart from grey/yellow/brown, knitted no material, short by the noun's sense (tall or long)
LEXICON_VERSION = "rules:lexicon-v4"


@dataclass
class NegativeModels:
    nli: NliScorer
    nlp: object  # the spaCy pipeline that finds attribute words (rules) and heads
    llm: object | None  # a TextGenerator for the LLM backends
    embedder: TextEmbedder | None = None  # None: negatives.embedding_model is null


def answer_schema(count: int) -> dict:
    """The JSON shape the LLM must answer in (enforced by vLLM's structured outputs)."""
    item = {"type": "object", "properties": {"negative": {"type": "string"}, "attribute": {"type": "string"}}, "required": ["negative", "attribute"]}
    return {"type": "array", "items": item, "minItems": count, "maxItems": count}


def noun_lemmatizer(nlp) -> Callable[[str], tuple[str, ...]]:
    """A word's lemmas read as a noun by the pipeline's own lemmatizer ("women" → woman, "geese" →
    goose), without tagging a sentence: the head check compares lemmas, as the head is stored. A
    pipeline without a lemmatizer gives none (spellings are compared)."""
    if "lemmatizer" not in nlp.pipe_names:
        return lambda word: ()
    lemmatizer = nlp.get_pipe("lemmatizer")

    @lru_cache(maxsize=65536)
    def lemmas(word: str) -> tuple[str, ...]:
        return tuple(lemmatizer.lemmatize(Doc(nlp.vocab, words=[word], pos=["NOUN"])[0]))

    return lemmas


def best_first(scored: list[tuple[int, dict]], count: int) -> list[dict]:
    """The `count` negatives the positive contradicts most (a tie: the earlier candidate), in
    candidate order."""
    best = sorted(scored, key=lambda item: (-item[1]["contradiction"], item[0]))[:count]
    return [negative for _, negative in sorted(best, key=lambda item: item[0])]


def fill_prompt(template: str, count: int, caption: str, phrase: str) -> str:
    return fill_template(template, {"count": str(count), "caption": caption, "phrase": phrase})


def nli_decision(settings) -> NliDecision:
    """The keep/drop rule for negatives (FgdataError for an unknown negatives.nli_rule)."""
    try:
        return NliDecision(settings.nli_rule, settings.min_contradiction, settings.max_entailment)
    except FgdataError as exc:
        raise FgdataError(f"negatives.nli_rule: {exc}") from None


class NegativesStage(GeneratorStage):
    name = "negatives"
    output_kind = "fggrn"
    config_section = "negatives"
    model_settings = ("nli_model", "model", "embedding_model")

    def __init__(self, regions_dir: Path):
        self.regions_dir = resolved(regions_dir)  # a local path or a URI

    def plan(self, config: Config) -> list[WorkUnit]:
        return self.plan_each_shard(self.regions_dir, config)

    def check(self, config: Config) -> None:
        settings = config.negatives
        if settings.backend not in ("rules", "transformers", "vllm"):
            raise FgdataError(f"negatives.backend must be rules, transformers or vllm, got {settings.backend!r}")
        check_text_backend(settings.backend, settings.model)
        nli_decision(settings)
        check_model_reference(settings.nli_model, revision=None, trust_remote_code=False)
        if settings.embedding_model:
            check_model_reference(resolve_embedding_model(settings.embedding_model), revision=None, trust_remote_code=False)
        if settings.backend != "rules":
            load_prompt(settings.prompt)
            check_model_reference(settings.model, revision=settings.revision, trust_remote_code=settings.trust_remote_code)
        load_spacy(settings.spacy_model)

    def plan_shard(self, path: Path, config: Config) -> WorkUnit:
        schema = read_shard_schema(path)
        check_input_columns(schema, REGION_COLUMNS, where=str(path))
        if "regions" not in schema.names:
            raise FgdataError(f"{path}: missing required column 'regions' (run `fgdata ground` first)")
        return WorkUnit(path.name, {"path": str(path), "rows": shard_rows(path)})

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.regions_dir)]

    def load_model(self, config: Config) -> NegativeModels:
        s = config.negatives
        llm = self.load_generator(config, load_text_generator) if s.backend != "rules" else None
        embedder = TextEmbedder(s.embedding_model) if s.embedding_model else None
        return NegativeModels(nli=NliScorer(s.nli_model), nlp=load_spacy(s.spacy_model), llm=llm, embedder=embedder)

    def process(self, unit: WorkUnit, config: Config, model: NegativeModels | None = None, prepared: Iterable | None = None) -> ShardResult:
        settings = config.negatives
        sampling = self.sampling(config)
        prompt = load_prompt(settings.prompt) if model.llm else None
        backend = (
            f"{model.llm.name}, prompt {prompt.name} sha256:{prompt.sha256}, sampling {sampling.to_json()}"
            if model.llm
            else f"{LEXICON_VERSION} + {spacy_id(model.nlp)}"
        )
        keys = ("backend", "per_region", "candidates", "min_valid", "max_changed_words", "nli_rule", "min_contradiction", "max_entailment",
                "embedding_model", "max_embedding_similarity", "seed")
        chosen = {k: getattr(settings, k) for k in keys}
        decision = nli_decision(settings)
        similarity = model.embedder.similarity if model.embedder else None
        lemmas = noun_lemmatizer(model.nlp)
        settings_json = json.dumps(chosen, sort_keys=True)
        out, rows_in = [], 0
        counters: Counter = Counter()
        for rows in prepared:
            rows_in += len(rows)
            regions = [(row, region) for row in rows for region in row["regions"]]
            proposals = self._propose(regions, model, settings, prompt, sampling, counters)
            structured = []  # per region: the (text, attribute) candidates that pass the structure checks
            for (row, region), proposed in zip(regions, proposals):
                region["negatives"], seen, passed = [], set(), []
                for text, attribute in proposed[: settings.candidates]:
                    problem = structure_problem(region["phrase"], text, region["head"], seen, settings.max_changed_words, lemmas)
                    if problem:  # a candidate, not a row: counted, never a reject row
                        counters[f"dropped_{problem[0]}"] += 1
                        continue
                    seen.add(" ".join(words(text)))
                    passed.append((text, attribute))
                structured.append(passed)
                counters["dropped_over_limit"] += max(0, len(proposed) - settings.candidates)
            if model.embedder:  # every span the meaning checks compare, embedded in one batch
                model.embedder.warm(t for (_, region), passed in zip(regions, structured) for t in embedding_texts(region["phrase"], [p[0] for p in passed]))
            candidates = []  # (region, text, attribute, premise, hypothesis)
            for (row, region), passed in zip(regions, structured):
                caption, accepted = row[row["phrase_source"]] or "", []
                for text, attribute in passed:
                    problem = meaning_problem(region["phrase"], text, accepted, similarity, settings.max_embedding_similarity)
                    if problem:
                        counters[f"dropped_{problem[0]}"] += 1
                        continue
                    accepted.append(text)
                    candidates.append((region, text, attribute or "unspecified", caption, caption[: region["start"]] + text + caption[region["end"] :]))
            scores = model.nli.score([(premise, hypothesis) for *_, premise, hypothesis in candidates])
            valid = defaultdict(list)  # id(region) -> (candidate order, negative) that NLI keeps
            for order, ((region, text, attribute, _, _), score) in enumerate(zip(candidates, scores)):
                problem = decision.problem(score)
                if problem:
                    counters[f"dropped_{problem[0]}"] += 1
                else:
                    valid[id(region)].append((order, {"text": text, "attribute": attribute, **score}))
            for _, region in regions:
                passed = valid[id(region)]
                region["negatives"] = best_first(passed, settings.per_region)
                counters["dropped_not_best"] += len(passed) - len(region["negatives"])
            for row in rows:
                for region in row["regions"]:
                    counters["negatives"] += len(region["negatives"])
                    if region["negatives_flag"] == "ok" and len(region["negatives"]) < settings.min_valid:
                        region["negatives_flag"] = "too_few_valid"
                    counters[f"regions_{region['negatives_flag']}"] += 1
                out.append(
                    {**row, "negatives_backend": backend, "nli_model": model.nli.name, "nli_is_random": model.nli.is_random, "negatives_settings": settings_json}
                )
        return ShardResult(
            rows_in=rows_in,
            table=conform(out, "fggrn"),
            counters=counters,
            provenance={
                "negatives_backend": backend,
                "nli_model": model.nli.name,
                "nli_rule": decision.rule,
                "embedding_model": model.embedder.name if model.embedder else None,
                "random_weights": model.nli.is_random or bool(model.llm and model.llm.is_random),
                **note_provenance(model.llm),
            },
        )

    @staticmethod
    def _propose(regions, model: NegativeModels, settings, prompt, sampling: Sampling, counters: Counter) -> list[list[tuple[str, str | None]]]:
        """Candidate (negative, attribute) pairs per region, before any check; sets each region's flag."""
        if model.llm is None:
            proposals = []
            for (_, region), doc in zip(regions, model.nlp.pipe([region["phrase"] for _, region in regions])):
                head = next((t.i for t in doc if t.lemma_.lower() == region["head"]), doc[:].root.i)
                swaps = attribute_swaps(doc, head, settings.candidates, settings.seed)
                region["negatives_flag"] = "ok" if swaps else "no_swappable_attribute"
                proposals.append([(swap.text, swap.attribute) for swap in swaps])
            return proposals
        if not regions:
            return []
        # one generate call for every region of the batch; the prompts share their instructions
        texts = [fill_prompt(prompt.text, settings.per_region, row[row["phrase_source"]] or "", region["phrase"]) for row, region in regions]
        generations = model.llm.generate(texts, sampling, json_schema=answer_schema(settings.per_region))
        proposals = []
        for (_, region), generation in zip(regions, generations):
            parsed, reason = parse_negatives(generation.text)
            if reason and generation.finish_reason == "length":
                reason = "cut_at_max_new_tokens"  # cut short, not malformed: max_new_tokens is too low for this model
            counters["generated_tokens"] += generation.tokens
            if reason:
                counters[f"llm_{reason}"] += 1
            elif len(parsed) != settings.per_region:
                counters["llm_wrong_count"] += 1  # its candidates are still checked: a region left short is flagged too_few_valid
            region["negatives_flag"] = f"llm_{reason}" if reason else "ok"  # counted as regions_llm_<reason>
            proposals.append(parsed)
        return proposals
