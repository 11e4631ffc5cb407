"""`fgdata hierarcaps generate`: the distilled Flan-T5 writes chains for many captions, and
candidate negatives for every tier.

Per batch of captions: beam search on `generalize: <caption>` gives the three tiers above the
caption; then, for each tier i, sampling `specify: <tier i-1>` (the empty root for the top
tier) gives children of the same parent: siblings of tier i, the candidates `hierarcaps
negatives` checks with NLI. Candidates equal to the positive tier are dropped here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

from pipeline.config import Config
from pipeline.core.storage import resolved
from pipeline.core.caption_quality import repeated_ngram
from pipeline.core.schemas import conform
from pipeline.core.shards import lineage_entry
from pipeline.datasets.chains import TO_GENERAL, TO_SPECIFIC, complete_chain, normal_text
from pipeline.errors import FgdataError
from pipeline.models.reference import check_model_reference
from pipeline.models.seq2seq import Seq2SeqGenerator
from pipeline.stages.base import ModelStage, ShardResult, WorkUnit, reject
from pipeline.stages.hierarcaps.caption_inputs import caption_units, unit_captions, with_captions


def sibling_candidates(tiers: list[str], sampled: list[list[str]]) -> list[list[str]]:
    """Per tier, the distinct sampled children of its parent that differ from the tier itself and
    do not loop (a word or phrase three times in a row: sampling ran away)."""
    candidates = []
    for positive, texts in zip(tiers, sampled):
        seen, kept = {normal_text(positive), ""}, []
        for text in texts:
            if normal_text(text) not in seen and not repeated_ngram(normal_text(text).split(), repeats=3):
                seen.add(normal_text(text))
                kept.append(text.strip())
        candidates.append(kept)
    return candidates


class HierarcapsGenerateStage(ModelStage):
    name = "hierarcaps-generate"
    output_kind = "hierarcaps"
    config_section = "hierarcaps"
    extra_config_sections = ("ingest",)  # rows_per_shard and caption_fields split caption files
    model_settings = ("generator",)

    def __init__(self, captions: Path):
        self.captions = resolved(captions)  # a local path or a URI

    def plan(self, config: Config) -> list[WorkUnit]:
        settings = config.hierarcaps
        units = caption_units(self.captions, config.ingest.rows_per_shard, config.ingest.caption_fields)
        if not settings.generator:
            raise FgdataError("no distilled model: pass --model DIR (the output of `fgdata hierarcaps distill`) or set hierarcaps.generator")
        check_model_reference(settings.generator, revision=None, trust_remote_code=False)
        return units

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.captions)]

    def load_model(self, config: Config) -> Seq2SeqGenerator:
        return Seq2SeqGenerator(config.hierarcaps.generator)

    def read_rows(self, unit: WorkUnit, config: Config) -> list[dict]:
        return unit_captions(unit)

    def process(self, unit: WorkUnit, config: Config, model: Seq2SeqGenerator | None = None, prepared: Iterable | None = None) -> ShardResult:
        s = config.hierarcaps
        source = (
            f"{self.name}: {model.name}, beams {s.num_beams}, {s.negative_candidates} candidates per tier "
            f"(temperature {s.candidate_temperature}, top_p {s.candidate_top_p}), seed {s.seed}"
        )
        rows, rejects, counters, rows_in = [], [], Counter(), 0
        for batch in prepared:
            rows_in += len(batch)
            usable = with_captions(batch, rejects, unit.name)
            answers = model.generate([TO_GENERAL + item["caption"].strip() for item in usable], max_new_tokens=s.generate_max_new_tokens, num_beams=s.num_beams)
            chains = []
            for item, (answer,) in zip(usable, answers):
                tiers, problem = complete_chain(answer, item["caption"])
                if problem:
                    rejects.append(reject(item["key"], problem, unit.name))
                else:
                    chains.append((item, tiers))
            parents = [TO_SPECIFIC + parent for _, tiers in chains for parent in ["", *tiers[:-1]]]
            sampled = model.generate(
                parents, max_new_tokens=s.generate_max_new_tokens, num_return_sequences=s.negative_candidates,
                temperature=s.candidate_temperature, top_p=s.candidate_top_p, seed=s.seed,
            ) if s.negative_candidates else [[] for _ in parents]
            offset = 0
            for item, tiers in chains:
                candidates = sibling_candidates(tiers, sampled[offset : offset + len(tiers)])
                offset += len(tiers)
                counters["negative_candidates"] += sum(map(len, candidates))
                rows.append(
                    {
                        "key": item["key"], "split": s.split, "tiers": tiers, "negative_candidates": candidates,
                        "image_url": item["image_url"], "source": source, "model_is_random": model.is_random,
                    }
                )
        return ShardResult(
            rows_in=rows_in, table=conform(rows, "hierarcaps"), rejects=rejects, counters=counters,
            provenance={"model": model.name, "random_weights": model.is_random},
        )
