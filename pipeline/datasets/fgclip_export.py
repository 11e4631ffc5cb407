"""`fgdata export fgclip`: FgGRN shards → the JSON list + image files FG-CLIP's stage-2 trainer reads.

Field mapping (one item per image):
  f_path          image file, relative to the export folder (written under images/)
  caption         long_caption (refused when missing, unless allowed: then the short caption, counted)
  short_caption   short_caption ("" when there is none)
  bbox_info       one entry per phrase (its best-scored box), boxes with hard negatives first:
    bbox            [x1, y1, x2, y2] normalised to 0-1 by the image width and height (our box_norm)
    short_expr      the region phrase
    long_expr       the region's released long_expr, else the phrase with its modifiers from the long
                    caption (see region_description)
    flag_short_neg  1 when the region has `negatives_needed` hard negatives, else 0
    short_expr_negs {"0": negative, "1": ...} (empty when flag_short_neg is 0)
Region texts are lowercased by default (FG-CLIP 2 lowercases the negatives it reads, not the positive).
Rows `fgdata import fgclip` wrote (negatives_backend IMPORTED_FGCLIP) go out as released: every box in
its order, texts in their case, negatives and flag_short_neg as they were.

Images whose boxes have no hard negatives are kept, as FineHARD keeps them (flag_short_neg 0: they still
train the long/short and regional losses); FG-CLIP 1's collator fails only on a batch where no image has
any, so the summary gives that chance for a batch of `batch_size`, and `require_negatives` leaves such
images out instead.

FG-CLIP's loaders are given a folder (`scripts/train.sh --data_path`) and read every `*.json` and
`*.jsonl` in it as a list of items, so fgclip.json is the only `.json` fgdata writes there: its own
records are `_run.fgdata` (ownership: stage "export-fgclip", the files the export wrote) and
`_export.fgdata` (the summary), both JSON text. A non-empty folder without the record is never
written to; an export folder is refreshed in place, or emptied of its own files with --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipeline.config import FgclipTrainConfig
from pipeline.core.box_checks import check_box
from pipeline.core.schemas import check_input_columns, load_schema
from pipeline.core.shards import MANIFEST_FILE, RUN_FILE, check_output_path, find_ancestor, list_shards, read_json, read_shard, read_shard_schema, shard_path, write_json
from pipeline.core.storage import resolved
from pipeline.datasets.datacard import DATACARD_FILE, export_datacard
from pipeline.errors import FgdataError, first_line

STAGE = "export-fgclip"
JSON_FILE = "fgclip.json"
RECORD_FILE = "_run.fgdata"
SUMMARY_FILE = "_export.fgdata"
# what exports wrote before FG-CLIP's loaders were found to read them as data: removed by the next export
LEGACY_SUMMARY_FILE = "_export.json"
DATA_GLOBS = ("*.json", "*.jsonl")  # what FG-CLIP 1 and 2 read from a --data_path folder
# why an item is left out; no_box_with_negatives only with require_negatives (--require-negatives)
LEFT_OUT_REASONS = {
    "no_usable_box": "no box passed the box checks",
    "no_box_with_negatives": "no box with hard negatives among the first 4, --require-negatives",
}
# the detector and negatives_backend of rows `fgdata import fgclip` wrote: exported as released
IMPORTED_FGCLIP = "imported:fgclip-json"
LOADER_BOXES = 4  # FG-CLIP's loaders keep an item's first 4 boxes (max_anns)
# FG-CLIP 1's collator fails on a batch without any hard-negative set: warn above this chance per batch
NEGATIVE_FREE_BATCH_WARNING = 1e-3
_FGGRN_COLUMNS = ["key", "short_caption", "long_caption", "phrase_source", "regions"]
_OPTIONAL_FGGRN_COLUMNS = ["negatives_backend", "long_exprs"]  # read where a shard has them (long_exprs is newer)
_IMAGE_COLUMNS = ["key", "image", "format"]
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# what image_file_name can produce: a later --overwrite deletes a recorded file only if it looks like one
_OUR_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_READABLE_CHARS = 80  # + "-" + hash + extension stays far below the usual 255-byte name limit
_HASH_CHARS = 16  # 64 bits: no collision expected among billions of keys

# Where a region's description ends: a sentence or clause end, a bracket, or a conjunction that
# starts the next part of the caption ("... at the top left and a small blue square ...").
_CLAUSE_END = re.compile(r"[.!?;:](?=\s|$)|[,()\[\]\n]|\s(?:and|or|but|while|whereas|although|though|because|so|yet)\s", re.IGNORECASE)
# the loaders tokenise region texts to 77 CLIP tokens: 20 words stay well inside
LONG_EXPR_MAX_WORDS = 20
# a description cut at the word limit does not end on a word that needs a continuation
_DANGLING = {"a", "an", "the", "of", "on", "in", "at", "to", "with", "by", "for", "from", "and", "or", "its", "his", "her", "their", "that", "which", "who", "is", "are"}


def text_key(text: str) -> str:
    """What a CLIP tokenizer sees: case and runs of spaces do not make two texts different."""
    return " ".join(text.lower().split())


def region_description(text: str, start: int, end: int, max_words: int = LONG_EXPR_MAX_WORDS) -> str:
    """The phrase at text[start:end] with the modifiers that follow it in its clause, e.g.
    "a red cup" in "A man holds a red cup on a wooden table, smiling." → "a red cup on a wooden table".
    Ends at the clause's end; cut to `max_words` (never shorter than the phrase)."""
    stop = _CLAUSE_END.search(text, end)
    phrase = text[start:end].split()
    words = phrase + text[end : stop.start() if stop else len(text)].split()
    if len(words) > max(max_words, len(phrase)):
        words = words[: max(max_words, len(phrase))]
        while len(words) > len(phrase) and words[-1].lower() in _DANGLING:
            words.pop()
    return " ".join(words)


