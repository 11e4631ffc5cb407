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

The export folder follows the stages' ownership rule: it holds fgdata's `_run.json` (stage
"export-fgclip", with the list of files the export wrote). A non-empty folder without it is never
written to; an export folder is refreshed in place, or emptied of its own files with --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipeline.box_checks import check_box
from pipeline.errors import FgdataError, first_line
from pipeline.schemas import check_input_columns, load_schema
from pipeline.shards import MANIFEST_FILE, RUN_FILE, find_ancestor, list_shards, check_output_path, read_json, read_shard, read_shard_schema, write_json

STAGE = "export-fgclip"
JSON_FILE = "fgclip.json"
SUMMARY_FILE = "_export.json"
_FGGRN_COLUMNS = ["key", "short_caption", "long_caption", "phrase_source", "regions"]
_IMAGE_COLUMNS = ["key", "image", "format"]
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# what image_file_name can produce: a later --overwrite deletes a recorded file only if it looks like one
_OUR_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_READABLE_CHARS = 80  # + "-" + hash + extension stays far below the usual 255-byte name limit
_HASH_CHARS = 16  # 64 bits: no collision expected among billions of keys
_SENTENCE_END = re.compile(r"[.!?;](\s|$)")


def sentence_around(text: str, start: int, end: int) -> str:
    """The sentence of `text` that holds the span [start, end)."""
    left = max((m.end() for m in _SENTENCE_END.finditer(text, 0, start)), default=0)
    right = next((m.start() + 1 for m in _SENTENCE_END.finditer(text, end)), len(text))
    return text[left:right].strip()


def image_file_name(key: str, image_format: str) -> str:
    """The key made safe and short, plus a hash of the whole key: unique and stable for every key,
    within file-name limits, never hidden (`.`) or option-like (`-`)."""
    readable = _UNSAFE.sub("_", key).lstrip("._-")[:_READABLE_CHARS] or "image"
    digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    return f"{readable}-{digest}{_EXTENSIONS.get(image_format, '.img')}"


def fgclip_item(row: dict, f_path: str, negatives_needed: int) -> dict:
    caption = row["long_caption"] or row["short_caption"] or ""
    source = row.get(row["phrase_source"]) or ""
    boxes = []
    for region in row["regions"]:
        bbox, bad = check_box(region["box_norm"])
        if bad:  # FG-CLIP's loader would take NaN or an inverted box for a real region
            continue
        negatives = [n["text"] for n in region["negatives"]]
        complete = len(negatives) >= negatives_needed
        boxes.append(
            {
                "bbox": [round(v, 6) for v in bbox],
                "short_expr": region["phrase"],
                "long_expr": sentence_around(source, region["start"], region["end"]),
                "flag_short_neg": int(complete),
                "short_expr_negs": {str(i): text for i, text in enumerate(negatives[:negatives_needed])} if complete else {},
            }
        )
    return {"f_path": f_path, "caption": caption, "short_caption": row["short_caption"] or "", "bbox_info": boxes}


def _check_kind(dataset_dir: Path, kind: str, columns: list[str], shards: list[Path]) -> None:
    """Stops before anything is written when `dataset_dir` is not a dataset of `kind`."""
    manifest = read_json(dataset_dir / MANIFEST_FILE)
    if manifest is not None and "kind" not in manifest:
        raise FgdataError(f"{dataset_dir / MANIFEST_FILE}: no 'kind'; it is damaged: rerun the stage that wrote {dataset_dir} to rewrite it")
    if manifest is not None and manifest["kind"] != kind:
        raise FgdataError(
            f"{dataset_dir} holds {manifest['kind']!r} shards (its {MANIFEST_FILE}), not {kind}; "
            f"export fgclip reads the fggrn output of `fgdata negatives` and its image shards"
        )
    schema = load_schema(kind).arrow
    for shard in shards:
        check_input_columns(read_shard_schema(shard), {name: schema.field(name).type for name in columns}, where=str(shard))


def _recorded_files(out_dir: Path) -> list[str]:
    """The files an earlier export into `out_dir` wrote; refuses a folder fgdata's export does not own."""
    record = read_json(out_dir / RUN_FILE)
    if record is None:
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise FgdataError(f"{out_dir} is not empty and was not written by fgdata; choose a new folder for the export")
        return []
    if record.get("stage") != STAGE:
        raise FgdataError(f"{out_dir} holds the output of fgdata stage {record.get('stage')!r}, not an export; choose a new folder for the export")
    files = record.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise FgdataError(f"{out_dir / RUN_FILE}: 'files' is not a list of file names; choose a new folder for the export")
    images = out_dir / "images"
    if images.is_symlink() or (images.exists() and not images.is_dir()):
        raise FgdataError(f"{images} is not a plain folder (a link or a file); choose a new folder for the export")
    return files


