"""`fgdata hierarcaps seed`: an instruction LLM turns captions into 4-tier chains.

seed prompts with the fixed few-shot examples of `hierarcaps.seed_prompt` (`augment.py` shows
chains that already passed the NLI filter instead). The LLM writes the three tiers above the
caption; the caption is the fourth. Answers that do not parse into a well-shaped chain are
rejected with the reason and the answer itself.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

from pipeline.config import Config
from pipeline.core.storage import resolved
from pipeline.core.prompts import fill_template, load_prompt
from pipeline.core.schemas import conform
from pipeline.core.shards import lineage_entry
from pipeline.datasets.chains import complete_chain
from pipeline.errors import FgdataError
from pipeline.models.reference import check_model_reference
from pipeline.models.registry import check_text_backend, load_text_generator, note_provenance
from pipeline.stages.base import GeneratorStage, ShardResult, WorkUnit, reject
from pipeline.stages.hierarcaps.caption_inputs import caption_units, unit_captions, with_captions


class HierarcapsSeedStage(GeneratorStage):
    name = "hierarcaps-seed"
    config_section = "hierarcaps"
    extra_config_sections = ("ingest",)  # rows_per_shard and caption_fields split caption files
    output_kind = "hierarcaps"
    prompt_setting = "seed_prompt"

    def __init__(self, captions: Path):
        self.captions = resolved(captions)  # a local path or a URI

    def _prompt_name(self, config: Config) -> str:
        return getattr(config.hierarcaps, self.prompt_setting)

    def plan(self, config: Config) -> list[WorkUnit]:
        settings = config.hierarcaps
        if settings.backend not in ("transformers", "vllm"):
            raise FgdataError(f"hierarcaps.backend must be transformers or vllm, got {settings.backend!r}")
        check_text_backend(settings.backend, settings.model)
        units = caption_units(self.captions, config.ingest.rows_per_shard, config.ingest.caption_fields)
        template = load_prompt(self._prompt_name(config)).text
        if "{caption}" not in template:
            raise FgdataError(f"prompt {self._prompt_name(config)!r} has no {{caption}} placeholder")
        self.check_template(template, config)
        check_model_reference(settings.model, revision=settings.revision, trust_remote_code=settings.trust_remote_code)
        return units

    def check_template(self, template: str, config: Config) -> None:
        """More that the prompt must hold (augment: its examples)."""

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.captions)]

    def load_model(self, config: Config):
        return self.load_generator(config, load_text_generator)

    def read_rows(self, unit: WorkUnit, config: Config) -> list[dict]:
        return unit_captions(unit)

    def process(self, unit: WorkUnit, config: Config, model=None, prepared: Iterable | None = None) -> ShardResult:
        settings = config.hierarcaps
        prompt = load_prompt(self._prompt_name(config))
        sampling = self.sampling(config)
        source = f"{self.name}: {model.name}, prompt {prompt.name} sha256:{prompt.sha256}, sampling {sampling.to_json()}"
        rows, rejects, counters, rows_in = [], [], Counter(), 0
        for batch in prepared:
            rows_in += len(batch)
            usable = with_captions(batch, rejects, unit.name)
            texts = [self._fill(prompt.text, item, settings) for item in usable]
            generations = model.generate(texts, sampling) if texts else []
            for item, generation in zip(usable, generations):
                counters["generated_tokens"] += generation.tokens
                tiers, problem = complete_chain(generation.text, item["caption"])
                if problem:
                    rejects.append(reject(item["key"], problem, unit.name))
                    continue
                rows.append(
                    {"key": item["key"], "split": settings.split, "tiers": tiers, "image_url": item["image_url"], "source": source, "model_is_random": model.is_random}
                )
        return ShardResult(
            rows_in=rows_in, table=conform(rows, "hierarcaps"), rejects=rejects, counters=counters,
            provenance={"model": model.name, "prompt": f"{prompt.name} sha256:{prompt.sha256}", "random_weights": model.is_random, **note_provenance(model)},
        )

    def _fill(self, template: str, item: dict, settings) -> str:
        return fill_template(template, {"caption": item["caption"].strip(), **self.extra_values(item, settings)})

    def extra_values(self, item: dict, settings) -> dict[str, str]:
        """Placeholders beyond {caption} that one caption's prompt fills (augment: {examples})."""
        return {}