def find_phrase(text: str, phrase: str) -> tuple[int, int] | None:
    """The first whole-word occurrence of `phrase` in `text`, ignoring case and spacing."""
    words = phrase.split()
    if not words:
        return None
    found = re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", text, re.IGNORECASE)
    return found.span() if found else None


def long_expression(row: dict, region: dict) -> tuple[str, str]:
    """(long_expr, where it came from): the phrase expanded in the long caption, else in the caption
    the phrase was found in, else the phrase alone."""
    phrase, start, end = region["phrase"], region["start"], region["end"]
    source = row.get(row["phrase_source"]) or ""
    at_span = 0 <= start < end and source[start:end] == phrase
    spans = [("long_caption", source, (start, end))] if at_span and row["phrase_source"] == "long_caption" else []
    spans.append(("long_caption", row["long_caption"] or "", find_phrase(row["long_caption"] or "", phrase)))
    if at_span:
        spans.append((row["phrase_source"], source, (start, end)))
    for name, text, span in spans:
        if span is not None:
            return region_description(text, *span), name
    return " ".join(phrase.split()), "phrase"


def has_long_caption(row: dict) -> bool:
    long = (row["long_caption"] or "").strip()
    return bool(long) and text_key(long) != text_key(row["short_caption"] or "")


def image_file_name(key: str, image_format: str) -> str:
    """The key made safe and short, plus a hash of the whole key: unique and stable for every key,
    within file-name limits, never hidden (`.`) or option-like (`-`)."""
    readable = _UNSAFE.sub("_", key).lstrip("._-")[:_READABLE_CHARS] or "image"
    digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    return f"{readable}-{digest}{_EXTENSIONS.get(image_format, '.img')}"


def _score(region: dict) -> float:
    score = region.get("score")
    return float(score) if isinstance(score, (int, float)) and math.isfinite(score) else -math.inf


def released_long_exprs(row: dict) -> list[str | None]:
    """Each region's long_expr as released (`fgdata import fgclip`), None where there is none."""
    regions, texts = row["regions"] or [], row.get("long_exprs") or []
    return texts if len(texts) == len(regions) else [None] * len(regions)


def _long_expr(row: dict, region: dict, released: str | None, counts: Counter) -> str:
    if released is not None:
        counts["long_expr_from_released"] += 1
        return released
    text, source = long_expression(row, region)
    counts[f"long_expr_from_{source}"] += 1
    return text


def _released_boxes(row: dict, usable: list[tuple], counts: Counter) -> list[dict]:
    """A released item's boxes as they were: every one, in its order (the loaders keep the first 4), its
    texts in their case, its negatives and its flag."""
    return [
        {
            "bbox": [round(v, 6) for v in bbox],
            "short_expr": region["phrase"],
            "long_expr": _long_expr(row, region, long_expr, counts),
            "flag_short_neg": int(region["negatives_flag"] == "ok"),
            "short_expr_negs": {str(i): negative["text"] for i, negative in enumerate(region["negatives"])},
        }
        for _, region, bbox, long_expr in usable
    ]


