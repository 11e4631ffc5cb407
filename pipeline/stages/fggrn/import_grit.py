"""`fgdata import grit`: a GRIT parquet (Kosmos-2's grounded captions) → region shards.

GRIT rows hold `caption`, the image's `width`/`height`, and `noun_chunks` / `ref_exps`: lists of
[start, end, x1, y1, x2, y2, score], a character span of the caption and its box normalised to 0-1.
One row per record, keyed as `fgdata download` keys the same file's images (key, f_path, id, else
`<file stem>-<row index>`), so the two join. One region per expression (`--expressions`, default
ref_exps: the noun chunks expanded through their dependency subtree). A record with no caption, a
malformed expression, a span outside the caption, a bad box (check_box) or a score outside 0-1 is a
reject with its reason; so is a key used twice.
The parquet may be a local file or an object on a store (s3://, gs://, hf://), read by pyarrow
through the store's filesystem: only the columns above are fetched.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from numbers import Real
from pathlib import Path

from pipeline.config import Config
from pipeline.core import storage
from pipeline.core.box_checks import check_box, shown
from pipeline.core.schemas import conform
from pipeline.core.shards import shard_name
from pipeline.errors import FgdataError
from pipeline.models.spacy_nlp import load_spacy, spacy_id
from pipeline.stages.base import ShardResult, Stage, WorkUnit, reject
from pipeline.stages.fggrn.records import read_records, record_key

EXPRESSIONS = ("ref_exps", "noun_chunks")
SOURCE = "imported:grit"


def _size(value) -> int:
    return int(value) if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < 2**31 else 0


def record_regions(record: dict, field: str) -> tuple[list[dict] | None, tuple[str, str] | None]:
    """(regions without heads, None) or (None, (reason, detail)) for one GRIT record."""
    caption = record.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        return None, ("missing_caption", f"caption is {shown(caption)}, not text")
    expressions = record.get(field)
    if expressions is None:
        expressions = []
    if not isinstance(expressions, list):
        return None, ("bad_expressions", f"{field} is {shown(expressions)}, not a list")
    width, height = _size(record.get("width")), _size(record.get("height"))
    regions = []
    for number, entry in enumerate(expressions):
        if not isinstance(entry, (list, tuple)) or len(entry) != 7:
            return None, ("bad_expressions", f"{field}[{number}] is {shown(entry)}, not [start, end, x1, y1, x2, y2, score]")
        start, end, *box, score = entry
        if not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and float(v).is_integer() for v in (start, end)):
            return None, ("bad_span", f"{field}[{number}]: span {shown([start, end])} is not two whole numbers")
        start, end = int(start), int(end)
        if not 0 <= start < end <= len(caption) or not caption[start:end].strip():
            return None, ("bad_span", f"{field}[{number}]: span [{start}, {end}) is not text of the {len(caption)}-character caption")
        box_norm, bad = check_box(box)
        if bad:
            return None, (bad[0], f"{field}[{number}]: {bad[1]}")
        if not (isinstance(score, Real) and not isinstance(score, bool) and 0.0 <= score <= 1.0):
            return None, ("bad_score", f"{field}[{number}]: score {shown(score)} is not between 0 and 1")
        regions.append(
            {
                "phrase": caption[start:end], "start": start, "end": end, "head": "", "box_norm": box_norm,
                "box": [box_norm[0] * width, box_norm[1] * height, box_norm[2] * width, box_norm[3] * height] if width and height else [],
                "score": float(score),
            }
        )
    return regions, None


class ImportGritStage(Stage):
    name = "import-grit"
    output_kind = "regions"
    config_section = "ingest"  # rows_per_shard decides the shards, as for `fgdata download`
    extra_config_sections = ("phrases",)  # spacy_model finds each phrase's head

    def __init__(self, parquet: Path | str, expressions: str = "ref_exps"):
        self.parquet = storage.resolved(parquet)
        self.expressions = expressions

    def plan(self, config: Config) -> list[WorkUnit]:
        if self.expressions not in EXPRESSIONS:
            raise FgdataError(f"--expressions must be one of {', '.join(EXPRESSIONS)}, got {self.expressions!r}")
        load_spacy(config.phrases.spacy_model)
        records = read_records(self.parquet, columns=("key", "f_path", "id", "caption", "width", "height", self.expressions))
        if records and not any("caption" in r for r in records):
            raise FgdataError(f"{self.parquet}: no caption column; is it a GRIT parquet?")
        planned, seen = [], set()
        for index, record in enumerate(records):
            key = record_key(record, index, self.parquet.stem)
            problem = ("duplicate_key", f"row {index}: key {key!r} is used by an earlier row") if key in seen else None
            seen.add(key)
            planned.append({"key": key, "record": record, "problem": problem})
        size = config.ingest.rows_per_shard
        return [WorkUnit(shard_name(i), planned[s : s + size]) for i, s in enumerate(range(0, max(len(planned), 1), size))]

    def plan_fingerprint(self) -> str:
        return self.expressions

    def lineage(self) -> list[dict]:
        return [{"path": str(self.parquet), "format": "grit-parquet", "expressions": self.expressions}]

    def process(self, unit: WorkUnit, config: Config, model=None, prepared=None) -> ShardResult:
        nlp = load_spacy(config.phrases.spacy_model)
        counters: Counter = Counter()
        rows, rejects = [], []
        grounding = json.dumps({"imported_from": str(self.parquet), "expressions": self.expressions})
        for planned in unit.payload:
            record, problem, regions = planned["record"], planned["problem"], None
            if problem is None:
                regions, problem = record_regions(record, self.expressions)
            if problem:
                rejects.append(reject(planned["key"], problem, str(self.parquet)))
                continue
            for region, doc in zip(regions, nlp.pipe([r["phrase"] for r in regions])):
                region["head"] = doc[:].root.lemma_.lower()
            counters["regions"] += len(regions)
            rows.append(
                {
                    "key": planned["key"], "short_caption": record["caption"], "long_caption": None, "phrase_source": "short_caption",
                    "width": _size(record.get("width")), "height": _size(record.get("height")), "regions": regions,
                    "detector": SOURCE, "detector_is_random": False, "grounding": grounding,
                }
            )
        return ShardResult(
            rows_in=len(unit.payload), table=conform(rows, "regions"), rejects=rejects, counters=counters,
            provenance={"imported_from": str(self.parquet), "spacy": spacy_id(nlp)},
        )
