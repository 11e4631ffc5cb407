"""`fgdata import fgclip`: FineHARD / FG-CLIP stage-2 JSON → FgGRN shards (and, with --images,
image shards), so released data can go through grounding checks, `fgdata negatives` or the trainer.

Mapping (the reverse of `fgdata export fgclip`), one row per item:
  key            f_path normalised lexically (posix): `./a.jpg`, `sub/../a.jpg` and `a.jpg/` are the image
                 `a.jpg`, on disk and on a store alike; an absolute f_path or one that climbs out of the
                 folder is an unsafe_path reject, a second item naming an image a duplicate_key reject
                 (`fgdata download` keys an item's image by its f_path as written: the same for FineHARD's)
  long_caption   caption;  short_caption  short_caption (null when blank);  phrase_source long_caption
  width, height  from the image shards built with --images; 0 (unknown) without them
  regions        one per bbox_info entry: phrase = short_expr, start/end = its first whole-word
                 occurrence in the caption (-1/-1 when absent, counted), head = spaCy root lemma,
                 box_norm = bbox (checked and clamped by check_box), box = bbox in pixels ([] when
                 the size is unknown), score 1.0 (released boxes have none), negatives =
                 short_expr_negs in key order (NLI scores NaN: not scored here), negatives_flag
                 ok when flag_short_neg is 1 (and there are negatives), else too_few_valid
  long_exprs     each box's long_expr, in box order (null when the file has none)
  detector, negatives_backend  IMPORTED_FGCLIP: `fgdata export fgclip` writes these rows back as released
Fields outside FG-CLIP's layout are counted (`fields_not_kept`), not kept.
An item that is not an object, has no f_path or caption, a malformed bbox_info entry, a bad box or
negatives that are not text is a reject with its reason; so is a key used twice or, with --images,
an item whose image was rejected.
JSON, the --images folder and OUT may each be a local path or an object-store URI (s3://, gs://,
hf://): on a store f_path names an object under the folder, with the same refusals (`/...`, `..`).
"""

from __future__ import annotations

import json
import math
import posixpath
from collections import Counter
from pathlib import Path

from pipeline.config import Config
from pipeline.core import storage
from pipeline.core.box_checks import check_box, shown
from pipeline.core.schemas import conform
from pipeline.core.shards import lineage_entry, read_shard, shard_name, shard_path
from pipeline.core.sources import OutsideRoot, SourceItem, path_inside
from pipeline.datasets.fgclip_export import IMPORTED_FGCLIP, find_phrase
from pipeline.errors import first_line
from pipeline.models.spacy_nlp import load_spacy, spacy_id
from pipeline.stages.base import ShardResult, Stage, WorkUnit, reject
from pipeline.stages.fggrn.ingest import IngestStage
from pipeline.stages.fggrn.records import read_records

# what FG-CLIP's loaders read (FG-CLIP 1 train_fgclip.py at 0fcea59, FG-CLIP 2 train_fgclip2.py)
ITEM_FIELDS = {"f_path", "caption", "short_caption", "bbox_info"}
BOX_FIELDS = {"bbox", "short_expr", "long_expr", "flag_short_neg", "short_expr_negs"}


def _units(items: list, size: int) -> list[WorkUnit]:
    # images and fggrn are cut the same way, so images/part-N and fggrn/part-N hold the same keys
    return [WorkUnit(shard_name(i), items[start : start + size]) for i, start in enumerate(range(0, max(len(items), 1), size))]


def f_path_key(f_path: str) -> tuple[str | None, tuple[str, str] | None]:
    """(the key of the image `f_path` names, None) or (None, ("unsafe_path", detail)). One lexical (posix)
    rule on disk and on a store: `./a.jpg`, `sub/../a.jpg` and `a.jpg/` are the image `a.jpg`; an
    absolute path (even one inside the folder), a URI, `.` or a path that climbs out is refused."""
    if f_path.startswith("/") or storage.is_uri(f_path):
        return None, ("unsafe_path", f"f_path {shown(f_path)} is absolute; FG-CLIP's f_path is relative to the image folder")
    key = posixpath.normpath(f_path)
    if key == "." or key == ".." or key.startswith("../"):
        return None, ("unsafe_path", f"f_path {shown(f_path)} names {'the image folder itself' if key == '.' else 'a file outside the image folder'}")
    return key, None


