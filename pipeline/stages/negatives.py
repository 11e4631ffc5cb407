"""`fgdata negatives`: hard negatives for every region phrase, checked for structure and by NLI.

Each candidate must keep the object, change 1-3 content words, and not be entailed by the
positive when both are read in the caption ("... a red cup ..." vs "... a blue cup ...").
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.attribute_swap import attribute_swaps
from pipeline.config import Config
from pipeline.errors import FgdataError
from pipeline.models.nli import NliScorer
from pipeline.models.reference import check_model_reference
from pipeline.negative_checks import structure_problem, words
from pipeline.schemas import check_input_columns, conform
from pipeline.shards import lineage_entry, list_shards, read_shard, read_shard_schema
from pipeline.stages.base import ModelPool, ShardResult, Stage, WorkUnit, one_actor_per_gpu
from pipeline.stages.phrases import load_pipeline, pipeline_id

REGION_COLUMNS = {"key": pa.string(), "short_caption": pa.string(), "long_caption": pa.string(), "phrase_source": pa.string()}
LEXICON_VERSION = "rules:lexicon-v1"


@dataclass
class NegativeModels:
    nli: NliScorer
    nlp: object  # the spaCy pipeline that finds attribute words


@dataclass
class RowBatch:
    rows: list[dict] = field(default_factory=list)
    rows_in: int = 0


class NegativesStage(Stage):
    name = "negatives"
    output_kind = "fggrn"
    config_section = "negatives"
    uses_model = True

    def __init__(self, regions_dir: Path):
        self.regions_dir = Path(regions_dir).resolve()

    def plan(self, config: Config) -> list[WorkUnit]:
        settings = config.negatives
        if settings.backend != "rules":
            raise FgdataError(f"negatives.backend must be rules (LLM backends are not built yet), got {settings.backend!r}")
        if Path(settings.nli_model).is_dir():
            settings.nli_model = str(Path(settings.nli_model).resolve())
        check_model_reference(settings.nli_model, revision=None, trust_remote_code=False)
        load_pipeline(settings.spacy_model)
        units = []
        for path in list_shards(self.regions_dir):
            schema = read_shard_schema(path)
            check_input_columns(schema, REGION_COLUMNS, where=str(path))
            if "regions" not in schema.names:
                raise FgdataError(f"{path}: missing required column 'regions' (run `fgdata ground` first)")
            units.append(WorkUnit(path.name, {"path": str(path), "rows": pq.read_metadata(path).num_rows}))
        return units

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.regions_dir)]

    def pool(self, cluster_gpus: float, config: Config) -> ModelPool:
        return one_actor_per_gpu(config.negatives, cluster_gpus)

    def load_model(self, config: Config) -> NegativeModels:
        return NegativeModels(nli=NliScorer(config.negatives.nli_model), nlp=load_pipeline(config.negatives.spacy_model))

    def prepared_batches(self, unit: WorkUnit, config: Config) -> int:
        return max(1, math.ceil(unit.payload["rows"] / config.negatives.batch_size))

    def prepare(self, unit: WorkUnit, config: Config) -> list[RowBatch]:
        rows = read_shard(Path(unit.payload["path"])).to_pylist()
        size = config.negatives.batch_size
        return [RowBatch(rows=rows[i : i + size], rows_in=len(rows[i : i + size])) for i in range(0, max(len(rows), 1), size)]

    def process(self, unit: WorkUnit, config: Config, model: NegativeModels | None = None, prepared: Iterable | None = None) -> ShardResult:
        settings = config.negatives
        settings_json = json.dumps({k: getattr(settings, k) for k in ("per_region", "min_valid", "max_changed_words", "max_entailment", "seed")}, sort_keys=True)
        backend = f"{LEXICON_VERSION} + {pipeline_id(model.nlp)}"
        out, rows_in = [], 0
        counters: Counter = Counter()
        for batch in prepared:
            rows_in += batch.rows_in
            regions = [(row, region) for row in batch.rows for region in row["regions"]]
            docs = model.nlp.pipe([region["phrase"] for _, region in regions])
            candidates = []  # (region, swap, hypothesis in caption context)
            for (row, region), doc in zip(regions, docs):
                region["negatives"], region["_seen"] = [], set()
                head = next((t.i for t in doc if t.lemma_.lower() == region["head"]), doc[:].root.i)
                swaps = attribute_swaps(doc, head, settings.per_region, settings.seed)
                region["negatives_flag"] = "ok" if swaps else "no_swappable_attribute"
                caption = row[row["phrase_source"]] or ""
                for swap in swaps:
                    problem = structure_problem(region["phrase"], swap.text, region["head"], region["_seen"], settings.max_changed_words)
                    if problem:
                        counters[f"dropped_{problem}"] += 1
                        continue
                    region["_seen"].add(" ".join(words(swap.text)))
                    candidates.append((region, swap, caption[: region["start"]] + swap.text + caption[region["end"] :], caption))
            scores = model.nli.score([(premise, hypothesis) for _, _, hypothesis, premise in candidates]) if candidates else []
            for (region, swap, _, _), score in zip(candidates, scores):
                if score["entailment"] >= settings.max_entailment:
                    counters["dropped_entailed"] += 1
                    continue
                region["negatives"].append({"text": swap.text, "attribute": swap.attribute, **score})
            for row in batch.rows:
                for region in row["regions"]:
                    region.pop("_seen")
                    counters["negatives"] += len(region["negatives"])
                    if region["negatives_flag"] == "ok" and len(region["negatives"]) < settings.min_valid:
                        region["negatives_flag"] = "too_few_valid"
                    counters[f"regions_{region['negatives_flag']}"] += 1
                out.append(
                    {
                        **row,
                        "negatives_backend": backend,
                        "nli_model": model.nli.name,
                        "nli_is_random": model.nli.is_random,
                        "negatives_settings": settings_json,
                    }
                )
        return ShardResult(
            rows_in=rows_in,
            table=conform(out, "fggrn"),
            counters=counters,
            provenance={"negatives_backend": backend, "nli_model": model.nli.name, "random_weights": model.nli.is_random},
        )
