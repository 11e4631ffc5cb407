"""`fgdata ground`: every phrase of every image grounded to boxes by an open-vocabulary detector.

Phrase shard N is joined by key with image shard N of the dataset the phrases descend from
(found through the manifests' lineage, or given with --images). CPU tasks decode the images;
model actors detect, filter and write one row per image with its nested list of regions.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
from PIL import Image

from pipeline.config import Config, pick
from pipeline.core.images import ImageRejected, decode_rgb
from pipeline.core.schemas import check_input_columns, conform
from pipeline.core.shards import find_ancestor, lineage_entry, list_shards, read_shard, read_shard_schema, shard_path, shard_rows
from pipeline.core.storage import location, resolved
from pipeline.errors import FgdataError
from pipeline.models.detection import PhraseDetector
from pipeline.models.registry import check_detector, load_detector
from pipeline.stages.base import ModelStage, ShardResult, WorkUnit, reject
from pipeline.stages.fggrn.box_filters import BoxLimits, filter_detections, normalise_box

PHRASE_COLUMNS = {"key": pa.string(), "short_caption": pa.string(), "long_caption": pa.string(), "phrase_source": pa.string()}
IMAGE_COLUMNS = {"key": pa.string(), "image": pa.binary()}


@dataclass
class GroundingBatch:
    rows: list[dict] = field(default_factory=list)  # phrase rows whose image decoded
    images: list[Image.Image] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    rows_in: int = 0


class GroundStage(ModelStage):
    name = "ground"
    output_kind = "regions"
    config_section = "ground"
    model_settings = ("text_encoder", "owl_model", "detector")

    def __init__(self, phrases_dir: Path, images_dir: Path | None = None):
        self.phrases_dir = resolved(phrases_dir)  # local paths or URIs
        self.images_dir = resolved(images_dir) if images_dir else None

    def plan(self, config: Config) -> list[WorkUnit]:
        check_detector(config.ground)  # first: a model file that would run code is named before anything else
        shards = list_shards(self.phrases_dir)
        self._check_images()
        return [self.plan_shard(path, config) for path in shards]

    def check(self, config: Config) -> None:
        check_detector(config.ground)  # before any actor loads (or unpickles) a model
        self._check_images()

    def _check_images(self) -> None:
        if self.images_dir is None:
            self.images_dir = find_ancestor(self.phrases_dir, "images")
            if self.images_dir is None:
                raise FgdataError(f"cannot find the image shards {self.phrases_dir} descends from (no lineage in its manifests); pass --images DIR")
        if not self.images_dir.is_dir():
            raise FgdataError(f"image shards directory {self.images_dir} does not exist")

    def plan_shard(self, path: Path, config: Config) -> WorkUnit:
        schema = read_shard_schema(path)
        check_input_columns(schema, PHRASE_COLUMNS, where=str(path))
        if "phrases" not in schema.names:
            raise FgdataError(f"{path}: missing required column 'phrases' (run `fgdata phrases` first)")
        image_shard = shard_path(self.images_dir, path.name)
        if image_shard.exists():
            check_input_columns(read_shard_schema(image_shard), IMAGE_COLUMNS, where=str(image_shard))
        return WorkUnit(path.name, {"phrases": str(path), "images": str(image_shard), "rows": shard_rows(path)})

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.phrases_dir), lineage_entry(self.images_dir, role="images")]

    def load_model(self, config: Config) -> PhraseDetector:
        return load_detector(config.ground)

    def prepare(self, unit: WorkUnit, config: Config) -> list[GroundingBatch]:
        phrases = read_shard(unit.payload["phrases"], columns=[*PHRASE_COLUMNS, "phrases"]).to_pylist()
        images_path = location(unit.payload["images"])
        images = {}
        if images_path.exists():
            table = read_shard(images_path, columns=list(IMAGE_COLUMNS))
            images = dict(zip(table.column("key").to_pylist(), table.column("image").to_pylist()))
        batches = [GroundingBatch() for _ in range(self.prepared_batches(unit, config))]
        for index, row in enumerate(phrases):
            batch = batches[index // config.ground.batch_size]
            batch.rows_in += 1
            data = images.get(row["key"])
            if data is None:
                detail = f"no image with this key in {images_path}" if images_path.exists() else f"{images_path} does not exist"
                batch.rejects.append(reject(row["key"], ("image_missing", detail), unit.payload["phrases"]))
                continue
            try:
                image = decode_rgb(data)  # upright, like the width/height ingest recorded
            except ImageRejected as rejected:
                batch.rejects.append(reject(row["key"], (rejected.reason, rejected.detail), str(images_path)))
                continue
            batch.rows.append(row)
            batch.images.append(image)
        return batches

    def process(self, unit: WorkUnit, config: Config, model: PhraseDetector | None = None, prepared: Iterable | None = None) -> ShardResult:
        settings = config.ground
        limits = pick(BoxLimits, settings)
        grounding = json.dumps(asdict(limits), sort_keys=True)
        out, rejects, rows_in = [], [], 0
        counters: Counter = Counter()
        cache = getattr(model, "texts", None)  # YOLO-World's phrase-embedding cache lives per actor
        hits_before, misses_before = (cache.hits, cache.misses) if cache else (0, 0)
        for batch in prepared:
            rows_in += batch.rows_in
            rejects += batch.rejects
            if not batch.rows:
                continue
            texts = [[p["text"] for p in row["phrases"]] for row in batch.rows]
            wanted = [i for i, t in enumerate(texts) if t]  # images without phrases skip the detector
            found = dict(zip(wanted, model.detect([batch.images[i] for i in wanted], [texts[i] for i in wanted], settings.score_threshold))) if wanted else {}
            for i, (row, image) in enumerate(zip(batch.rows, batch.images)):
                width, height = image.size
                kept, dropped = filter_detections(found.get(i, []), width, height, limits)
                counters.update({f"dropped_{name}": count for name, count in dropped.items() if count})
                counters["regions"] += len(kept)
                counters["images_without_regions"] += not kept
                regions = [self._region(row["phrases"][d.phrase], d, width, height) for d in kept]
                out.append(
                    {
                        **{name: row[name] for name in PHRASE_COLUMNS},
                        "width": width,
                        "height": height,
                        "regions": regions,
                        "detector": model.name,
                        "detector_is_random": model.is_random,
                        "grounding": grounding,
                    }
                )
        if cache:
            counters["phrase_embedding_cache_hits"] = cache.hits - hits_before
            counters["phrase_embedding_cache_misses"] = cache.misses - misses_before
        return ShardResult(
            rows_in=rows_in,
            table=conform(out, "regions"),
            rejects=rejects,
            counters=counters,
            provenance={"detector": model.name, "random_weights": model.is_random},
        )

    @staticmethod
    def _region(phrase: dict, detection, width: int, height: int) -> dict:
        return {
            "phrase": phrase["text"],
            "start": phrase["start"],
            "end": phrase["end"],
            "head": phrase["head"],
            "box": [round(v, 2) for v in detection.box],
            "box_norm": [round(v, 6) for v in normalise_box(detection.box, width, height)],
            "score": detection.score,
        }