def plan_items(path: storage.Location) -> list[dict]:
    """(index, key, item, problem) per JSON item, in file order. The key is the normalised f_path; a
    problem for no f_path, an unsafe one (keyed as written) or a second item naming the same image."""
    planned, first_item = [], {}
    for index, item in enumerate(read_records(path)):
        f_path = item.get("f_path")
        key, problem = f"{path.stem}-{index:09d}", None
        if "_not_an_object" in item:
            problem = ("bad_record", f"item {index} is a {item['_not_an_object']}, not an object")
        elif not isinstance(f_path, str) or not f_path.strip():
            problem = ("missing_f_path", f"item {index} has no f_path text")
        else:
            key, problem = f_path_key(f_path)
            if key in first_item:  # FineHARD has one item per image
                earlier = first_item[key]
                key, problem = f_path, ("duplicate_key", f"item {index}: f_path {f_path!r} names the image {earlier[1]!r} of item {earlier[0]}")
            elif problem:
                key = f_path
            else:
                first_item[key] = (index, f_path)
        planned.append({"index": index, "key": key, "item": item, "problem": problem})
    return planned


def _negatives(value) -> list[str] | None:
    """short_expr_negs ({"0": text, ...} or a list) as texts in order; None when malformed."""
    if value is None:
        return []
    if isinstance(value, dict):
        try:
            value = [value[k] for k in sorted(value, key=int)]
        except (TypeError, ValueError):
            return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        return None
    return value


def item_regions(item: dict, width: int, height: int, counters: Counter) -> tuple[list[dict] | None, tuple[str, str] | None]:
    """(regions without heads, each with its released `long_expr` (None when it has none), None) or
    (None, (reason, detail)) for one FG-CLIP item."""
    caption = item.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        return None, ("missing_caption", f"caption is {shown(caption)}, not text")
    if item.get("short_caption") is not None and not isinstance(item["short_caption"], str):
        return None, ("bad_short_caption", f"short_caption is {shown(item['short_caption'])}, not text")
    boxes = item.get("bbox_info", [])
    if not isinstance(boxes, list):
        return None, ("bad_bbox_info", f"bbox_info is {shown(boxes)}, not a list")
    regions = []
    for number, entry in enumerate(boxes):
        if not isinstance(entry, dict):
            return None, ("bad_bbox_info", f"bbox_info[{number}] is {shown(entry)}, not an object")
        box_norm, bad = check_box(entry.get("bbox"))
        if bad:
            return None, (bad[0], f"bbox_info[{number}]: {bad[1]}")
        phrase = entry.get("short_expr")
        if not isinstance(phrase, str) or not phrase.strip():
            return None, ("missing_short_expr", f"bbox_info[{number}].short_expr is {shown(phrase)}, not text")
        long_expr = entry.get("long_expr")
        if long_expr is not None and not isinstance(long_expr, str):
            return None, ("bad_long_expr", f"bbox_info[{number}].long_expr is {shown(long_expr)}, not text")
        negatives = _negatives(entry.get("short_expr_negs"))
        if negatives is None:
            return None, ("bad_negatives", f"bbox_info[{number}].short_expr_negs is {shown(entry.get('short_expr_negs'))}, not texts")
        span = find_phrase(caption, phrase)
        counters["phrases_not_in_caption"] += span is None
        counters["fields_not_kept"] += len(entry.keys() - BOX_FIELDS)
        flagged = entry.get("flag_short_neg") in (1, True)
        counters["flagged_without_negatives"] += flagged and not negatives  # FG-CLIP's hard loss needs them: exported as 0
        start, end = span or (-1, -1)
        nan = math.nan  # not scored by an NLI model here
        regions.append(
            {
                "phrase": phrase, "start": start, "end": end, "head": "", "box_norm": box_norm,
                "box": [box_norm[0] * width, box_norm[1] * height, box_norm[2] * width, box_norm[3] * height] if width else [],
                "score": 1.0,
                "negatives": [{"text": t, "attribute": "unspecified", "entailment": nan, "contradiction": nan, "neutral": nan} for t in negatives],
                "negatives_flag": "ok" if flagged and negatives else "too_few_valid",
                "long_expr": long_expr if long_expr and long_expr.strip() else None,  # blank: derived again at export
            }
        )
    return regions, None


