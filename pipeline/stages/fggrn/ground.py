"""`fgdata ground`: every phrase of every image grounded to boxes by an open-vocabulary detector.

Phrase shard N is joined by key with image shard N of the dataset the phrases descend from
(found through the manifests' lineage, or given with --images). CPU tasks decode the images;
model actors detect, filter and write one row per image with its nested list of regions.
With ground.agreement_detector the actors hold both detectors, and a box the filters keep must be
confirmed by the other one (`agreement`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import torch
from PIL import Image
from torchvision.ops import box_iou

from pipeline.config import Config, pick
from pipeline.core.images import ImageRejected, decode_rgb
from pipeline.core.schemas import check_input_columns, conform
from pipeline.core.shards import find_ancestor, lineage_entry, list_shards, read_shard, read_shard_schema, shard_path, shard_rows
from pipeline.core.storage import location, resolved
from pipeline.errors import FgdataError
from pipeline.models.detection import Detection, PhraseDetector
from pipeline.models.registry import check_detector, load_detector
from pipeline.stages.base import ModelStage, ShardResult, WorkUnit, reject
from pipeline.stages.fggrn.box_filters import BoxLimits, filter_detections, normalise_box

PHRASE_COLUMNS = {"key": pa.string(), "short_caption": pa.string(), "long_caption": pa.string(), "phrase_source": pa.string()}
IMAGE_COLUMNS = {"key": pa.string(), "image": pa.binary()}


def agreement(detections: list[Detection], partner: list[Detection], min_iou: float) -> tuple[list[tuple[Detection, float]], int]:
    """GranD's vote between two detectors, per phrase: each detection with the best IoU of the
    partner's boxes for the same phrase (0 when it has none), kept when that IoU is at least
    `min_iou`; and how many were dropped."""
    kept = []
    for detection in detections:
        boxes = [p.box for p in partner if p.phrase == detection.phrase]
        best = float(box_iou(torch.tensor([detection.box]), torch.tensor(boxes)).max()) if boxes else 0.0
        if best >= min_iou:
            kept.append((detection, best))
    return kept, len(detections) - len(kept)


@dataclass
class Detectors:
    main: PhraseDetector
    partner: PhraseDetector | None  # ground.agreement_detector: its boxes must confirm main's


@dataclass
class GroundingBatch:
    rows: list[dict] = field(default_factory=list)  # input rows whose image decoded
    images: list[Image.Image] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    rows_in: int = 0


def image_shards_of(dataset: Path, images_dir: Path | None) -> Path:
    """The image shards a dataset's rows join by key: `images_dir` when given, else the images
    ancestor in its lineage; a one-line error when there is none or it is gone."""
    if images_dir is None:
        images_dir = find_ancestor(dataset, "images")
        if images_dir is None:
            raise FgdataError(f"cannot find the image shards {dataset} descends from (no lineage in its manifests); pass --images DIR")
    if not images_dir.is_dir():
        raise FgdataError(f"image shards directory {images_dir} does not exist")
    return images_dir


def batches_with_images(rows: list[dict], images: str, source: str, count: int, batch_size: int) -> list[GroundingBatch]:
    """`rows` (from the shard `source`) in `count` batches of `batch_size`, each row with its image
    from the image shard `images` decoded upright; a row whose image is missing or does not decode
    is a reject. Shared by ground and quality, whose boxes live in that upright frame."""
    images_path = location(images)
    pictures = {}
    if images_path.exists():
        table = read_shard(images_path, columns=list(IMAGE_COLUMNS))
        pictures = dict(zip(table.column("key").to_pylist(), table.column("image").to_pylist()))
    batches = [GroundingBatch() for _ in range(count)]
    for index, row in enumerate(rows):
        batch = batches[index // batch_size]
        batch.rows_in += 1
        data = pictures.get(row["key"])
        if data is None:
            detail = f"no image with this key in {images_path}" if images_path.exists() else f"{images_path} does not exist"
            batch.rejects.append(reject(row["key"], ("image_missing", detail), source))
            continue
        try:
            image = decode_rgb(data)  # upright, like the width/height ingest recorded
        except ImageRejected as rejected:
            batch.rejects.append(reject(row["key"], (rejected.reason, rejected.detail), str(images_path)))
            continue
        batch.rows.append(row)
        batch.images.append(image)
    return batches


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
        self.images_dir = image_shards_of(self.phrases_dir, self.images_dir)

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

    def load_model(self, config: Config) -> Detectors:
        settings = config.ground
        partner = load_detector(settings, settings.agreement_detector) if settings.agreement_detector else None
        return Detectors(load_detector(settings), partner)

    def prepare(self, unit: WorkUnit, config: Config) -> list[GroundingBatch]:
        phrases = read_shard(unit.payload["phrases"], columns=[*PHRASE_COLUMNS, "phrases"]).to_pylist()
        return batches_with_images(phrases, unit.payload["images"], unit.payload["phrases"], self.prepared_batches(unit, config), config.ground.batch_size)

    def process(self, unit: WorkUnit, config: Config, model: Detectors | None = None, prepared: Iterable | None = None) -> ShardResult:
        settings = config.ground
        limits = pick(BoxLimits, settings)
        agreeing = {"agreement_detector": settings.agreement_detector, "agreement_iou": settings.agreement_iou} if model.partner else {}
        grounding = json.dumps({**asdict(limits), **agreeing}, sort_keys=True)
        detectors, model = model, model.main
        is_random = model.is_random or bool(detectors.partner and detectors.partner.is_random)  # either one's boxes decide
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
            images, queries = [batch.images[i] for i in wanted], [texts[i] for i in wanted]
            found = dict(zip(wanted, model.detect(images, queries, settings.score_threshold))) if wanted else {}
            confirming = dict(zip(wanted, detectors.partner.detect(images, queries, settings.score_threshold))) if wanted and detectors.partner else {}
            for i, (row, image) in enumerate(zip(batch.rows, batch.images)):
                width, height = image.size
                kept, dropped = filter_detections(found.get(i, []), width, height, limits)
                counters.update({f"dropped_{name}": count for name, count in dropped.items() if count})
                if detectors.partner:  # after the filters: the boxes they keep must each have a partner
                    kept_with_iou, disagreed = agreement(kept, confirming.get(i, []), settings.agreement_iou)
                    counters["dropped_no_agreement"] += disagreed
                else:
                    kept_with_iou = [(d, None) for d in kept]
                counters["regions"] += len(kept_with_iou)
                counters["images_without_regions"] += not kept_with_iou
                regions = [self._region(row["phrases"][d.phrase], d, width, height) for d, _ in kept_with_iou]
                out.append(
                    {
                        **{name: row[name] for name in PHRASE_COLUMNS},
                        "width": width,
                        "height": height,
                        "regions": regions,
                        "detector": model.name,
                        "detector_is_random": is_random,
                        "grounding": grounding,
                        "region_agreement_ious": [iou for _, iou in kept_with_iou] if detectors.partner else None,
                    }
                )
        if cache:
            counters["phrase_embedding_cache_hits"] = cache.hits - hits_before
            counters["phrase_embedding_cache_misses"] = cache.misses - misses_before
        partner = {"agreement_detector": detectors.partner.name} if detectors.partner else {}
        return ShardResult(
            rows_in=rows_in,
            table=conform(out, "regions"),
            rejects=rejects,
            counters=counters,
            provenance={"detector": model.name, "random_weights": is_random, **partner},
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
