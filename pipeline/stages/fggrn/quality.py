"""`fgdata quality`: CLIP scores of how well each image matches its captions and each box its phrase,
added as columns to region or FgGRN shards (the kind that comes in goes out), with optional floors.

A score is the cosine similarity in the configured CLIP's joint space (models/clip_scorer.py): the
whole image against short_caption and against long_caption, the box's crop against its phrase. A
row under quality.min_short_caption_score or min_long_caption_score is a reject
(`low_short_caption_score`, `low_long_caption_score`) whose detail holds the score. A region under
min_region_score leaves its row and is counted (`dropped_low_region_score`), as ground's box filters
drop boxes: a reject is a row, and the row keeps its other regions. Every floor is off by default.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Iterable

import pyarrow as pa
from PIL import Image

from pipeline.config import Config, QualityConfig
from pipeline.core.schemas import check_input_columns, conform
from pipeline.core.shards import lineage_entry, read_shard, read_shard_schema, shard_path, shard_rows
from pipeline.core.storage import resolved
from pipeline.errors import FgdataError
from pipeline.models.reference import check_model_reference
from pipeline.models.registry import load_clip_scorer
from pipeline.stages.base import ModelStage, Problem, ShardResult, WorkUnit, reject
from pipeline.stages.fggrn.ground import IMAGE_COLUMNS, GroundingBatch, batches_with_images, image_shards_of

TEXT_COLUMNS = {"key": pa.string(), "short_caption": pa.string(), "long_caption": pa.string()}
# CLIP's processor scales the shorter side to its input size, so a sliver of a picture would become
# an enormous one: beyond this longer/shorter ratio (recaption's default limit) there is no score
MAX_ASPECT_RATIO = 20.0
# columns holding one value per region, in region order: a dropped region leaves each of them
PER_REGION_COLUMNS = ("regions", "long_exprs", "region_agreement_ious", "region_clip_scores")


def scorable(width: float, height: float) -> bool:
    return width >= 1 and height >= 1 and max(width, height) / min(width, height) <= MAX_ASPECT_RATIO


def box_crop(image: Image.Image, box) -> Image.Image | None:
    """The part of `image` inside `box` (x1, y1, x2, y2 in its pixels), cut to the image; None for a
    box that is not four finite numbers, holds no whole pixel or is not `scorable`."""
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        return None
    x1, y1, x2, y2 = max(0.0, box[0]), max(0.0, box[1]), min(float(image.width), box[2]), min(float(image.height), box[3])
    return image.crop((x1, y1, x2, y2)) if scorable(x2 - x1, y2 - y1) else None


def caption_problem(row: dict, settings: QualityConfig) -> Problem | None:
    """The reject for a row whose image matches a caption less than its floor asks."""
    for caption in ("short_caption", "long_caption"):
        score, floor = row[f"{caption}_score"], getattr(settings, f"min_{caption}_score")
        if floor is not None and score is not None and score < floor:
            return f"low_{caption}_score", f"CLIP similarity of the image and {caption} is {score:.4f}, under quality.min_{caption}_score={floor:g}"
    return None


class QualityStage(ModelStage):
    name = "quality"
    output_kind = "regions"  # or "fggrn": whichever the input is, decided per run in plan_shard
    config_section = "quality"
    model_settings = ("model",)

    def __init__(self, regions_dir: Path, images_dir: Path | None = None):
        self.regions_dir = resolved(regions_dir)  # local paths or URIs
        self.images_dir = resolved(images_dir) if images_dir else None
        self._kind: str | None = None

    def plan(self, config: Config) -> list[WorkUnit]:
        return self.plan_each_shard(self.regions_dir, config)

    def check(self, config: Config) -> None:
        check_model_reference(config.quality.model, revision=config.quality.revision, trust_remote_code=False)
        self.images_dir = image_shards_of(self.regions_dir, self.images_dir)

    def plan_shard(self, path: Path, config: Config) -> WorkUnit:
        schema = read_shard_schema(path)
        check_input_columns(schema, TEXT_COLUMNS, where=str(path))
        if "regions" not in schema.names:
            raise FgdataError(f"{path}: missing required column 'regions' (give region shards from `fgdata ground` or FgGRN shards)")
        # only `fgdata negatives` writes negatives_backend: its rows go out as FgGRN rows again
        kind = "fggrn" if "negatives_backend" in schema.names else "regions"
        if self._kind not in (None, kind):
            raise FgdataError(f"{path} holds {kind} rows but earlier shards of {self.regions_dir} hold {self._kind} rows")
        self._kind = self.output_kind = kind
        image_shard = shard_path(self.images_dir, path.name)
        if image_shard.exists():
            check_input_columns(read_shard_schema(image_shard), IMAGE_COLUMNS, where=str(image_shard))
        return WorkUnit(path.name, {"path": str(path), "images": str(image_shard), "rows": shard_rows(path)})

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.regions_dir), lineage_entry(self.images_dir, role="images")]

    def load_model(self, config: Config):
        return load_clip_scorer(config.quality)

    def prepare(self, unit: WorkUnit, config: Config) -> list[GroundingBatch]:
        rows = read_shard(unit.payload["path"]).to_pylist()
        return batches_with_images(rows, unit.payload["images"], unit.payload["path"], self.prepared_batches(unit, config), config.quality.batch_size)

    def process(self, unit: WorkUnit, config: Config, model=None, prepared: Iterable | None = None) -> ShardResult:
        settings = config.quality
        out, rejects, rows_in = [], [], 0
        counters: Counter = Counter()
        for batch in prepared:
            rows_in += batch.rows_in
            rejects += batch.rejects
            self._score(batch, model)
            for row in batch.rows:
                problem = caption_problem(row, settings)
                if problem:
                    rejects.append(reject(row["key"], problem, unit.payload["path"]))
                    continue
                if settings.min_region_score is not None:
                    self._drop_low_regions(row, settings.min_region_score, counters)
                counters["regions_scored"] += sum(score is not None for score in row["region_clip_scores"])
                counters["regions_unscorable"] += row["region_clip_scores"].count(None)
                out.append({**row, "quality_model": model.name, "quality_model_is_random": model.is_random})
        return ShardResult(
            rows_in=rows_in, table=conform(out, self.output_kind), rejects=rejects, counters=counters,
            provenance={"quality_model": model.name, "random_weights": model.is_random},
        )

    @staticmethod
    def _score(batch: GroundingBatch, model) -> None:
        """Fills each row's caption scores and region_clip_scores (None where there is nothing to score)."""
        for caption, long in (("short_caption", False), ("long_caption", True)):
            which = [i for i, row in enumerate(batch.rows) if row[caption] and scorable(*batch.images[i].size)]
            scores = dict(zip(which, model.similarities([batch.images[i] for i in which], [batch.rows[i][caption] for i in which], long=long)))
            for i, row in enumerate(batch.rows):
                row[f"{caption}_score"] = scores.get(i)
        crops, phrases, places = [], [], []
        for row, image in zip(batch.rows, batch.images):
            row["region_clip_scores"] = [None] * len(row["regions"])
            for r, region in enumerate(row["regions"]):
                crop = box_crop(image, region["box"])
                if crop is not None:
                    crops.append(crop)
                    phrases.append(region["phrase"])
                    places.append((row, r))
        for (row, r), score in zip(places, model.similarities(crops, phrases)):
            row["region_clip_scores"][r] = score

    @staticmethod
    def _drop_low_regions(row: dict, floor: float, counters: Counter) -> None:
        """Removes the regions scored under `floor`, with their places in every per-region column."""
        keep = [score is None or score >= floor for score in row["region_clip_scores"]]
        counters["dropped_low_region_score"] += keep.count(False)
        for name in PER_REGION_COLUMNS:
            if row.get(name) is not None:
                row[name] = [value for value, kept in zip(row[name], keep) if kept]