class FgclipImagesStage(IngestStage):
    """The images an FG-CLIP JSON names (f_path under DIR) → image shards keyed by f_path."""

    name = "import-fgclip-images"

    def __init__(self, json_path: Path | str, images_dir: Path | str):
        super().__init__(images_dir)
        self.json_path = storage.resolved(json_path)

    def plan(self, config: Config) -> list[WorkUnit]:
        items = []
        for planned in plan_items(self.json_path):
            problem, target = planned["problem"], self.source / planned["key"]
            if problem is None:
                try:
                    target = path_inside(self.source, planned["key"])
                except OutsideRoot:  # the key stays inside lexically: a link on disk leads out
                    problem = ("unsafe_path", f"f_path {planned['key']!r} points outside {self.source}")
                except (OSError, ValueError, RuntimeError) as exc:  # a NUL, a name too long, a link loop
                    problem = ("unsafe_path", f"f_path {shown(planned['key'])} cannot be resolved: {shown(first_line(exc))}")
            caption = planned["item"].get("short_caption")
            items.append(SourceItem(key=planned["key"], path=str(target), caption=caption if isinstance(caption, str) else None, problem=problem))
        return _units(items, config.ingest.rows_per_shard)

    def lineage(self) -> list[dict]:
        return [{"path": str(self.json_path), "format": "fgclip-json"}, {"path": str(self.source), "format": "fgclip-images"}]


class ImportFgclipStage(Stage):
    name = "import-fgclip"
    output_kind = "fggrn"
    config_section = "ingest"  # rows_per_shard decides the shards
    extra_config_sections = ("phrases",)  # spacy_model finds each phrase's head

    def __init__(self, json_path: Path | str, images: Path | str | None = None):
        self.json_path = storage.resolved(json_path)
        self.images = storage.resolved(images) if images else None

    def plan(self, config: Config) -> list[WorkUnit]:
        load_spacy(config.phrases.spacy_model)  # a missing pipeline stops here, before any shard
        return _units(plan_items(self.json_path), config.ingest.rows_per_shard)

    def lineage(self) -> list[dict]:
        return [{"path": str(self.json_path), "format": "fgclip-json"}] + ([lineage_entry(self.images)] if self.images else [])

    def process(self, unit: WorkUnit, config: Config, model=None, prepared=None) -> ShardResult:
        sizes = {}
        if self.images and shard_path(self.images, unit.name).exists():
            table = read_shard(shard_path(self.images, unit.name), columns=["key", "width", "height"])
            sizes = {k: (w, h) for k, w, h in zip(*(table.column(c).to_pylist() for c in ("key", "width", "height")))}
        nlp = load_spacy(config.phrases.spacy_model)
        counters: Counter = Counter()
        rows, rejects = [], []
        for planned in unit.payload:
            key, item, problem = planned["key"], planned["item"], planned["problem"]
            regions = None
            if problem is None and self.images and key not in sizes:
                problem = ("image_rejected", f"its image is not in {shard_path(self.images, unit.name)} (see that dataset's _rejects)")
            if problem is None:
                regions, problem = item_regions(item, *sizes.get(key, (0, 0)), counters)
            if problem:
                rejects.append(reject(key, problem, str(self.json_path)))
                continue
            for region, doc in zip(regions, nlp.pipe([r["phrase"] for r in regions])):
                region["head"] = doc[:].root.lemma_.lower()
            long_exprs = [region.pop("long_expr") for region in regions]
            counters["fields_not_kept"] += len(item.keys() - ITEM_FIELDS)
            counters["regions"] += len(regions)
            counters["negatives"] += sum(len(r["negatives"]) for r in regions)
            provenance = json.dumps({"imported_from": str(self.json_path)})
            width, height = sizes.get(key, (0, 0))
            rows.append(
                {
                    "key": key, "short_caption": (item.get("short_caption") or "").strip() or None, "long_caption": item["caption"],
                    "phrase_source": "long_caption", "width": width, "height": height, "regions": regions,
                    "long_exprs": long_exprs if any(t is not None for t in long_exprs) else None,
                    "detector": IMPORTED_FGCLIP, "detector_is_random": False, "grounding": provenance,
                    "negatives_backend": IMPORTED_FGCLIP, "nli_model": "none", "nli_is_random": False, "negatives_settings": provenance,
                }
            )
        return ShardResult(
            rows_in=len(unit.payload), table=conform(rows, "fggrn"), rejects=rejects, counters=counters,
            provenance={"imported_from": str(self.json_path), "spacy": spacy_id(nlp)},
        )