def _is_export_file(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return name in (JSON_FILE, SUMMARY_FILE) or (len(parts) == 2 and parts[0] == "images" and bool(_OUR_IMAGE.fullmatch(parts[1])))


def _remove_export(out_dir: Path, files: list[str]) -> None:
    """Deletes what an earlier export wrote, and only that: the files its record lists."""
    for name in filter(_is_export_file, files):
        path = out_dir / name
        if path.is_file() or path.is_symlink():  # a link itself goes, never what it points to
            path.unlink()
    if (out_dir / "images").is_dir() and not any((out_dir / "images").iterdir()):
        (out_dir / "images").rmdir()


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Writes `data` unless the file already holds exactly these bytes; atomically, so a link in the
    way is replaced, not followed."""
    if path.is_file() and not path.is_symlink() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FgdataError(f"cannot write {path}: {first_line(exc)}") from None
    return True


def export_fgclip(
    fggrn_dir: Path, out_dir: Path, images_dir: Path | None = None, negatives_needed: int = 10, progress: bool = True, overwrite: bool = False
) -> dict:
    fggrn_dir = Path(fggrn_dir).resolve()
    shards = list_shards(fggrn_dir)
    _check_kind(fggrn_dir, "fggrn", _FGGRN_COLUMNS, shards)
    images_dir = Path(images_dir).resolve() if images_dir else find_ancestor(fggrn_dir, "images")
    if images_dir is None or not images_dir.is_dir():
        raise FgdataError(f"cannot find the image shards {fggrn_dir} descends from; pass --images DIR")
    # no symlink, no file in the way, apart from both inputs
    out_dir = check_output_path(out_dir, inputs=[fggrn_dir, images_dir])
    image_shards = [images_dir / s.name for s in shards if (images_dir / s.name).exists()]
    _check_kind(images_dir, "images", _IMAGE_COLUMNS, image_shards)
    earlier_files = _recorded_files(out_dir)

    # plan every item from the small columns first: nothing is written unless the whole input reads
    items, missing, wanted, owner = [], [], {}, {}
    regions = 0
    for shard in shards:
        image_shard = images_dir / shard.name
        formats = {}
        if image_shard.exists():
            table = read_shard(image_shard, columns=["key", "format"])
            formats = dict(zip(table.column("key").to_pylist(), table.column("format").to_pylist()))
        for row in read_shard(shard, columns=_FGGRN_COLUMNS).to_pylist():
            if row["key"] not in formats:
                missing.append(row["key"])
                continue
            name = image_file_name(row["key"], formats[row["key"]])
            if owner.setdefault(name, row["key"]) != row["key"]:
                raise FgdataError(f"keys {owner[name]!r} and {row['key']!r} map to one file name {name}; report this as a bug")
            wanted.setdefault(image_shard, {})[row["key"]] = name
            items.append(fgclip_item(row, f"images/{name}", negatives_needed))
            regions += len(row["regions"])
    if not items:
        raise FgdataError(f"no image of {fggrn_dir} was found in {images_dir}; nothing to export")

    if overwrite:
        _remove_export(out_dir, earlier_files)
        earlier_files = []
    files = [JSON_FILE, SUMMARY_FILE, *(f"images/{n}" for names in wanted.values() for n in names.values())]
    # recorded before the first image is written, so even an interrupted export is known as ours
    try:
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # OUT under a file, or not writable
        raise FgdataError(f"cannot create {out_dir / 'images'}: {first_line(exc)}; choose a new folder for the export") from None
    write_json(out_dir / RUN_FILE, {"stage": STAGE, "written_by": "fgdata", "source": str(fggrn_dir), "images": str(images_dir), "files": sorted({*earlier_files, *files})})
    written = 0
    for image_shard, names in tqdm(wanted.items(), unit="shard", desc="export fgclip", disable=not progress):
        for row in read_shard(image_shard, columns=["key", "image"]).to_pylist():
            if row["key"] in names:
                written += _write_if_changed(out_dir / "images" / names[row["key"]], row["image"])

    json_path = out_dir / JSON_FILE
    # strict JSON (no NaN), written whole and last: a reader never sees half a list
    _write_if_changed(json_path, (json.dumps(items, ensure_ascii=False, allow_nan=False) + "\n").encode())
    boxes = sum(len(i["bbox_info"]) for i in items)
    summary = {
        "items": len(items),
        "boxes": boxes,
        "boxes_with_negatives": sum(b["flag_short_neg"] for i in items for b in i["bbox_info"]),
        "bad_boxes": regions - boxes,
        "images_written": written,
        "missing_images": missing,
        "json": str(json_path),
    }
    write_json(out_dir / SUMMARY_FILE, {**summary, "source": str(fggrn_dir), "images": str(images_dir)})
    return summary
