"""`fgdata recaption`: a multimodal LLM writes a detailed long caption for every image.

Images are decoded and resized in CPU tasks (`prepare`); model actors (`process`) only
generate, check each caption, retry a rejected one once with sampling, and write the shard.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import pyarrow as pa
from PIL import Image

from pipeline.config import Config, RecaptionConfig, pick
from pipeline.core.caption_quality import CaptionLimits, caption_problem
from pipeline.core.images import ImageRejected, decode_rgb
from pipeline.core.prompts import load_prompt
from pipeline.core.schemas import check_input_columns, conform
from pipeline.core.shards import lineage_entry, read_shard, read_shard_schema, shard_rows
from pipeline.core.storage import resolved
from pipeline.core.text import clean_caption
from pipeline.errors import FgdataError
from pipeline.models.generation import Generation, ImageTextGenerator, Sampling
from pipeline.models.reference import check_model_reference
from pipeline.models.registry import load_generator
from pipeline.stages.base import GeneratorStage, ShardResult, WorkUnit, reject

REQUIRED_COLUMNS = {"key": pa.string(), "image": pa.binary(), "short_caption": pa.string()}


@dataclass
class PreparedBatch:
    keys: list[str] = field(default_factory=list)
    short_captions: list[str | None] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    rows_in: int = 0


def prepare_image(data: bytes, settings: RecaptionConfig) -> Image.Image:
    """Decodes to RGB and shrinks to fit max_image_side; raises ImageRejected for what a VLM cannot take."""
    image = decode_rgb(data)  # upright, 8-bit, transparency flattened: the pixels every stage sees
    width, height = image.size
    if max(width, height) / max(min(width, height), 1) > settings.max_aspect_ratio:
        raise ImageRejected("extreme_aspect_ratio", f"{width}x{height} is beyond max_aspect_ratio={settings.max_aspect_ratio}")
    image.thumbnail((settings.max_image_side, settings.max_image_side), Image.Resampling.BICUBIC)
    return image


class RecaptionStage(GeneratorStage):
    name = "recaption"
    output_kind = "captions"
    config_section = "recaption"

    def __init__(self, images_dir: Path):
        self.images_dir = resolved(images_dir)  # a local path or a URI

    def plan(self, config: Config) -> list[WorkUnit]:
        return self.plan_each_shard(self.images_dir, config)

    def check(self, config: Config) -> None:
        settings = config.recaption
        if settings.backend not in ("transformers", "vllm"):
            raise FgdataError(f"recaption.backend must be transformers or vllm, got {settings.backend!r}")
        load_prompt(settings.prompt)  # a missing prompt or model stops the run before it starts
        check_model_reference(settings.model, revision=settings.revision, trust_remote_code=settings.trust_remote_code)

    def plan_shard(self, path: Path, config: Config) -> WorkUnit:
        check_input_columns(read_shard_schema(path), REQUIRED_COLUMNS, where=str(path))
        return WorkUnit(path.name, {"path": str(path), "rows": shard_rows(path)})

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.images_dir)]

    def load_model(self, config: Config) -> ImageTextGenerator:
        return self.load_generator(config, load_generator)

    def prepare(self, unit: WorkUnit, config: Config) -> list[PreparedBatch]:
        settings = config.recaption
        table = read_shard(unit.payload["path"], columns=list(REQUIRED_COLUMNS))
        batches = [PreparedBatch() for _ in range(self.prepared_batches(unit, config))]
        for index, row in enumerate(table.to_pylist()):
            batch = batches[index // settings.batch_size]
            batch.rows_in += 1
            try:
                image = prepare_image(row["image"], settings)
            except ImageRejected as rejected:
                batch.rejects.append(reject(row["key"], (rejected.reason, rejected.detail), unit.payload["path"]))
                continue
            batch.keys.append(row["key"])
            batch.short_captions.append(clean_caption(row["short_caption"]) or None)
            batch.images.append(image)
        return batches

    def process(self, unit: WorkUnit, config: Config, model: ImageTextGenerator | None = None, prepared: Iterable | None = None) -> ShardResult:
        settings = config.recaption
        prompt = load_prompt(settings.prompt)
        limits = pick(CaptionLimits, settings)
        first = self.sampling(config)
        retry = replace(first, temperature=settings.retry_temperature, seed=settings.seed + 1)
        rows, rejects, rows_in = [], [], 0
        counters: Counter = Counter()
        for batch in prepared:
            rows_in += batch.rows_in
            rejects += batch.rejects
            if not batch.images:
                continue
            generations = model.generate(batch.images, prompt.text, first)
            samplings = [first] * len(generations)
            problems = [caption_problem(g.text, g.finish_reason, limits) for g in generations]
            retry_at = [i for i, problem in enumerate(problems) if problem] if settings.retry_temperature > 0 else []
            if retry_at:
                counters["retried"] += len(retry_at)
                for i, generation in zip(retry_at, model.generate([batch.images[i] for i in retry_at], prompt.text, retry)):
                    generations[i], samplings[i] = generation, retry
                    problems[i] = caption_problem(generation.text, generation.finish_reason, limits)
                    counters["retry_succeeded"] += problems[i] is None
            for key, short, generation, sampling, problem in zip(batch.keys, batch.short_captions, generations, samplings, problems):
                counters["generated_tokens"] += generation.tokens
                if problem:
                    reason, detail = problem
                    rejects.append(reject(key, (reason, f"{detail}; output: {generation.text[:200]!r}"), unit.payload["path"]))
                    continue
                rows.append(self._row(key, short, generation, sampling, model, prompt))
        return ShardResult(
            rows_in=rows_in,
            table=conform(rows, "captions"),
            rejects=rejects,
            counters=counters,
            provenance={
                "caption_model": f"{model.info.model}@{model.info.revision or 'unknown'} ({model.info.backend})",
                "prompt": f"{prompt.name} sha256:{prompt.sha256}",
                "random_weights": model.info.is_random,
            },
        )

    @staticmethod
    def _row(key, short, generation: Generation, sampling: Sampling, model: ImageTextGenerator, prompt) -> dict:
        return {
            "key": key,
            "short_caption": short,
            "long_caption": generation.text,
            "caption_model": model.info.model,
            "caption_model_revision": model.info.revision,
            "caption_model_is_random": model.info.is_random,
            "caption_backend": model.info.backend,
            "prompt_name": prompt.name,
            "prompt_hash": prompt.sha256,
            "sampling": sampling.to_json(),
            "seed": sampling.seed,
            "generated_tokens": generation.tokens,
            "finish_reason": generation.finish_reason,
        }