def _made_boxes(row: dict, usable: list[tuple], negatives_needed: int, lowercase: bool, counts: Counter) -> list[dict]:
    """One box per phrase (its best score): the region loss takes identical texts in one image for each
    other's negatives. Boxes with hard negatives come first, so the first 4 that FG-CLIP's loaders keep
    (max_anns) hold one whenever the image has one."""
    best: dict[str, tuple] = {}
    for entry in usable:
        phrase = text_key(entry[1]["phrase"])
        if phrase in best:
            counts["duplicate_phrase_boxes"] += 1
            if _score(entry[1]) <= _score(best[phrase][1]):
                continue
        best[phrase] = entry
    cased = str.lower if lowercase else (lambda text: " ".join(text.split()))
    ranked = []
    for order, region, bbox, long_expr in best.values():
        short_expr = cased(region["phrase"])
        # a negative the tokenizer cannot tell from the positive or from another is no negative
        seen, negatives = {text_key(short_expr)}, []
        for negative in region["negatives"]:
            if text_key(negative["text"]) not in seen:
                seen.add(text_key(negative["text"]))
                negatives.append(cased(negative["text"]))
        counts["negatives_same_text"] += len(region["negatives"]) - len(negatives)
        complete = len(negatives) >= negatives_needed
        box = {
            "bbox": [round(v, 6) for v in bbox],
            "short_expr": short_expr,
            "long_expr": cased(_long_expr(row, region, long_expr, counts)),
            "flag_short_neg": int(complete),
            "short_expr_negs": {str(i): text for i, text in enumerate(negatives[:negatives_needed])} if complete else {},
        }
        ranked.append((not complete, -_score(region), order, box))
    return [box for *_, box in sorted(ranked, key=lambda entry: entry[:3])]


def loader_sees_negatives(item: dict) -> bool:
    """Whether FG-CLIP's loaders find a hard-negative set in the item: a flagged box among the first 4."""
    return any(box["flag_short_neg"] == 1 for box in item["bbox_info"][:LOADER_BOXES])


def fgclip_item(row: dict, f_path: str, negatives_needed: int, lowercase: bool = True, require_negatives: bool = False) -> tuple[dict, str | None, Counter]:
    """(item, why it is left out or None, counts). A row `fgdata import fgclip` wrote goes out as released;
    the others by the rules of `_made_boxes`. Boxes that are not finite, inverted or off the image are
    left out: FG-CLIP's loader would take NaN or an inverted box for a real region."""
    counts: Counter = Counter()
    usable = []
    for order, (region, long_expr) in enumerate(zip(row["regions"], released_long_exprs(row))):
        bbox, bad = check_box(region["box_norm"])
        if bad:
            counts["bad_boxes"] += 1
            continue
        usable.append((order, region, bbox, long_expr))
    if row.get("negatives_backend") == IMPORTED_FGCLIP:
        boxes = _released_boxes(row, usable, counts)
    else:
        boxes = _made_boxes(row, usable, negatives_needed, lowercase, counts)
    has_long = has_long_caption(row)
    item = {"f_path": f_path, "caption": row["long_caption"] if has_long else row["short_caption"] or "", "short_caption": row["short_caption"] or "", "bbox_info": boxes}
    if not boxes:
        return item, "no_usable_box", counts
    if require_negatives and not loader_sees_negatives(item):
        return item, "no_box_with_negatives", counts
    return item, None, counts


def chance_of_batch_without_negatives(items: int, without: int, batch: int) -> float:
    """The chance that one batch of `batch` items drawn without replacement from `items`, `without` of
    which hold no hard-negative set, holds none (hypergeometric: C(without, b) / C(items, b), b the batch
    or the whole set when smaller). FG-CLIP 1's collator fails on such a batch."""
    chance = 1.0
    for drawn in range(min(batch, items)):
        chance *= max(without - drawn, 0) / (items - drawn)
        if chance == 0.0:
            break
    return chance


