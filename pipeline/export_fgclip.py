"""`fgdata export fgclip`: FgGRN shards → the JSON list + image files FG-CLIP's stage-2 trainer reads.

Field mapping (one item per image):
  f_path          image file, relative to the JSON file (written under images/)
  caption         long_caption (the short caption when there is none)
  short_caption   short_caption ("" when there is none)
  bbox_info       one entry per region:
    bbox            [x1, y1, x2, y2] normalised to 0-1 by the image width and height (our box_norm)
    short_expr      the region phrase
    long_expr       the caption sentence that contains the phrase (a longer referring expression)
    flag_short_neg  1 when the region has `negatives_needed` hard negatives, else 0
    short_expr_negs {"0": negative, "1": ...} (empty when flag_short_neg is 0)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.errors import FgdataError
from pipeline.shards import find_ancestor, list_shards, read_shard, write_json

_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SENTENCE_END = re.compile(r"[.!?;](\s|$)")


def sentence_around(text: str, start: int, end: int) -> str:
    """The sentence of `text` that holds the span [start, end)."""
    left = max((m.end() for m in _SENTENCE_END.finditer(text, 0, start)), default=0)
    right = next((m.start() + 1 for m in _SENTENCE_END.finditer(text, end)), len(text))
    return text[left:right].strip()


def fgclip_item(row: dict, f_path: str, negatives_needed: int) -> dict:
    caption = row["long_caption"] or row["short_caption"] or ""
    source = row[row["phrase_source"]] or ""
    boxes = []
    for region in row["regions"]:
        negatives = [n["text"] for n in region["negatives"]]
        complete = len(negatives) >= negatives_needed
        boxes.append(
            {
                "bbox": [round(v, 6) for v in region["box_norm"]],
                "short_expr": region["phrase"],
                "long_expr": sentence_around(source, region["start"], region["end"]),
                "flag_short_neg": int(complete),
                "short_expr_negs": {str(i): text for i, text in enumerate(negatives[:negatives_needed])} if complete else {},
            }
        )
    return {"f_path": f_path, "caption": caption, "short_caption": row["short_caption"] or "", "bbox_info": boxes}


def export_fgclip(fggrn_dir: Path, out_dir: Path, images_dir: Path | None = None, negatives_needed: int = 10, progress: bool = True) -> dict:
    fggrn_dir, out_dir = Path(fggrn_dir).resolve(), Path(out_dir).resolve()
    shards = list_shards(fggrn_dir)
    images_dir = Path(images_dir).resolve() if images_dir else find_ancestor(fggrn_dir, "images")
    if images_dir is None or not images_dir.is_dir():
        raise FgdataError(f"cannot find the image shards {fggrn_dir} descends from; pass --images DIR")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    items, missing = [], []
    for shard in tqdm(shards, unit="shard", desc="export fgclip", disable=not progress):
        image_shard = images_dir / shard.name
        images = {}
        if image_shard.exists():
            table = read_shard(image_shard, columns=["key", "image", "format"])
            images = {r["key"]: r for r in table.to_pylist()}
        for row in pq.read_table(shard).to_pylist():
            image = images.get(row["key"])
            if image is None:
                missing.append(row["key"])
                continue
            name = f"{_UNSAFE.sub('_', row['key'])}{_EXTENSIONS.get(image['format'], '.img')}"
            target = out_dir / "images" / name
            if not target.exists() or target.stat().st_size != len(image["image"]):
                target.write_bytes(image["image"])
            items.append(fgclip_item(row, f"images/{name}", negatives_needed))
    if not items:
        raise FgdataError(f"no image of {fggrn_dir} was found in {images_dir}; nothing to export")
    json_path = out_dir / "fgclip.json"
    partial = json_path.with_suffix(".json.partial")
    partial.write_text(json.dumps(items, ensure_ascii=False) + "\n")
    partial.replace(json_path)  # a reader never sees half a file
    summary = {
        "items": len(items),
        "boxes": sum(len(i["bbox_info"]) for i in items),
        "boxes_with_negatives": sum(b["flag_short_neg"] for i in items for b in i["bbox_info"]),
        "missing_images": missing,
        "json": str(json_path),
    }
    write_json(out_dir / "_export.json", {**summary, "source": str(fggrn_dir), "images": str(images_dir)})
    return summary
