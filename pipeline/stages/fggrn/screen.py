"""`fgdata screen`: NSFW images rejected, faces found (and blurred if asked), personal data in
captions flagged or masked; one row per image, input shard N to output shard N."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

from PIL import Image, ImageFilter

from pipeline.config import SCREEN_CORES_PER_ACTOR, Config, ScreenConfig
from pipeline.core.images import ImageRejected, decode_rgb
from pipeline.core.personal_data import find_personal_data, mask_personal_data
from pipeline.core.schemas import check_input_columns, conform
from pipeline.core.shards import lineage_entry, shard_rows, read_shard_schema
from pipeline.core.storage import resolved
from pipeline.errors import FgdataError
from pipeline.models.nudenet_detector import FACE_CLASSES, LABELS, BodyDetection, check_model
from pipeline.models.registry import load_screen_detector
from pipeline.stages.base import ModelPool, ModelStage, Problem, ShardResult, WorkUnit, reject
from pipeline.stages.fggrn.dedup import REQUIRED_COLUMNS


def nsfw_problem(detections: list[BodyDetection], settings: ScreenConfig) -> Problem | None:
    """The `nsfw` reject for the highest-scoring detection of an NSFW class at or over the threshold."""
    hits = [d for d in detections if d.label in settings.nsfw_classes and d.score >= settings.nsfw_threshold]
    if not hits:
        return None
    worst = max(hits, key=lambda d: d.score)
    return "nsfw", f"{worst.label} detected with score {worst.score:.2f} (screen.nsfw_threshold={settings.nsfw_threshold:g})"


def blur_boxes(image: Image.Image, boxes: list[tuple[float, float, float, float]]) -> Image.Image:
    """A copy of `image` with each box blurred strongly enough that a face is not recognisable."""
    out = image.copy()
    for x1, y1, x2, y2 in boxes:
        area = (max(0, int(x1)), max(0, int(y1)), min(image.width, int(round(x2))), min(image.height, int(round(y2))))
        if area[2] > area[0] and area[3] > area[1]:
            radius = max(4, max(area[2] - area[0], area[3] - area[1]) // 6)
            out.paste(out.crop(area).filter(ImageFilter.GaussianBlur(radius)), area[:2])
    return out


def _png(image: Image.Image) -> bytes:
    # lossless, so the pixels outside the blurred faces stay exactly as they were decoded
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


class ScreenStage(ModelStage):
    name = "screen"
    output_kind = "images"
    config_section = "screen"
    model_settings = ("model",)

    def __init__(self, images_dir: Path):
        self.images_dir = resolved(images_dir)  # a local path or a URI

    def plan(self, config: Config) -> list[WorkUnit]:
        return self.plan_each_shard(self.images_dir, config)

    def check(self, config: Config) -> None:
        unknown = sorted(set(config.screen.nsfw_classes) - set(LABELS))
        if unknown:
            raise FgdataError(f"screen.nsfw_classes: {', '.join(unknown)} not among the detector's classes ({', '.join(LABELS)})")
        check_model(config.screen.model)

    def plan_shard(self, path: Path, config: Config) -> WorkUnit:
        check_input_columns(read_shard_schema(path), REQUIRED_COLUMNS, where=str(path))
        return WorkUnit(path.name, {"path": str(path), "rows": shard_rows(path)})

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.images_dir)]

    def gpus_per_replica(self, config: Config) -> int:
        # NudeNet runs on onnxruntime's CPU build: a GPU held by its actors would sit idle while
        # recaption, next in the fggrn recipe, waits for it (more actors: screen.num_actors)
        return 0

    def pool(self, cluster_gpus: float, config: Config, cluster_cpus: float = 0.0) -> ModelPool:
        settings = config.screen
        actors = settings.num_actors or max(1, int(cluster_cpus // SCREEN_CORES_PER_ACTOR))
        return ModelPool(actors=actors, gpus_per_actor=0.0, cpus_per_actor=settings.cpus_per_actor)

    def load_model(self, config: Config):
        return load_screen_detector(config.screen)

    def process(self, unit: WorkUnit, config: Config, model=None, prepared=None) -> ShardResult:
        settings = config.screen
        source = unit.payload["path"]
        rows, rejects, seen = [], [], set()
        counters: Counter = Counter()
        rows_in = 0
        for batch in prepared:
            for row in batch:
                rows_in += 1
                key = row["key"]
                problem = ("missing_key", "the row has no key") if key is None else None
                if key in seen:
                    problem = ("duplicate_key", f"key {key!r} appears more than once in the shard")
                seen.add(key)
                try:
                    screened = problem or self._screen(row, model, settings, counters)
                except ImageRejected as rejected:
                    screened = (rejected.reason, rejected.detail)
                if isinstance(screened, tuple):
                    rejects.append(reject(key if key is not None else f"<row {rows_in - 1}>", screened, source))
                else:
                    rows.append(screened)
        return ShardResult(
            rows_in=rows_in, table=conform(rows, "images"), rejects=rejects, counters=counters,
            provenance={"screen_model": model.model_id, "nsfw_rule": f"{', '.join(settings.nsfw_classes)} at score >= {settings.nsfw_threshold:g}"},
        )

    def _screen(self, row: dict, model, settings: ScreenConfig, counters: Counter) -> dict | Problem:
        """The screened row, or the problem that rejects it."""
        image = decode_rgb(row["image"])
        detections = model.detect(image)
        problem = nsfw_problem(detections, settings)
        if problem:
            return problem
        faces = [d for d in detections if d.label in FACE_CLASSES and d.score >= settings.face_threshold]
        counters["faces"] += len(faces)
        counters["images_with_faces"] += bool(faces)
        row = {**row, "faces": [{"label": f.label, "score": f.score, "box": list(f.box)} for f in faces], "faces_blurred": settings.blur_faces}
        if settings.blur_faces and faces:
            row["image"], row["format"] = _png(blur_boxes(image, [f.box for f in faces])), "PNG"
            counters["faces_blurred"] += len(faces)
        spans = find_personal_data(row["short_caption"] or "")
        row["caption_personal_data"] = sorted({kind for kind, _, _ in spans})
        counters.update(f"captions_with_{kind}" for kind in row["caption_personal_data"])
        if spans and settings.personal_data == "mask":
            row["short_caption"] = mask_personal_data(row["short_caption"], spans)
            counters["captions_masked"] += 1
        return row