def _check_kind(dataset_dir: Path, kind: str, columns: list[str], shards: list[Path], optional: list[str] = ()) -> dict[Path, list[str]]:
    """The columns to read from each shard (`columns` and those of `optional` it has); stops before
    anything is written when `dataset_dir` is not a dataset of `kind`."""
    manifest = read_json(dataset_dir / MANIFEST_FILE)
    if manifest is not None and "kind" not in manifest:
        raise FgdataError(f"{dataset_dir / MANIFEST_FILE}: no 'kind'; it is damaged: rerun the stage that wrote {dataset_dir} to rewrite it")
    if manifest is not None and manifest["kind"] != kind:
        raise FgdataError(
            f"{dataset_dir} holds {manifest['kind']!r} shards (its {MANIFEST_FILE}), not {kind}; "
            f"export fgclip reads the fggrn output of `fgdata negatives` and its image shards"
        )
    schema = load_schema(kind).arrow
    wanted = {}
    for shard in shards:
        shard_schema = read_shard_schema(shard)
        wanted[shard] = columns + [name for name in optional if name in shard_schema.names]
        check_input_columns(shard_schema, {name: schema.field(name).type for name in wanted[shard]}, where=str(shard))
    return wanted


def _recorded_files(out_dir: Path) -> tuple[list[str], bool]:
    """(the files an earlier export into `out_dir` wrote, whether its record is the old `_run.json`);
    refuses a folder fgdata's export does not own."""
    record, legacy = read_json(out_dir / RECORD_FILE), False
    if record is None:  # an export written before the rename, or another stage's folder
        record = read_json(out_dir / RUN_FILE)
        legacy = record is not None
    if record is None:
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise FgdataError(f"{out_dir} is not empty and was not written by fgdata; choose a new folder for the export")
        return [], False
    record_path = out_dir / (RUN_FILE if legacy else RECORD_FILE)
    if record.get("stage") != STAGE:
        raise FgdataError(f"{out_dir} holds the output of fgdata stage {record.get('stage')!r}, not an export; choose a new folder for the export")
    files = record.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise FgdataError(f"{record_path}: 'files' is not a list of file names; choose a new folder for the export")
    images = out_dir / "images"
    if images.is_symlink() or (images.exists() and not images.is_dir()):
        raise FgdataError(f"{images} is not a plain folder (a link or a file); choose a new folder for the export")
    return files, legacy


