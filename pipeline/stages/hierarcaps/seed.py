"""`fgdata hierarcaps seed` and `augment`: an instruction LLM turns captions into 4-tier chains.

seed prompts with the fixed few-shot examples of `hierarcaps.seed_prompt`; augment fills the
`{examples}` of `hierarcaps.augment_prompt` with chains that already passed the NLI filter (a
different draw for every caption), so the validated set grows and diversifies itself. The LLM
writes the three tiers above the caption; the caption is the fourth. Answers that do not
parse into a well-shaped chain are rejected with the reason and the answer itself.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Iterable

from pipeline.config import Config
from pipeline.core.prompts import fill_template, load_prompt
from pipeline.core.schemas import conform
from pipeline.core.shards import lineage_entry
from pipeline.datasets.chains import SEPARATOR, complete_chain, normal_text
from pipeline.datasets.hierarcaps_csv import read_chains
from pipeline.errors import FgdataError
from pipeline.models.generation import Sampling
from pipeline.models.reference import absolute_local_paths, check_model_reference
from pipeline.models.registry import load_text_generator
from pipeline.stages.base import ModelPool, ShardResult, Stage, WorkUnit, model_pool, row_batches
from pipeline.stages.hierarcaps.caption_inputs import caption_units, unit_captions, with_captions

MAX_DEMONSTRATION_POOL = 20_000  # chains kept to draw augment examples from


def format_examples(chains: list[list[str]]) -> str:
    return "\n\n".join(f"Caption: {tiers[-1]}\nHierarchy: {SEPARATOR.join(tiers[:-1])}" for tiers in chains)


def draw_demonstrations(pool: list[list[str]], key: str, caption: str, count: int, seed: int) -> list[list[str]]:
    """The examples one caption's prompt shows: fixed by the key and seed, so reruns repeat them;
    never the caption's own chain (that would hand the model the answer)."""
    drawn = random.Random(f"{seed}:{key}").sample(pool, min(count + 1, len(pool)))
    return [tiers for tiers in drawn if normal_text(tiers[-1]) != normal_text(caption)][:count]


class HierarcapsSeedStage(Stage):
    config_section = "hierarcaps"
    extra_config_sections = ("ingest",)  # rows_per_shard and caption_fields split caption files
    output_kind = "hierarcaps"
    uses_model = True

    def __init__(self, captions: Path, demonstrations: Path | None = None):
        self.captions = Path(captions).resolve()
        self.demonstrations_dir = Path(demonstrations).resolve() if demonstrations else None
        self.name = "hierarcaps-augment" if demonstrations else "hierarcaps-seed"
        self.examples: list[list[str]] = []  # validated chains augment draws from

    def _prompt_name(self, config: Config) -> str:
        return config.hierarcaps.augment_prompt if self.demonstrations_dir else config.hierarcaps.seed_prompt

    def plan(self, config: Config) -> list[WorkUnit]:
        settings = config.hierarcaps
        if settings.backend not in ("transformers", "vllm"):
            raise FgdataError(f"hierarcaps.backend must be transformers or vllm, got {settings.backend!r}")
        units = caption_units(self.captions, config.ingest.rows_per_shard, config.ingest.caption_fields)
        absolute_local_paths(settings, "model")
        template = load_prompt(self._prompt_name(config)).text
        if "{caption}" not in template:
            raise FgdataError(f"prompt {self._prompt_name(config)!r} has no {{caption}} placeholder")
        if self.demonstrations_dir:
            if "{examples}" not in template:
                raise FgdataError(f"augment prompt {self._prompt_name(config)!r} has no {{examples}} placeholder")
            chains = [tiers for _, tiers, _ in read_chains([self.demonstrations_dir])]
            self.examples = random.Random(settings.seed).sample(chains, min(len(chains), MAX_DEMONSTRATION_POOL))
        check_model_reference(settings.model, revision=settings.revision, trust_remote_code=settings.trust_remote_code)
        return units

    def plan_fingerprint(self) -> str:
        return repr(getattr(self, "examples", None))

    def lineage(self) -> list[dict]:
        demonstrations = [lineage_entry(self.demonstrations_dir, role="demonstrations")] if self.demonstrations_dir else []
        return [lineage_entry(self.captions), *demonstrations]

    def pool(self, cluster_gpus: float, config: Config) -> ModelPool:
        s = config.hierarcaps
        return model_pool(s, cluster_gpus, gpus_per_replica=s.tensor_parallel_size if s.backend == "vllm" else 1)

    def load_model(self, config: Config):
        s = config.hierarcaps
        return load_text_generator(s.backend, s.model, revision=s.revision, trust_remote_code=s.trust_remote_code, dtype=s.dtype, tensor_parallel_size=s.tensor_parallel_size)

    def prepared_batches(self, unit: WorkUnit, config: Config) -> int:
        return max(1, math.ceil(unit.payload["rows"] / config.hierarcaps.batch_size))

    def prepare(self, unit: WorkUnit, config: Config) -> list[list[dict]]:
        return row_batches(unit_captions(unit), config.hierarcaps.batch_size)

    def process(self, unit: WorkUnit, config: Config, model=None, prepared: Iterable | None = None) -> ShardResult:
        settings = config.hierarcaps
        prompt = load_prompt(self._prompt_name(config))
        sampling = Sampling(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed)
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
                    rejects.append({"key": item["key"], "reason": problem, "detail": f"model answered {generation.text[:300]!r}", "source": unit.name})
                    continue
                rows.append(
                    {"key": item["key"], "split": settings.split, "tiers": tiers, "image_url": item["image_url"], "source": source, "model_is_random": model.is_random}
                )
        return ShardResult(
            rows_in=rows_in, table=conform(rows, "hierarcaps"), rejects=rejects, counters=counters,
            provenance={"model": model.name, "prompt": f"{prompt.name} sha256:{prompt.sha256}", "random_weights": model.is_random},
        )

    def _fill(self, template: str, item: dict, settings) -> str:
        values = {"caption": item["caption"].strip()}
        if self.demonstrations_dir:
            examples = draw_demonstrations(self.examples, item["key"], item["caption"], settings.demonstrations, settings.seed)
            values["examples"] = format_examples(examples)
        return fill_template(template, values)