def _is_export_file(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return name in (JSON_FILE, SUMMARY_FILE, LEGACY_SUMMARY_FILE, DATACARD_FILE) or (len(parts) == 2 and parts[0] == "images" and bool(_OUR_IMAGE.fullmatch(parts[1])))


def other_data_files(out_dir: Path) -> list[str]:
    """Files besides fgclip.json that FG-CLIP's loaders would read as data from this folder."""
    return sorted({p.name for pattern in DATA_GLOBS for p in Path(out_dir).glob(pattern)} - {JSON_FILE})


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
    fggrn_dir: Path,
    out_dir: Path,
    images_dir: Path | None = None,
    negatives_needed: int = 10,
    progress: bool = True,
    overwrite: bool = False,
    lowercase: bool = True,
    allow_missing_long_captions: bool = False,
    require_negatives: bool = False,
    batch_size: int = FgclipTrainConfig.batch_size,
) -> dict:
    fggrn_dir = resolved(fggrn_dir)  # the inputs may be URIs; OUT is a local folder
    shards = list_shards(fggrn_dir)
    columns = _check_kind(fggrn_dir, "fggrn", _FGGRN_COLUMNS, shards, _OPTIONAL_FGGRN_COLUMNS)
    images_dir = resolved(images_dir) if images_dir else find_ancestor(fggrn_dir, "images")
    if images_dir is None or not images_dir.is_dir():
        raise FgdataError(f"cannot find the image shards {fggrn_dir} descends from; pass --images DIR")
    # no symlink, no file in the way, apart from both inputs
    out_dir = check_output_path(out_dir, inputs=[fggrn_dir, images_dir])
    image_shards = [images_dir / s.name for s in shards if (images_dir / s.name).exists()]
    _check_kind(images_dir, "images", _IMAGE_COLUMNS, image_shards)
    earlier_files, legacy_record = _recorded_files(out_dir)

    # plan every item from the small columns first: nothing is written unless the whole input reads
    items, missing, wanted, owner = [], [], {}, {}
    left_out: dict[str, list[str]] = {reason: [] for reason in LEFT_OUT_REASONS}
    counts: Counter = Counter()
    no_long_caption = 0
    for shard in shards:
        image_shard = shard_path(images_dir, shard.name)
        formats = {}
        if image_shard.exists():
            table = read_shard(image_shard, columns=["key", "format"])
            formats = dict(zip(table.column("key").to_pylist(), table.column("format").to_pylist()))
        for row in read_shard(shard, columns=columns[shard]).to_pylist():
            if row["key"] not in formats:
                missing.append(row["key"])
                continue
            name = image_file_name(row["key"], formats[row["key"]])
            item, reason, item_counts = fgclip_item(row, f"images/{name}", negatives_needed, lowercase, require_negatives)
            counts.update(item_counts)
            if reason is not None:
                left_out[reason].append(row["key"])
                continue
            if owner.setdefault(name, row["key"]) != row["key"]:
                raise FgdataError(f"keys {owner[name]!r} and {row['key']!r} map to one file name {name}; report this as a bug")
            wanted.setdefault(image_shard, {})[row["key"]] = name
            items.append(item)
            no_long_caption += not has_long_caption(row)
    if not items:
        why = ", ".join(f"{len(keys)} {reason}" for reason, keys in left_out.items() if keys)
        raise FgdataError(
            f"nothing to export from {fggrn_dir}: {len(missing)} image(s) not found in {images_dir}"
            + (f", the rest left out ({why})" if why else "")
        )
    if no_long_caption and not allow_missing_long_captions:
        raise FgdataError(
            f"{no_long_caption} of {len(items)} images in {fggrn_dir} have no long caption, so their caption would repeat "
            "short_caption and FG-CLIP's long-caption loss would learn nothing from them; add long captions "
            "(`fgdata recaption`, then the phrases stage on them), or pass --allow-missing-long-captions"
        )

    if overwrite:
        _remove_export(out_dir, earlier_files)
        earlier_files = []
    files = [JSON_FILE, SUMMARY_FILE, DATACARD_FILE, *(f"images/{n}" for names in wanted.values() for n in names.values())]
    # recorded before the first image is written, so even an interrupted export is known as ours
    try:
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # OUT under a file, or not writable
        raise FgdataError(f"cannot create {out_dir / 'images'}: {first_line(exc)}; choose a new folder for the export") from None
    write_json(out_dir / RECORD_FILE, {"stage": STAGE, "written_by": "fgdata", "source": str(fggrn_dir), "images": str(images_dir), "files": sorted({*earlier_files, *files} - {LEGACY_SUMMARY_FILE})})
    if legacy_record:  # an older export's records end in .json, which FG-CLIP's loaders read as data
        for name in (LEGACY_SUMMARY_FILE, RUN_FILE):
            if (out_dir / name).is_file() or (out_dir / name).is_symlink():
                (out_dir / name).unlink()
    written = 0
    for image_shard, names in tqdm(wanted.items(), unit="shard", desc="export fgclip", disable=not progress):
        for row in read_shard(image_shard, columns=["key", "image"]).to_pylist():
            if row["key"] in names:
                written += _write_if_changed(out_dir / "images" / names[row["key"]], row["image"])

    without_negatives = sum(not loader_sees_negatives(item) for item in items)
    json_path = out_dir / JSON_FILE
    # strict JSON (no NaN), written whole and last: a reader never sees half a list
    _write_if_changed(json_path, (json.dumps(items, ensure_ascii=False, allow_nan=False) + "\n").encode())
    summary = {
        "items": len(items),
        "boxes": sum(len(i["bbox_info"]) for i in items),
        "boxes_with_negatives": sum(b["flag_short_neg"] for i in items for b in i["bbox_info"]),
        "bad_boxes": counts["bad_boxes"],
        "duplicate_phrase_boxes": counts["duplicate_phrase_boxes"],
        "negatives_same_text": counts["negatives_same_text"],
        "long_expr_from": {k.removeprefix("long_expr_from_"): v for k, v in sorted(counts.items()) if k.startswith("long_expr_from_")},
        "missing_long_captions": no_long_caption,
        "left_out": {reason: len(keys) for reason, keys in left_out.items()},
        "left_out_keys": left_out,
        # images kept though FG-CLIP's loaders find no hard-negative set in them (`loader_sees_negatives`)
        "without_negatives": without_negatives,
        "batch_size": batch_size,
        "chance_batch_without_negatives": chance_of_batch_without_negatives(len(items), without_negatives, batch_size),
        "images_written": written,
        "missing_images": missing,
        "lowercase": lowercase,
        "other_data_files": other_data_files(out_dir),
        "json": str(json_path),
    }
    write_json(out_dir / SUMMARY_FILE, {**summary, "source": str(fggrn_dir), "images": str(images_dir)})
    note = f"Exported by `fgdata export fgclip` from {fggrn_dir}: {len(items)} items in {JSON_FILE}, images under images/."
    _write_if_changed(out_dir / DATACARD_FILE, export_datacard(fggrn_dir, note).encode())
    return summary
